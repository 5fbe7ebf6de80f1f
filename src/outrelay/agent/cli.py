"""``outrelay-agent``: the sidecar's command line (flags as spec 03 §1.2).

Every flag is validated before any network I/O (spec 03 §11 item 11): 2 for
every missing or malformed flag value (addresses, ports, durations, enum
values, the URI, ``--log-format``/``--log-level``, ``--expose-service``
without a target), with the reason on one line; 1 for TLS material that does
not pass the certificate self-check (:func:`outrelay.pki.check_own_identity`:
the exact reason, no traceback), listeners, and a relay that refuses us; 0 for
``--version``, ``--help`` and a clean SIGINT/SIGTERM shutdown. Ours, stricter
than the reference, which falls back to text/info for unknown log flags and
exits 1 for some malformed ``--intercept``/``--consume`` values.

SIGHUP (and, with ``--watch-certs``, a change of the files) reloads the
certificate, key and CA bundle (:mod:`outrelay.pki.reload`): the new files are
validated first; on success new dials use them and the agent reconnects to its
relay to present the new certificate, every stream resuming on the new link; on
failure the old identity stays and a WARN line says why. The process never
dies from SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence

from outrelay import __version__
from outrelay.agent.agent import Agent, AgentConfig, ListenerError
from outrelay.agent.dial import HELLO_CAPABILITIES
from outrelay.agent.intercept import (
    DEFAULT_DNS_LISTEN,
    DEFAULT_DNS_SUFFIX,
    DEFAULT_DNS_UPSTREAM,
    DEFAULT_TPROXY_LISTEN,
    InterceptError,
    TproxyConfig,
    check_platform,
    parse_dns_upstream,
)
from outrelay.agent.metrics import admin_routes
from outrelay.agent.p2p.promote import P2PConfig
from outrelay.agent.session import SessionConfig
from outrelay.agent.udp import FLOW_IDLE, MAX_FLOWS
from outrelay.cliutil import (
    FlagError,
    FlagParser,
    add_cert_watch_flags,
    add_log_flags,
    add_quic_datagram_flag,
    apply_quic_datagram_flag,
    duration,
    flag_error,
    go_style_argv,
    parse_host_port,
    watch_cert_files,
)
from outrelay.config import add_config_flag, config_argv
from outrelay.identity import InvalidIdentity, parse_identity
from outrelay.observe import AdminServer, kv, setup_logging
from outrelay.pki import IdentityCheckFailed, PkiError, check_own_identity
from outrelay.pki.reload import IdentitySnapshot, ReloadError, ReloadStatus, validate_identity
from outrelay.transport import QUIC_BACKENDS, QuicTlsConfig, select_quic_backend

__all__ = ["build_config", "build_parser", "main"]

log = logging.getLogger("outrelay.agent")

EPILOG = """\
examples:
  provider, exposing a local web server as service "web":
    outrelay-agent --relay relay.example:7443 --uri outrelay://acme/agent/<uuid> \\
      --cert agent.crt --key agent.key --ca ca.crt --expose web=127.0.0.1:8080

  consumer, reaching "web" on localhost:18080:
    outrelay-agent --relay relay.example:7443 --uri outrelay://acme/agent/<uuid> \\
      --cert agent.crt --key agent.key --ca ca.crt --consume web@127.0.0.1:18080

  consumer in tproxy mode (Linux): apps dial web.outrelay:<any port> unchanged; needs
  "iptables -t nat -A OUTPUT -p tcp -d 100.64.0.0/10 -j REDIRECT --to-port 15001"
  and "nameserver 127.0.0.1" in resolv.conf (see the README):
    outrelay-agent --relay relay.example:7443 --uri outrelay://acme/agent/<uuid> \\
      --cert agent.crt --key agent.key --ca ca.crt --intercept tproxy \\
      --dns-listen 127.0.0.1:53 --consume web

Single-dash spellings (-relay, -consume=...) are accepted as in the reference.
exit codes: 0 clean stop, 1 TLS self-check/listener/relay refusal, 2 bad flags.
SIGHUP reloads --cert/--key/--ca (validated first: key match, chain, validity, same --uri);
on success the agent reconnects with the new certificate and every stream resumes; a
failed reload keeps the old identity and logs why. It never stops the agent.
"""


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="outrelay-agent",
        description=(
            "OutRelay agent: dials out to a relay over mTLS QUIC so local apps reach "
            "remote services (--consume) and remote agents reach local ones (--expose), "
            "with no inbound port."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--relay",
        default="127.0.0.1:7443",
        help="relay QUIC endpoints, comma-separated host:port; all are dialled at once and "
        "the first healthy one in list order wins (default %(default)s)",
    )
    p.add_argument(
        "--relay-tcp",
        default="",
        help="relay TLS+yamux endpoints (e.g. relay.example:443), comma-separated; "
        "used when QUIC cannot connect (UDP blocked)",
    )
    p.add_argument(
        "--transport",
        default="auto",
        choices=("auto", "quic", "tcp"),
        help="auto: QUIC first, then --relay-tcp, and back to QUIC on a later reconnect; "
        "quic or tcp: only that (default %(default)s)",
    )
    p.add_argument(
        "--quic-backend",
        default="auto",
        choices=QUIC_BACKENDS,
        help="QUIC library that dials the relay: qh3 (Rust core, faster client) or aioquic; "
        "auto: aioquic for now (qh3 does not yet pass every test). The relay, P2P and "
        "forward planes always use aioquic (default %(default)s)",
    )
    p.add_argument(
        "--uri",
        default="",
        help="this agent's identity outrelay://<tenant>/agent/<uuid> (required)",
    )
    p.add_argument("--cert", default="", help="PEM client certificate (required)")
    p.add_argument("--key", default="", help="PEM private key (required)")
    p.add_argument("--ca", default="", help="PEM CA bundle that verifies the relay (required)")
    p.add_argument(
        "--server-name",
        default="localhost",
        help="TLS server name the relay certificate must carry (default %(default)s)",
    )
    p.add_argument("--expose-service", default="", help="one service name to provide")
    p.add_argument("--expose-target", default="", help="backend host:port for --expose-service")
    p.add_argument(
        "--expose",
        action="append",
        default=[],
        metavar="SVC=HOST:PORT",
        help="provide SVC, bridging each stream to the TCP backend HOST:PORT (repeatable)",
    )
    p.add_argument(
        "--intercept",
        default="explicit",
        choices=("explicit", "tproxy"),
        help="interception mode: explicit (one listener per --consume) or tproxy (Linux: "
        "VIPs + DNS + an iptables REDIRECT) (default %(default)s)",
    )
    p.add_argument(
        "--consume",
        action="append",
        default=[],
        metavar="SVC@HOST:PORT",
        help="explicit mode: listen on HOST:PORT and carry each connection to remote service "
        "SVC; tproxy mode: SVC alone (the whole value), reachable as SVC.<dns-suffix> on any "
        "port (repeatable)",
    )
    p.add_argument(
        "--tproxy-listen",
        default=DEFAULT_TPROXY_LISTEN,
        metavar="HOST:PORT",
        help="tproxy mode: TCP listener for REDIRECTed connections (default %(default)s)",
    )
    p.add_argument(
        "--dns-listen",
        default=DEFAULT_DNS_LISTEN,
        metavar="HOST:PORT",
        help="tproxy mode: UDP address of the embedded DNS server; use port 53 to be a "
        "resolv.conf nameserver (default %(default)s)",
    )
    p.add_argument(
        "--dns-suffix",
        default=DEFAULT_DNS_SUFFIX,
        help="tproxy mode: DNS suffix of service names (default %(default)s)",
    )
    p.add_argument(
        "--dns-upstream",
        default=DEFAULT_DNS_UPSTREAM,
        metavar="IP[:PORT]|auto|none",
        help="tproxy mode: where names outside the suffix are forwarded; auto = the first "
        "/etc/resolv.conf nameserver that is not this agent; none = answer them REFUSED "
        "(default %(default)s)",
    )
    p.add_argument(
        "--p2p-listen",
        default="",
        metavar="HOST:PORT",
        help="one UDP socket for everything QUIC: the relay connection, direct (P2P) dials "
        "from peer agents (mTLS, the stream's own peer only), connectivity checks and NAT "
        "punches; spliced streams are then promoted to a direct path when one works, and "
        "fall back to the relay when it dies. Use 0.0.0.0:PORT behind a NAT (the relay "
        "tells us our public address). Empty: off, the relay carries every byte (default)",
    )
    p.add_argument(
        "--p2p-advertise",
        default="",
        metavar="IP:PORT",
        help="with --p2p-listen: an address peers can reach the listener at, offered first",
    )
    p.add_argument(
        "--p2p-reference-wire",
        action="store_true",
        help="with --p2p-listen: speak P2P exactly as the reference agent does (no capability "
        "marker, asymmetric STREAM_RESUME swap, the relay's p2p mode ignored); for interop "
        "tests",
    )
    p.add_argument(
        "--resume-window",
        type=duration,
        default=30.0,
        metavar="SECONDS",
        help="how long a stream whose relay failed may take to resume before the "
        "application's connection is reset; the reference relay pairs halves for 30 s "
        "(default %(default)s)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=duration,
        default=10.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long in-flight streams may finish (default %(default)s)",
    )
    add_cert_watch_flags(p)
    p.add_argument(
        "--admin-listen",
        default="",
        metavar="HOST:PORT",
        help="serve /healthz, /readyz and /metrics (Prometheus) over HTTP here, e.g. "
        "127.0.0.1:9901; empty: off (default). Not authenticated: keep it on loopback "
        "or a pod-private address",
    )
    p.add_argument(
        "--drain-delay",
        type=duration,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, how long /readyz answers 503 while the listeners still accept, "
        "before they close, with --admin-listen (lets a load balancer or Kubernetes stop "
        "sending new connections first); default %(default)s",
    )
    _add_udp_flags(p)
    add_quic_datagram_flag(p)
    add_log_flags(p)
    add_config_flag(p)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


# -- UDP services (issue 19 item 2) ------------------------------------------------------


def _add_udp_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("UDP services (length-prefixed datagrams on a relay stream)")
    g.add_argument(
        "--expose-udp",
        action="append",
        default=[],
        metavar="SVC=HOST:PORT",
        help="provide SVC, sending each flow's datagrams to the UDP backend HOST:PORT "
        "from its own socket (repeatable)",
    )
    g.add_argument(
        "--consume-udp",
        action="append",
        default=[],
        metavar="SVC@HOST:PORT",
        help="bind UDP HOST:PORT; each client address is one flow (one stream) to remote "
        "UDP service SVC (repeatable)",
    )
    g.add_argument(
        "--udp-idle",
        type=float,
        default=FLOW_IDLE,
        metavar="SECONDS",
        help="close a UDP flow (and its stream) after this long without a datagram "
        "(default %(default)s)",
    )
    g.add_argument(
        "--udp-max-flows",
        type=int,
        default=MAX_FLOWS,
        metavar="N",
        help="flows per --consume-udp socket; datagrams from further clients are dropped "
        "(default %(default)s)",
    )


def _udp_config(
    args: argparse.Namespace, services: dict[str, str]
) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """Parse the UDP flags; ``--expose-udp`` services are added to ``services``.

    Returns:
        (``--consume-udp`` (service, bind) pairs, names of the UDP services).
    """
    udp: set[str] = set()
    for item in args.expose_udp:
        name, sep, target = item.partition("=")
        if not sep or not name:
            raise FlagError(f"--expose-udp must be <svc>=<host:port>, got {item!r}")
        if name in services:
            raise FlagError(f"service {name!r} is exposed twice")
        try:
            parse_host_port(target, what=f"UDP backend for service {name!r}", port_zero=False)
        except ValueError as exc:
            raise FlagError(str(exc)) from exc
        services[name] = target
        udp.add(name)
    consumes: list[tuple[str, str]] = []
    for item in args.consume_udp:
        service, sep, bind = item.partition("@")
        if not sep or not service or not bind:
            raise FlagError(f"--consume-udp must be <svc>@<host:port>, got {item!r}")
        try:
            parse_host_port(bind, what=f"--consume-udp bind address for {service!r}")
        except ValueError as exc:
            raise FlagError(str(exc)) from exc
        consumes.append((service, bind))
    if args.udp_idle <= 0 or args.udp_max_flows < 1:
        raise FlagError("--udp-idle must be > 0 and --udp-max-flows >= 1")
    return consumes, frozenset(udp)


class SetupError(Exception):
    """TLS material or similar: exit 1."""


def build_config(args: argparse.Namespace) -> AgentConfig:
    """The agent's configuration from parsed flags (:func:`build_parser`).

    Raises:
        FlagError: a required flag is missing or a value is invalid.
        SetupError: the certificate, key or CA file cannot be loaded or does not
            match ``--uri``.
    """
    missing = [name for name in ("cert", "key", "ca", "uri") if not getattr(args, name)]
    if missing:
        raise FlagError(f"missing required flags: {', '.join('--' + m for m in missing)}")
    try:
        identity = parse_identity(args.uri)
    except InvalidIdentity as exc:
        raise FlagError(f"invalid agent URI: {exc}") from exc
    if identity.role != "agent":
        raise FlagError(f"invalid agent URI: {args.uri!r} is a relay identity")
    if not args.server_name.strip():
        raise FlagError("--server-name must not be empty")

    relays = _endpoints(args.relay, "--relay")
    relays_tcp = _endpoints(args.relay_tcp, "--relay-tcp")
    if args.transport == "tcp" and not relays_tcp:
        raise FlagError("--transport tcp needs --relay-tcp")
    if args.transport != "tcp" and not relays:
        raise FlagError("--relay needs at least one host:port")

    try:
        backend = select_quic_backend(args.quic_backend)
    except ValueError as exc:
        raise FlagError(str(exc)) from exc
    if args.transport != "tcp":
        log.info(
            "QUIC backend",
            extra=kv(
                backend=backend.name,
                version=backend.version,
                requested=args.quic_backend,
                note=backend.note or "-",
            ),
        )

    services: dict[str, str] = {}
    if args.expose_service:
        if not args.expose_target:
            raise FlagError("--expose-service requires --expose-target")
        services[args.expose_service] = args.expose_target
    for item in args.expose:
        name, sep, target = item.partition("=")
        if not sep or not name:
            raise FlagError(f"--expose must be <svc>=<host:port>, got {item!r}")
        services[name] = target
    for name, target in services.items():
        try:
            parse_host_port(target, what=f"backend for service {name!r}", port_zero=False)
        except ValueError as exc:
            raise FlagError(str(exc)) from exc

    consumes_udp, udp_services = _udp_config(args, services)
    consumes: list[tuple[str, str]] = []
    tproxy: TproxyConfig | None = None
    if args.consume and args.intercept == "tproxy":
        tproxy = _tproxy_config(args)
    elif args.consume:
        for item in args.consume:
            service, sep, bind = item.partition("@")
            if not sep or not service:
                raise FlagError(f"explicit --consume must be <svc>@<bind-addr>: {item!r}")
            if bind:
                try:
                    parse_host_port(bind, what=f"--consume bind address for {service!r}")
                except ValueError as exc:
                    raise FlagError(str(exc)) from exc
            consumes.append((service, bind))

    try:
        check_own_identity(args.cert, args.key, args.ca, args.uri)
    except IdentityCheckFailed as exc:
        raise SetupError(f"certificate self-check failed: {exc}") from exc
    except (OSError, PkiError, ValueError) as exc:
        raise SetupError(f"load tls: {exc}") from exc

    tls = QuicTlsConfig(args.cert, args.key, args.ca, server_name=args.server_name)
    p2p: P2PConfig | None = None
    if args.p2p_listen:
        try:
            p2p_listen = parse_host_port(args.p2p_listen, what="--p2p-listen")
            advertise = (
                parse_host_port(args.p2p_advertise, what="--p2p-advertise", port_zero=False)
                if args.p2p_advertise
                else None
            )
        except ValueError as exc:
            raise FlagError(str(exc)) from exc
        p2p = P2PConfig(p2p_listen, advertise, reference_wire=args.p2p_reference_wire)
    elif args.p2p_advertise or args.p2p_reference_wire:
        raise FlagError("--p2p-advertise and --p2p-reference-wire need --p2p-listen")
    return AgentConfig(
        p2p=p2p,
        session=SessionConfig(
            relays=tuple(relays),
            uri=args.uri,
            tls=tls,
            services=services,
            relays_tcp=tuple(relays_tcp),
            transport=args.transport,
            quic_backend=backend.name,
            resume_window=args.resume_window,
            capabilities=HELLO_CAPABILITIES if p2p and not p2p.reference_wire else (),
        ),
        consumes=consumes,
        shutdown_grace=args.shutdown_grace,
        tproxy=tproxy,
        admin_listen=_admin_address(args.admin_listen),
        drain_delay=args.drain_delay,
        consumes_udp=consumes_udp,
        udp_services=udp_services,
        udp_idle=args.udp_idle,
        udp_max_flows=args.udp_max_flows,
    )


def _admin_address(value: str) -> tuple[str, int] | None:
    """``--admin-listen``: None when empty (off)."""
    if not value:
        return None
    try:
        return parse_host_port(value, what="--admin-listen")
    except ValueError as exc:
        raise FlagError(str(exc)) from exc


def _endpoints(value: str, flag: str) -> list[tuple[str, int]]:
    """Comma-separated host:port list; empty items are skipped."""
    out: list[tuple[str, int]] = []
    for item in value.split(","):
        if item.strip():
            try:
                out.append(parse_host_port(item, what=f"{flag} endpoint", port_zero=False))
            except ValueError as exc:
                raise FlagError(str(exc)) from exc
    return out


def _tproxy_config(args: argparse.Namespace) -> TproxyConfig:
    """Tproxy flags (spec 03 §1.3): not Linux is exit 1; a malformed ``--tproxy-listen``,
    ``--dns-listen`` or ``--dns-upstream`` is exit 2 (ours: the reference exits 1 for the
    first and only disables DNS for the second)."""
    try:
        check_platform()
    except InterceptError as exc:
        raise SetupError(f"start interceptor: {exc}") from exc
    try:
        listen = parse_host_port(args.tproxy_listen, what="--tproxy-listen")
        parse_host_port(args.dns_listen, what="--dns-listen")
        parse_dns_upstream(args.dns_upstream)
    except ValueError as exc:
        raise FlagError(str(exc)) from exc
    return TproxyConfig(
        services=tuple(args.consume),
        listen=listen,
        dns_listen=args.dns_listen,
        dns_suffix=args.dns_suffix,
        dns_upstream=args.dns_upstream,
    )


class IdentityReloader:
    """SIGHUP / ``--watch-certs``: swap the agent's certificate without a restart.

    The agent's TLS contexts load the :class:`IdentitySnapshot` paths; a reload
    validates the operator's files against the running ``--uri``, installs them
    into the snapshot (new dials, P2P and forward connections use them at
    once), points the P2P listener at them and reconnects the relay session,
    which resumes every stream on the new link.
    """

    def __init__(
        self,
        agent: Agent,
        snapshot: IdentitySnapshot,
        uri: str,
        status: ReloadStatus | None = None,
    ) -> None:
        self.agent = agent
        self.snapshot = snapshot
        self.uri = uri
        self.status = status if status is not None else ReloadStatus()
        """Last reload outcome (for the admin endpoint)."""

    def reload(self, trigger: str) -> bool:
        """Validate and install the files; returns False (old identity kept) on failure."""
        snap = self.snapshot
        try:
            loaded = validate_identity(
                snap.source_cert, snap.source_key, snap.source_ca, expect_uri=self.uri
            )
            snap.install()
        except ReloadError as exc:
            self.status.record(False, str(exc))
            self.agent.session.stats.reloaded(False)
            log.warning(
                "certificate reload failed; keeping the current identity",
                extra=kv(trigger=trigger, err=str(exc)),
            )
            return False
        self.status.record(True, trigger, loaded)
        self.agent.session.stats.reloaded(True)
        p2p = self.agent.p2p
        if p2p is not None:
            try:
                p2p.reload_tls()
            except (OSError, ValueError, PkiError) as exc:  # pragma: no cover - validated above
                log.warning("p2p listener kept its old certificate", extra=kv(err=str(exc)))
        log.info(
            "certificate reloaded",
            extra=kv(
                trigger=trigger,
                serial=loaded.serial,
                not_after=loaded.not_after.isoformat(),
                uri=loaded.uri,
            ),
        )
        self.agent.session.reconnect("certificate reload")
        return True


async def run_agent(
    config: AgentConfig,
    snapshot: IdentitySnapshot | None = None,
    watch_interval: float | None = None,
    reload_status: ReloadStatus | None = None,
) -> int:
    """Run until SIGINT/SIGTERM (exit 0) or a refusal before first contact (exit 1).

    ``snapshot`` (the files ``config`` loads) makes SIGHUP reload the identity;
    ``watch_interval`` also polls the source files for changes; ``reload_status``
    receives every reload's outcome (the admin endpoint can show it).
    """
    loop = asyncio.get_running_loop()
    agent = Agent(config)
    reloader = (
        IdentityReloader(agent, snapshot, config.session.uri, reload_status)
        if snapshot is not None
        else None
    )
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(
            signal.SIGHUP,
            (lambda: reloader.reload("SIGHUP")) if reloader is not None else _reload_requested,
        )
    watcher: asyncio.Task[None] | None = None
    if reloader is not None and watch_interval is not None:
        snap = reloader.snapshot
        watcher = loop.create_task(
            watch_cert_files(
                (snap.source_cert, snap.source_key, snap.source_ca),
                watch_interval,
                reloader.reload,
            ),
            name="watch-certs",
        )
    admin: AdminServer | None = None
    admin_listen = config.admin_listen
    if admin_listen is not None:
        admin = AdminServer(admin_routes(agent))
        try:
            host, port = await admin.start(*admin_listen)
        except OSError as exc:
            log.error(
                "admin listen",
                extra=kv(addr=f"{admin_listen[0]}:{admin_listen[1]}", err=str(exc)),
            )
            if watcher is not None:
                watcher.cancel()
            return 1
        log.info("admin listening", extra=kv(addr=f"{host}:{port}"))
    try:
        return await _run_started(agent, admin, watcher)
    finally:
        if watcher is not None:
            watcher.cancel()
        if admin is not None:
            await admin.close()


async def _run_started(
    agent: Agent, admin: AdminServer | None, watcher: asyncio.Task[None] | None
) -> int:
    config = agent.config
    loop = asyncio.get_running_loop()
    try:
        await agent.start()
    except ListenerError as exc:
        log.error("start interceptor", extra=kv(err=str(exc)))
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    log.info(
        "agent started",
        extra=kv(
            uri=config.session.uri,
            relays=",".join(f"{h}:{p}" for h, p in config.session.relays),
            relays_tcp=",".join(f"{h}:{p}" for h, p in config.session.relays_tcp) or "-",
            services=",".join(config.session.services) or "-",
            consumes=",".join(f"{s}@{h}:{p}" for s, h, p in agent.bound)
            or ",".join(config.tproxy.services if config.tproxy else ())
            or "-",
            version=__version__,
        ),
    )
    stop_task = loop.create_task(stop.wait())
    stopped_task = loop.create_task(agent.wait_stopped())
    await asyncio.wait({stop_task, stopped_task}, return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    stopped_task.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: None)  # later signals are swallowed
    if watcher is not None:
        watcher.cancel()
    if agent.refused is None:
        log.info("shutting down")
        # Readiness off first (/readyz 503), listeners still open for drain_delay.
        agent.begin_drain()
        if config.drain_delay > 0 and admin is not None:
            await asyncio.sleep(config.drain_delay)
    await agent.shutdown()
    return 1 if agent.refused is not None else 0


def _reload_requested() -> None:
    """SIGHUP without a snapshot (embedded use): nothing to reload."""
    log.info("SIGHUP: reload requested; no certificate files to reload, carrying on")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = go_style_argv(sys.argv[1:] if argv is None else argv, parser)
    try:
        words = config_argv(parser, words)
        args = parser.parse_args(words)
    except FlagError as exc:
        return flag_error(parser, words, str(exc), log)
    if args.version:
        print(__version__)
        return 0
    setup_logging(args.log_format, args.log_level)
    apply_quic_datagram_flag(args)
    if hasattr(signal, "SIGHUP"):
        # Until run_agent() handles it, a SIGHUP must not kill us either.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config = build_config(args)
    except FlagError as exc:
        return flag_error(parser, words, str(exc), log)
    except SetupError as exc:
        log.error(str(exc))
        return 1
    # TLS contexts load a private copy of the files, replaced only by a reload
    # that validated the new ones (a half-written Secret never reaches a handshake).
    snapshot = IdentitySnapshot(args.cert, args.key, args.ca)
    try:
        snapshot.install()
        tls = dataclasses.replace(
            config.session.tls,
            cert_file=snapshot.cert_file,
            key_file=snapshot.key_file,
            ca_file=snapshot.ca_file,
        )
        config.session = dataclasses.replace(config.session, tls=tls)
        return asyncio.run(
            run_agent(config, snapshot, args.watch_certs_interval if args.watch_certs else None)
        )
    except ReloadError as exc:
        log.error(f"load tls: {exc}")
        return 1
    except KeyboardInterrupt:  # pragma: no cover - signal arrived before the handler
        return 0
    finally:
        snapshot.remove()


if __name__ == "__main__":
    raise SystemExit(main())
