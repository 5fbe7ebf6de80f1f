"""The agent process: one relay session, explicit consumer listeners, providers.

Owns every task it starts: the session loop, one task per application
connection and one per relay-opened stream. :meth:`Agent.shutdown` stops
accepting, lets in-flight streams finish within a grace period, then cancels
what is left and closes the relay connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from outrelay.agent.consumer import CONSUMER_MODE_WAIT, handle_consumer_connection
from outrelay.agent.intercept import InterceptError, TproxyConfig, TransparentCapture
from outrelay.agent.p2p.promote import P2PConfig, P2PService
from outrelay.agent.provider import (
    PROVIDER_MODE_WAIT,
    LocalBackend,
    handle_incoming_stream,
    split_host_port,
)
from outrelay.agent.session import RelayRefused, RelaySession, SessionConfig
from outrelay.agent.udp import (
    FLOW_IDLE,
    MAX_FLOWS,
    DatagramRouter,
    DatagramStream,
    UdpConsumer,
    UdpDrops,
)
from outrelay.observe import kv
from outrelay.transport import SocketStream, Stream

__all__ = ["Agent", "AgentConfig", "ListenerError"]

log = logging.getLogger("outrelay.agent")

SHUTDOWN_GRACE = 10.0


class ListenerError(Exception):
    """An explicit ``--consume`` listener could not be bound."""


@dataclass
class AgentConfig:
    session: SessionConfig
    consumes: list[tuple[str, str]] = field(default_factory=list)
    """(service, bind ``host:port``) per explicit ``--consume``."""
    shutdown_grace: float = SHUTDOWN_GRACE
    consumer_mode_wait: float = CONSUMER_MODE_WAIT
    provider_mode_wait: float = PROVIDER_MODE_WAIT
    exit_on_refusal: bool = True
    """Exit (code 1) if the relay refuses us before we were ever accepted."""
    tproxy: TproxyConfig | None = None
    """Tproxy mode (``--intercept tproxy`` with at least one ``--consume``)."""
    p2p: P2PConfig | None = None
    """Direct paths (``--p2p-listen``); None: off, every byte goes through the relay."""
    admin_listen: tuple[str, int] | None = None
    """``--admin-listen``: where /healthz, /readyz and /metrics are served; None: off."""
    drain_delay: float = 0.0
    """``--drain-delay``: seconds between readiness off and the listeners closing (SIGTERM)."""
    consumes_udp: list[tuple[str, str]] = field(default_factory=list)
    """(service, bind ``host:port``) per ``--consume-udp``."""
    udp_services: frozenset[str] = frozenset()
    """Services of ``session.services`` exposed with ``--expose-udp`` (UDP backends)."""
    udp_idle: float = FLOW_IDLE
    """``--udp-idle``: seconds before an idle UDP flow's stream is closed."""
    udp_max_flows: int = MAX_FLOWS
    """``--udp-max-flows``: flows per ``--consume-udp`` socket."""


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._p2p_service = (
            P2PService(config.session.tls, config.p2p) if config.p2p is not None else None
        )
        self.session = RelaySession(
            config.session,
            on_incoming=self._on_incoming,
            on_refused=self._on_refused,
            on_fatal=self._on_fatal,
            p2p=self._p2p_service,
        )
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session_task: asyncio.Task[None] | None = None
        self._p2p_task: asyncio.Task[None] | None = None
        self.p2p: P2PService | None = None
        """The P2P service once started (``--p2p-listen``)."""
        self._stopped = asyncio.Event()
        self.refused: RelayRefused | None = None
        self.bound: list[tuple[str, str, int]] = []
        """(service, host, port) of every explicit listener, once bound."""
        self.capture: TransparentCapture | None = None
        """Tproxy mode's VIPs, DNS server and listener, once started."""
        self.draining = False
        """Set by :meth:`begin_drain` (SIGTERM): readiness is off from then on."""
        self.udp_drops = UdpDrops()
        """Datagrams dropped by either role, by reason (``/metrics``)."""
        self.udp_consumers: list[UdpConsumer] = []
        """One per ``--consume-udp``, once bound."""
        self.udp_router = DatagramRouter(self.session)
        self.local_backends: dict[str, LocalBackend] = {}
        """Services served inside this process (the Python API's ``serve``), by name."""
        """UDP flows' QUIC DATAGRAM frames, by relay stream id."""
        self.session.datagram_handler = self.udp_router.received_datagram

    # -- lifecycle ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once :meth:`start` succeeded (the session loop was started)."""
        return self._session_task is not None

    async def start(self) -> None:
        """Bind every ``--consume`` listener, then start the session loop.

        Raises:
            ListenerError: a bind failed (listeners already bound are closed).
        """
        try:
            for service, bind in self.config.consumes:
                host, port = split_host_port(bind) if bind else ("", 0)
                server = await asyncio.start_server(
                    functools.partial(self._on_local_connection, service=service),
                    host or None,
                    port,
                )
                self._servers.append(server)
                sock = server.sockets[0].getsockname()
                self.bound.append((service, sock[0], sock[1]))
                log.info(
                    "intercept: explicit listener bound",
                    extra=kv(bind=f"{sock[0]}:{sock[1]}", svc=service),
                )
        except (OSError, ValueError) as exc:
            for server in self._servers:
                server.close()
            self._servers.clear()
            raise ListenerError(f"cannot listen for --consume {service}@{bind}: {exc}") from exc
        try:
            await self._start_udp()
        except ListenerError:
            for server in self._servers:
                server.close()
            self._servers.clear()
            raise
        if self.config.tproxy is not None:
            capture = TransparentCapture(self.config.tproxy, self._on_intercepted)
            try:
                await capture.start()
            except InterceptError as exc:
                await capture.close()
                for server in self._servers:
                    server.close()
                self._servers.clear()
                raise ListenerError(str(exc)) from exc
            self.capture = capture
        if self._p2p_service is not None:
            p2p = self._p2p_service
            try:
                await p2p.start(self.session)
            except OSError as exc:
                for server in self._servers:
                    server.close()
                self._servers.clear()
                if self.capture is not None:
                    await self.capture.close()
                raise ListenerError(f"cannot listen for --p2p-listen: {exc}") from exc
            self.p2p = p2p
            self._p2p_task = asyncio.get_running_loop().create_task(p2p.run(), name="p2p")
        self._session_task = asyncio.get_running_loop().create_task(
            self.session.run(), name="session"
        )
        self._session_task.add_done_callback(self._session_ended)

    async def _start_udp(self) -> None:
        """Bind every ``--consume-udp`` socket.

        Raises:
            ListenerError: a bind failed (sockets already bound are closed).
        """
        for service, bind in self.config.consumes_udp:
            consumer = UdpConsumer(
                service,
                functools.partial(self._carry_udp_flow, service=service),
                self._spawn,
                self.udp_drops,
                idle_timeout=self.config.udp_idle,
                max_flows=self.config.udp_max_flows,
                router=self.udp_router,
            )
            try:
                host, port = split_host_port(bind)
                bound = await consumer.start(host, port)
            except (OSError, ValueError) as exc:
                for started in self.udp_consumers:
                    await started.close()
                self.udp_consumers.clear()
                raise ListenerError(f"cannot bind --consume-udp {service}@{bind}: {exc}") from exc
            self.udp_consumers.append(consumer)
            self.bound.append((service, bound[0], bound[1]))
            log.info(
                "intercept: udp socket bound",
                extra=kv(bind=f"{bound[0]}:{bound[1]}", svc=service),
            )

    async def _carry_udp_flow(self, flow: DatagramStream, service: str) -> None:
        await handle_consumer_connection(
            self.session, flow, service, mode_wait=self.config.consumer_mode_wait
        )

    def _session_ended(self, task: asyncio.Task[None]) -> None:
        """The session loop only ends when cancelled; anything else is a bug: stop."""
        if task.cancelled() or self._stopped.is_set():
            return
        exc = task.exception()
        log.error("session ended", extra=kv(err=repr(exc)))
        self.refused = RelayRefused(f"session ended: {exc!r}")
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def begin_drain(self) -> None:
        """Turn readiness off (``/readyz`` 503) before anything closes.

        Probes then take the pod out of rotation while the listeners still accept.
        """
        if not self.draining:
            self.draining = True
            log.info("shutdown: draining; not ready")

    async def shutdown(self) -> None:
        """Stop accepting, drain in-flight streams (bounded), close everything."""
        self.begin_drain()
        for server in self._servers:
            server.close()
        for consumer in self.udp_consumers:
            await consumer.close()
        if self.capture is not None:
            await self.capture.close()
        self.session.stop_accepting()
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            log.info(
                "shutdown: waiting for in-flight streams",
                extra=kv(streams=len(pending), grace=f"{self.config.shutdown_grace:g}s"),
            )
            _, still = await asyncio.wait(pending, timeout=self.config.shutdown_grace)
            if still:
                # Reset what is left with AGENT_GONE: the peers end their side at
                # once instead of waiting out a resume window for us.
                ended = self.session.end_streams()
                log.info("shutdown: grace over; ending streams", extra=kv(streams=ended))
                _, still = await asyncio.wait(still, timeout=2.0)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=2.0)
        if self._p2p_task is not None:
            self._p2p_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._p2p_task
        # Goodbye first (close code AGENT_GONE), then stop the loop that would reconnect.
        await self.session.close()
        if self._session_task is not None:
            self._session_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._session_task
        if self.p2p is not None:
            self.p2p.close()  # the shared socket outlives the relay connection on it
        self._stopped.set()

    # -- tasks ------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guard(coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent task failed", extra=kv(task=name))

    def _on_incoming(self, stream: Stream) -> None:
        self._spawn(
            handle_incoming_stream(
                self.session,
                stream,
                self.config.session.services,
                mode_wait=self.config.provider_mode_wait,
                udp_services=self.config.udp_services,
                udp_drops=self.udp_drops,
                udp_router=self.udp_router,
                local_backends=self.local_backends,
            ),
            "incoming",
        )

    async def _on_local_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, service: str
    ) -> None:
        local = SocketStream(reader, writer)
        log.debug("intercept: new conn accepted", extra=kv(svc=service, orig_dst=local.sockname))
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._guard(
                handle_consumer_connection(
                    self.session, local, service, mode_wait=self.config.consumer_mode_wait
                ),
                "consumer",
            )
        except asyncio.CancelledError:
            # Shutdown grace ran out. asyncio.start_server's callback task must
            # not end cancelled: Python 3.11 would print a traceback for it.
            local.abort()
        finally:
            self._tasks.discard(task)
            await local.aclose()

    def _on_intercepted(self, local: SocketStream, service: str, orig_dst: tuple[str, int]) -> None:
        """A tproxy connection, already mapped from its VIP to ``service``."""
        self._spawn(self._serve_intercepted(local, service), "consumer")

    async def _serve_intercepted(self, local: SocketStream, service: str) -> None:
        try:
            await handle_consumer_connection(
                self.session, local, service, mode_wait=self.config.consumer_mode_wait
            )
        finally:
            await local.aclose()

    async def _on_fatal(self, reason: str) -> None:
        log.error("expose", extra=kv(err=reason))
        if self.config.exit_on_refusal:
            self.refused = RelayRefused(reason)
            self._stopped.set()

    async def _on_refused(self, refused: RelayRefused) -> bool:
        """The relay refused us before we were ever accepted: exit 1, or keep trying."""
        if not self.config.exit_on_refusal:
            return False
        log.error("dial relay: refused", extra=kv(relay=refused.address, err=str(refused)))
        self.refused = refused
        self._stopped.set()
        return True
