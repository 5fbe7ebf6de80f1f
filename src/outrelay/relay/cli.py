"""``outrelay-relay``: the relay's command line (spec 02 §1, embedded control plane).

Exit codes follow the reference: 2 when ``--cert``/``--key``/``--ca`` is
missing or a flag value is malformed (addresses, ports, ``--log-format``,
``--log-level``: ours, the reference falls back to text/info), with the reason
on one line; 1 when TLS material, the policy file or the listen address is
unusable, or with ``--registry etcd://...`` when etcd does not answer within
15 s at start or another live relay holds ``--relay-id``; 0 for
``--version``/``--help`` and SIGINT/SIGTERM.

``--registry etcd://host:port[,...]`` joins a mesh of relays (:mod:`.mesh`): the relay
record (``--relay-id``, ``--region``, ``--advertise``), this relay's service bindings and
parked resume halves live in etcd under the relay's lease (``--registry-lease``), policy
rules per tenant (``outrelay policy``; ``--policy`` is refused then). Once joined, etcd
outages never stop the relay: it serves from its cache and ``/readyz`` says why it is not
ready.

SIGHUP re-reads the policy file and the certificate, key and CA bundle
(:mod:`outrelay.pki.reload`; also on a file change with ``--watch-certs``): new
files are validated first, then new QUIC and TCP handshakes present the new
server certificate and verify agents against the new CA, while established
agent connections stay. A failed reload keeps the old identity and logs why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from outrelay import __version__
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
from outrelay.observe import AdminServer, kv, setup_logging
from outrelay.pki import PkiError, load_certificates, load_identity
from outrelay.pki.reload import (
    IdentitySnapshot,
    ReloadError,
    ReloadStatus,
    chains_to_ca,
    validate_identity,
)
from outrelay.relay import Relay, RelayConfig
from outrelay.relay.mesh.cache import (
    DEFAULT_PREFIX,
    KeyLayout,
    RegistryError,
    RegistryOptions,
    parse_registry_url,
)
from outrelay.relay.mesh.policy import TenantPolicy
from outrelay.relay.metrics import admin_routes, dump_metrics
from outrelay.relay.policy import PolicyFileError, PolicyService, load_policy_document
from outrelay.transport import RetryMode

__all__ = ["build_parser", "main"]

log = logging.getLogger("outrelay.relay")

EPILOG = """\
policy file (JSON), evaluated twice per open: caller side (consumer URI ->
service) and callee side (provider URI -> consumer URI); first match wins,
exact targets before wildcard targets, no match denies:
  {"rules": [
    {"id": "web-from-acme", "caller": "outrelay://acme/*", "target": "web", "decision": "allow"},
    {"id": "providers-answer", "caller": "*", "target": "outrelay://acme/*", "decision": "allow"}
  ]}
A rule may add "relay_mode": "forward" (needs --listen-forward: the agents
then run end-to-end QUIC through the UDP plane) and "p2p_mode".
Provide rules say who may register a service (checked at REGISTER; a refused
agent gets no REGISTER_ACK). A service no provide rule of the tenant covers
stays open to every agent of the tenant; otherwise first match wins, no match
refuses:
    {"id": "web-providers", "provider": "outrelay://acme/agent/1f0c*",
     "service": "web", "decision": "allow"}
Without --policy every open and every registration is allowed (a warning is
logged at start). With --registry etcd://... the rules live in etcd instead
(edit them with 'outrelay policy add|remove|list'; --policy is refused): a
tenant with rules there is enforced as above, a tenant without is not, and
every relay of the mesh applies a change at once.
SIGHUP re-reads the policy file (both kinds of rules) and
reloads --cert/--key/--ca (validated first; established agents stay connected,
new handshakes get the new certificate; a failed reload keeps the old one).
"""


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(
        prog="outrelay-relay",
        description=(
            "OutRelay relay: agents dial in over mTLS QUIC (ALPN orp/1); the relay splices a "
            "consumer's stream to a provider's stream. Registry, policy and audit are embedded."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen", default="127.0.0.1:7443", help="UDP address for QUIC (default %(default)s)"
    )
    p.add_argument(
        "--listen-tcp",
        default="",
        help="TCP address for the TLS + yamux fallback (e.g. 0.0.0.0:443); empty: off",
    )
    p.add_argument(
        "--listen-forward",
        default="",
        help="UDP address for the forward plane (mini-TURN, relay_mode forward); empty: off",
    )
    p.add_argument("--cert", default="", help="PEM server certificate (required)")
    p.add_argument("--key", default="", help="PEM private key (required)")
    p.add_argument("--ca", default="", help="PEM CA bundle that verifies agents (required)")
    p.add_argument("--relay-id", default="", help="this relay's id (default: the --listen address)")
    p.add_argument("--region", default="local", help="region label (default %(default)s)")
    p.add_argument("--policy", default="", help="JSON policy file; enables enforcement")
    p.add_argument(
        "--registry",
        default="memory",
        metavar="URL",
        help="service registry: 'memory' (embedded, one relay; default) or "
        "etcd://host:port[,host:port...] (a mesh of relays sharing relays, services, resume "
        "halves and per-tenant policy rules through etcd)",
    )
    p.add_argument(
        "--registry-prefix",
        default=DEFAULT_PREFIX,
        metavar="PREFIX",
        help="key prefix in etcd (default %(default)s)",
    )
    p.add_argument(
        "--registry-lease",
        type=int,
        default=5,
        metavar="SECONDS",
        help="TTL of this relay's etcd lease: a dead relay's rows vanish within it "
        "(default %(default)s)",
    )
    p.add_argument(
        "--advertise",
        default="",
        metavar="HOST:PORT",
        help="the address peer relays dial (default: the --listen address)",
    )
    p.add_argument("--audit", default="", help="append one JSON line per policy decision here")
    p.add_argument(
        "--quic-retry",
        default=RetryMode.AUTO.value,
        choices=[m.value for m in RetryMode],
        help=(
            "QUIC address validation (Retry) before a handshake gets state: auto = under "
            "handshake pressure only, always, never (default %(default)s)"
        ),
    )
    add_cert_watch_flags(p)
    p.add_argument(
        "--admin-listen",
        default="",
        metavar="HOST:PORT",
        help="serve /healthz, /readyz, /metrics (Prometheus) and /debug/metrics (the "
        "reference's JSON snapshot) over HTTP here, e.g. 127.0.0.1:9902; empty: off "
        "(default). Not authenticated: keep it on loopback or a private address",
    )
    p.add_argument(
        "--metrics-dump",
        default="",
        metavar="FILE",
        help="append the JSON metrics snapshot to FILE as one line at start, then every "
        "--metrics-interval (created 0600); empty: off",
    )
    p.add_argument(
        "--metrics-interval",
        type=_go_duration,
        default=10.0,
        metavar="DURATION",
        help="period of --metrics-dump: seconds, or a Go duration as the reference takes "
        "(10s, 500ms, 1m30s); a value <= 0 becomes 10 s (default %(default)s)",
    )
    p.add_argument(
        "--drain-delay",
        type=duration,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, how long /readyz answers 503 before the listeners close, with "
        "--admin-listen (default %(default)s)",
    )
    add_quic_datagram_flag(p)
    add_log_flags(p)
    add_config_flag(p)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_duration(text: str) -> float:
    """argparse ``type``: a number of seconds, or a Go duration (``10s``, ``-1s``, ``1m30s``).

    The reference's ``--metrics-interval`` is a Go duration; both spellings keep scripts
    written for it working. Negative values are allowed (spec 02 §1: <= 0 means 10 s).
    """
    body = text.strip()
    try:
        value = float(body)
    except ValueError:
        sign = -1.0 if body.startswith("-") else 1.0
        body = body.lstrip("+-")
        parts = _GO_DURATION_PART.findall(body)
        if not body or "".join(n + u for n, u in parts) != body:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither seconds nor a Go duration (e.g. 10s, 500ms)"
            ) from None
        value = sign * sum(float(n) * _GO_UNITS[u] for n, u in parts)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite duration")
    return value


def _load_policy(path: str) -> PolicyService:
    service = PolicyService()
    service.load(load_policy_document(path))
    return service


class RelayIdentityReloader:
    """SIGHUP / ``--watch-certs``: validate new files, install them, re-arm the listeners."""

    def __init__(
        self, relay: Relay, snapshot: IdentitySnapshot, status: ReloadStatus | None = None
    ) -> None:
        self.relay = relay
        self.snapshot = snapshot
        self.status = status if status is not None else ReloadStatus()
        # Hold new files to the chain check only if the running ones pass it.
        self.check_chain = chains_to_ca(snapshot.cert_file, snapshot.key_file, snapshot.ca_file)
        """Last reload outcome (for the admin endpoint)."""

    def reload(self, trigger: str) -> bool:
        """Returns False (old identity kept, WARN logged) when the files are unusable."""
        snap = self.snapshot
        try:
            loaded = validate_identity(
                snap.source_cert,
                snap.source_key,
                snap.source_ca,
                server=True,
                check_chain=self.check_chain,
            )
            snap.install()
            self.relay.reload_tls()
        except (ReloadError, OSError, ValueError, PkiError) as exc:
            self.status.record(False, str(exc))
            self.relay.state.counters.reloaded(False)
            log.warning(
                "certificate reload failed; keeping the current identity",
                extra=kv(trigger=trigger, err=str(exc)),
            )
            return False
        self.status.record(True, trigger, loaded)
        self.relay.state.counters.reloaded(True)
        log.info(
            "certificate reloaded",
            extra=kv(trigger=trigger, serial=loaded.serial, not_after=loaded.not_after.isoformat()),
        )
        return True


@dataclass(frozen=True)
class AdminOptions:
    """The admin endpoint and metrics dump flags."""

    listen: tuple[str, int] | None = None
    metrics_dump: str = ""
    metrics_interval: float = 10.0
    drain_delay: float = 0.0


async def run_relay(
    config: RelayConfig,
    policy_path: str = "",
    admin: AdminOptions | None = None,
    snapshot: IdentitySnapshot | None = None,
    watch_interval: float | None = None,
    reload_status: ReloadStatus | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM. ``admin``: the admin endpoint and metrics dump;
    ``snapshot`` (the files ``config`` names) makes SIGHUP reload the identity,
    ``watch_interval`` polls its source files too, and ``reload_status`` receives
    every reload's outcome."""
    admin = admin or AdminOptions()
    relay = Relay(config)
    try:
        host, port = await relay.start()
    except OSError as exc:
        log.error(
            "listen", extra=kv(addr=f"{config.listen_host}:{config.listen_port}", err=str(exc))
        )
        return 1
    except RegistryError as exc:
        log.error("registry", extra=kv(err=str(exc)))
        return 1
    draining = [False]
    server: AdminServer | None = None
    dumper: asyncio.Task[None] | None = None
    if admin.listen is not None:
        server = AdminServer(admin_routes(relay, draining))
        try:
            bound = await server.start(*admin.listen)
        except OSError as exc:
            log.error(
                "admin listen",
                extra=kv(addr=f"{admin.listen[0]}:{admin.listen[1]}", err=str(exc)),
            )
            await relay.stop()
            return 1
        log.info("admin listening", extra=kv(addr=f"{bound[0]}:{bound[1]}"))
    if admin.metrics_dump:
        interval = admin.metrics_interval if admin.metrics_interval > 0 else 10.0
        dumper = asyncio.get_running_loop().create_task(
            _dump(relay, admin.metrics_dump, interval), name="metrics-dump"
        )
    try:
        reloader = (
            RelayIdentityReloader(relay, snapshot, reload_status) if snapshot is not None else None
        )
        return await _serve(
            relay,
            config,
            policy_path,
            host,
            port,
            draining,
            admin,
            server,
            reloader,
            watch_interval,
        )
    finally:
        if dumper is not None:
            dumper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dumper
        if server is not None:
            await server.close()


async def _dump(relay: Relay, path: str, interval: float) -> None:
    """The JSONL dumper; a file that cannot be opened only logs a warning (spec 02 §1)."""
    try:
        await dump_metrics(relay, path, interval)
    except OSError as exc:
        log.warning("metrics dump disabled", extra=kv(path=path, err=str(exc)))


async def _serve(
    relay: Relay,
    config: RelayConfig,
    policy_path: str,
    host: str,
    port: int,
    draining: list[bool],
    admin: AdminOptions,
    server: AdminServer | None,
    reloader: RelayIdentityReloader | None,
    watch_interval: float | None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    watcher: asyncio.Task[None] | None = None
    if reloader is not None and watch_interval is not None:
        snap = reloader.snapshot
        watcher = loop.create_task(
            watch_cert_files(
                (snap.source_cert, snap.source_key, snap.source_ca), watch_interval, reloader.reload
            ),
            name="watch-certs",
        )

    def on_sighup() -> None:
        reload_policy()
        if reloader is not None:
            reloader.reload("SIGHUP")

    def reload_policy() -> None:
        if not policy_path or config.policy is None:
            if reloader is None:
                log.warning("SIGHUP: no --policy file to reload")
            return
        try:
            config.policy.load(load_policy_document(policy_path))
        except (OSError, PolicyFileError) as exc:
            log.error("policy reload failed; keeping the old rules", extra=kv(err=str(exc)))
            return
        log.info(
            "policy reloaded",
            extra=kv(rules=len(config.policy.engine), provide_rules=len(config.policy.provide)),
        )

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    log.info(
        "relay listening",
        extra=kv(
            addr=f"{host}:{port}",
            tcp=f"{relay.tcp_address[0]}:{relay.tcp_address[1]}" if relay.tcp_address else "off",
            forward=relay.plane.endpoint if relay.plane is not None else "off",
            relay_id=relay.relay_id,
            region=config.region,
            policy=policy_path or ("registry" if config.registry is not None else "off"),
            registry="memory" if config.registry is None else "etcd",
            version=__version__,
        ),
    )
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info("shutting down")
    draining[0] = True  # readiness off first
    if admin.drain_delay > 0 and server is not None:
        await asyncio.sleep(admin.drain_delay)
    await relay.stop()
    return 0


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
    missing = [f"--{name}" for name in ("cert", "key", "ca") if not getattr(args, name)]
    if missing:
        log.error("missing required flags", extra=kv(flags=",".join(missing)))
        return 2
    try:
        host, port = parse_host_port(args.listen, what="--listen")
        listen_tcp = (
            parse_host_port(args.listen_tcp, what="--listen-tcp") if args.listen_tcp else None
        )
        listen_forward = (
            parse_host_port(args.listen_forward, what="--listen-forward")
            if args.listen_forward
            else None
        )
        admin_listen = (
            parse_host_port(args.admin_listen, what="--admin-listen") if args.admin_listen else None
        )
        registry = _registry_options(args)
    except ValueError as exc:
        return flag_error(parser, words, str(exc), log)
    admin = AdminOptions(admin_listen, args.metrics_dump, args.metrics_interval, args.drain_delay)
    try:
        load_identity(args.cert, args.key)
        load_certificates(args.ca)
    except (OSError, PkiError, ValueError) as exc:
        log.error("load tls", extra=kv(err=str(exc)))
        return 1
    policy: PolicyService | None = None
    if registry is not None:
        policy = TenantPolicy()
        log.info(
            "policy from the registry: tenants with rules there are enforced, others are not",
            extra=kv(registry=args.registry),
        )
    elif args.policy:
        try:
            policy = _load_policy(args.policy)
        except (OSError, PolicyFileError) as exc:
            log.error("load policy", extra=kv(path=args.policy, err=str(exc)))
            return 1
        log.info(
            "policy loaded",
            extra=kv(path=args.policy, rules=len(policy.engine), provide_rules=len(policy.provide)),
        )
    else:
        log.warning(
            "no --policy given: every open and registration is allowed (no enforcement, no audit)"
        )
    # The listeners load a private copy, replaced only by a validated reload.
    snapshot = IdentitySnapshot(args.cert, args.key, args.ca)
    try:
        snapshot.install()
    except ReloadError as exc:
        snapshot.remove()
        log.error("load tls", extra=kv(err=str(exc)))
        return 1
    config = RelayConfig(
        cert_file=snapshot.cert_file,
        key_file=snapshot.key_file,
        ca_file=snapshot.ca_file,
        listen_host=host,
        listen_port=port,
        listen_tcp=listen_tcp,
        listen_forward=listen_forward,
        relay_id=args.relay_id,
        region=args.region,
        policy=policy,
        audit_file=args.audit or None,
        quic_retry=RetryMode(args.quic_retry),
        registry=registry,
    )
    try:
        return asyncio.run(
            run_relay(
                config,
                args.policy,
                admin,
                snapshot,
                args.watch_certs_interval if args.watch_certs else None,
            )
        )
    except KeyboardInterrupt:  # pragma: no cover
        return 0
    finally:
        snapshot.remove()


def _registry_options(args: argparse.Namespace) -> RegistryOptions | None:
    """``--registry`` and its companions; None for the embedded memory registry.

    Raises:
        ValueError: a malformed value, or ``--policy`` together with an etcd registry.
    """
    if args.registry == "memory":
        return None
    endpoints = parse_registry_url(args.registry)
    KeyLayout(args.registry_prefix)  # validates the prefix
    if args.registry_lease < 2:
        raise ValueError(f"--registry-lease must be at least 2 seconds, got {args.registry_lease}")
    if args.advertise:
        parse_host_port(args.advertise, what="--advertise")
    if args.policy:
        raise ValueError(
            "--policy is for the embedded registry; with --registry etcd:// the rules live in "
            "etcd (outrelay policy add|remove|list)"
        )
    return RegistryOptions(
        tuple(endpoints), args.registry_prefix, args.registry_lease, args.advertise
    )


if __name__ == "__main__":
    raise SystemExit(main())
