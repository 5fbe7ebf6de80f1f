"""Transparent capture (tproxy mode): VIPs + DNS server + tproxy listener together.

Start-up, in order (spec 03 §1.4 step 18, §6.3–§6.5):

1. refuse to run anywhere but Linux (``intercept: tproxy mode requires linux``);
2. allocate a VIP for every tproxy ``--consume``, in flag order, and log
   ``vip allocated`` (svc, vip) for each. Only these names ever get a VIP:
   the DNS server looks names up and never allocates;
3. bind ``--tproxy-listen``; a failure is fatal (exit 1) with a hint about
   the cause (privilege, address in use, address not local);
4. start the DNS server at ``--dns-listen``; a failure is **not** fatal: error
   ``dns server`` is logged and the agent runs on without DNS (spec 03 §1.3).

Upstream forwarding ([REC] spec 03 §6.5, ours): ``--dns-upstream`` is
``auto`` (default: the first ``nameserver`` of /etc/resolv.conf that is not
the agent itself), ``none`` (no forwarding: names outside the suffix get
REFUSED) or an IP literal with an optional port. A hostname is refused: it
would have to be resolved through the very resolver we may be replacing.

The agent installs no iptables rule (spec 03 §6.3); see the README section
"Transparent capture (Linux)".
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from outrelay.agent.intercept.dns import DnsResponder, normalise_suffix, pick_upstream
from outrelay.agent.intercept.dns_server import DnsServer
from outrelay.agent.intercept.tproxy import Handler, TproxyListener
from outrelay.agent.intercept.vip import VipAllocator, VipPoolExhausted
from outrelay.cliutil import parse_host_port
from outrelay.observe import kv

__all__ = [
    "DEFAULT_DNS_LISTEN",
    "DEFAULT_DNS_SUFFIX",
    "DEFAULT_DNS_UPSTREAM",
    "DEFAULT_TPROXY_LISTEN",
    "InterceptError",
    "TproxyConfig",
    "TransparentCapture",
    "check_platform",
    "parse_dns_upstream",
]

log = logging.getLogger("outrelay.agent.intercept")

DEFAULT_TPROXY_LISTEN = "127.0.0.1:15001"
DEFAULT_DNS_LISTEN = "127.0.0.1:5353"
DEFAULT_DNS_SUFFIX = "outrelay"
DEFAULT_DNS_UPSTREAM = "auto"
RESOLV_CONF = Path("/etc/resolv.conf")
_UPSTREAM_OFF = frozenset({"", "none", "off"})


class InterceptError(Exception):
    """Transparent capture cannot start (exit 1, ``start interceptor``)."""


@dataclass(frozen=True)
class TproxyConfig:
    """Everything tproxy mode needs; built by the CLI from its flags."""

    services: tuple[str, ...]
    """Tproxy ``--consume`` values in flag order; the whole string is the name."""
    listen: tuple[str, int] = ("127.0.0.1", 15001)
    """``--tproxy-listen``."""
    dns_listen: str = DEFAULT_DNS_LISTEN
    """``--dns-listen``, unparsed: a bad value only disables DNS (spec 03 §1.3)."""
    dns_suffix: str = DEFAULT_DNS_SUFFIX
    """``--dns-suffix``, normalised by the responder."""
    dns_upstream: str = DEFAULT_DNS_UPSTREAM
    """``--dns-upstream``: ``auto``, ``none`` or ``IP[:port]``."""
    resolv_conf: Path = field(default=RESOLV_CONF)
    """Where ``auto`` looks for the upstream (tests point it elsewhere)."""


def check_platform(platform: str | None = None) -> None:
    """Raises :class:`InterceptError` unless running on Linux (spec 03 §1.3)."""
    if not (platform or sys.platform).startswith("linux"):
        raise InterceptError("intercept: tproxy mode requires linux")


def parse_dns_upstream(value: str) -> tuple[str, int] | str | None:
    """``auto`` -> ``"auto"``; ``none``/``off``/empty -> ``None``; else ``(ip, port)``.

    ``1.1.1.1``, ``1.1.1.1:53``, ``::1``, ``[::1]:5300`` are accepted; port 53
    when none is given.

    Raises:
        ValueError: not an IP literal (with an optional port).
    """
    text = value.strip()
    if text.lower() == DEFAULT_DNS_UPSTREAM:
        return DEFAULT_DNS_UPSTREAM
    if text.lower() in _UPSTREAM_OFF:
        return None
    try:
        return str(ipaddress.ip_address(text.strip("[]"))), 53
    except ValueError:
        pass
    host, port = parse_host_port(text, what="--dns-upstream", port_zero=False)
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise ValueError(
            f"--dns-upstream {value!r} must be an IP address (with an optional port), "
            "'auto' or 'none'"
        ) from None
    return host, port


def _bind_error(what: str, addr: str, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        hint = "ports below 1024 need root or CAP_NET_BIND_SERVICE"
    elif exc.errno == errno.EADDRINUSE:
        hint = "another process is listening there"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = "the address is not assigned to this host or network namespace"
    else:
        hint = ""
    return f"{what} {addr}: {reason}" + (f" ({hint})" if hint else "")


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TransparentCapture:
    """Owns the VIP table, the tproxy listener and the DNS server.

    Args:
        config: the tproxy flags.
        handler: receives each intercepted connection with its service name
            (see :data:`.tproxy.Handler`).
        platform: ``sys.platform`` unless a test says otherwise.
        vips: the VIP table (default: a fresh one over 100.64.0.0/10).
    """

    def __init__(
        self,
        config: TproxyConfig,
        handler: Handler,
        *,
        platform: str | None = None,
        vips: VipAllocator | None = None,
    ) -> None:
        self.config = config
        self._handler = handler
        self._platform = platform
        self.vips = vips if vips is not None else VipAllocator()
        self.listener: TproxyListener | None = None
        self.dns: DnsServer | None = None

    async def start(self) -> None:
        """VIPs, listener, DNS (see the module docstring).

        Raises:
            InterceptError: not Linux, VIP pool exhausted, or the tproxy
                listener could not be bound. Nothing is left running.
        """
        check_platform(self._platform)
        for service in self.config.services:
            if self.vips.lookup(service) is not None:
                continue  # repeated --consume: one VIP, logged once
            try:
                vip = self.vips.allocate(service)
            except VipPoolExhausted as exc:
                raise InterceptError(str(exc)) from exc
            log.info("vip allocated", extra=kv(svc=service, vip=str(vip)))

        host, port = self.config.listen
        listener = TproxyListener(host, port, resolve=self.vips.reverse, handler=self._handler)
        try:
            await listener.start()
        except OSError as exc:
            raise InterceptError(
                _bind_error("cannot listen for tproxy connections on", _fmt(host, port), exc)
            ) from exc
        self.listener = listener
        assert listener.address is not None
        log.info(
            "intercept: tproxy listener bound",
            extra=kv(addr=_fmt(*listener.address), vips=len(self.vips)),
        )
        await self._start_dns()

    async def _start_dns(self) -> None:
        try:
            host, port = parse_host_port(self.config.dns_listen, what="--dns-listen")
        except ValueError as exc:
            log.error("dns server", extra=kv(err=f"{exc}; running without DNS"))
            return
        upstream = self._upstream((host, port))
        responder = DnsResponder(
            self.vips.lookup, self.config.dns_suffix, forwarding=upstream is not None
        )
        server = DnsServer(responder, host, port, upstream=upstream)
        try:
            await server.start()
        except OSError as exc:
            log.error(
                "dns server",
                extra=kv(
                    addr=_fmt(host, port),
                    err=_bind_error("cannot listen on", _fmt(host, port), exc)
                    + "; running without DNS",
                ),
            )
            return
        self.dns = server
        assert server.address is not None
        log.info(
            "intercept: dns server running",
            extra=kv(
                addr=_fmt(*server.address),
                suffix=normalise_suffix(self.config.dns_suffix) or "(none)",
                upstream=_fmt(*upstream) if upstream else "none",
            ),
        )

    def _upstream(self, own: tuple[str, int]) -> tuple[str, int] | None:
        try:
            setting = parse_dns_upstream(self.config.dns_upstream)
        except ValueError as exc:  # the CLI validates first; a library caller may not
            log.warning("intercept: dns upstream ignored", extra=kv(err=str(exc)))
            return None
        if setting != DEFAULT_DNS_UPSTREAM:
            return setting if isinstance(setting, tuple) else None
        try:
            text = self.config.resolv_conf.read_text(errors="replace")
        except OSError as exc:
            log.debug(
                "intercept: no resolv.conf; not forwarding",
                extra=kv(path=str(self.config.resolv_conf), err=exc.strerror or str(exc)),
            )
            return None
        return pick_upstream(text, own)

    async def close(self) -> None:
        """Stop the listener and the DNS server; intercepted connections live on."""
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        if self.dns is not None:
            await self.dns.close()
            self.dns = None
