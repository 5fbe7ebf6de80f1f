"""The public Python API: reach and offer OutRelay services without a sidecar process.

Semver-stable: everything in :data:`__all__` (re-exported from :mod:`outrelay`) keeps
its signature and meaning within a major version. It is a thin facade over the agent
(:mod:`outrelay.agent`): the same relay session, the same consumer and provider code
paths as ``outrelay-agent`` (spec 03 §3.4-§3.6), so a stream opened here pipelines,
resumes across relay restarts (spec 03 §7) and closes exactly like one the sidecar
carries. Example::

    import asyncio, outrelay

    async def main() -> None:
        identity = outrelay.Identity.from_files("agent.crt", "agent.key", "ca.crt")
        async with outrelay.Agent(relays=["127.0.0.1:7443"], identity=identity) as agent:
            reader, writer = await agent.open_connection("echo")
            writer.write(b"hello")
            await writer.drain()
            writer.write_eof()
            print(await reader.read())
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())

How a stream is carried: each :meth:`Agent.open_connection` hands one end of a private
``socketpair`` to the agent's consumer (which bridges it to the relay stream, with the
resume ring); the caller gets asyncio streams on the other end, so ``drain()`` is real
backpressure from the relay path. :meth:`Agent.serve` runs the handler behind a
loopback listener that only the agent dials (127.0.0.1, an ephemeral port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from outrelay.agent.agent import Agent as _SidecarAgent
from outrelay.agent.agent import AgentConfig
from outrelay.agent.consumer import CONSUMER_MODE_WAIT, handle_consumer_connection
from outrelay.agent.session import OPEN_TIMEOUT, SessionConfig
from outrelay.cliutil import parse_host_port
from outrelay.observe import kv
from outrelay.orp import StreamRejected
from outrelay.pki import first_uri_san, load_certificates
from outrelay.transport import QuicTlsConfig, SocketStream, Stream, TransportError

__all__ = [
    "Agent",
    "AgentClosed",
    "Handler",
    "Identity",
    "OpenFailed",
    "OpenRejected",
    "OutRelayError",
    "RelayUnreachable",
]

log = logging.getLogger("outrelay.api")

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""``serve()``'s per-stream callback: ``async def handler(reader, writer)``."""

CONNECT_TIMEOUT = 15.0
"""Default bound on ``async with Agent(...)`` reaching a relay (HELLO_ACK)."""
OPEN_ANSWER_MARGIN = 10.0
"""Beyond the consumer's own mode wait, how long an open may take to be answered."""
STREAM_LIMIT = 64 * 1024
"""asyncio ``StreamReader`` limit (buffer high-water mark) on the caller's side."""
IN_PROCESS = "in-process"
"""The ``local_addr`` a ``serve()`` registration reports to the relay (no network backend)."""


class OutRelayError(Exception):
    """Base class of every error the API raises."""


class RelayUnreachable(OutRelayError):
    """No relay accepted this agent within the timeout (or a relay refused it)."""


class AgentClosed(OutRelayError):
    """The :class:`Agent` is not running (not entered yet, or already closed)."""


class OpenFailed(OutRelayError):
    """An open failed before the relay answered (no relay link, link lost)."""


class OpenRejected(OutRelayError):
    """The relay or the provider refused the open: ``STREAM_REJECT{code, reason}``.

    Codes (spec 01 "Reject codes"): 404 no such service / no handler, 403 denied by
    policy, 502 the provider's backend is unreachable, 503 no provider reachable.
    """

    def __init__(self, service: str, code: int, reason: str) -> None:
        super().__init__(f"open {service!r} rejected: {code} {reason}")
        self.service = service
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """An agent's mTLS identity: certificate, private key and the CA that signs relays.

    ``uri`` is the agent's ``outrelay://<tenant>/agent/<uuid>`` identity, sent in HELLO;
    :meth:`from_files` reads it from the certificate's first URI SAN (spec 02 §2.2).
    """

    cert: Path
    key: Path
    ca: Path
    uri: str

    @classmethod
    def from_files(
        cls, cert: str | Path, key: str | Path, ca: str | Path, *, uri: str | None = None
    ) -> Identity:
        """Load an identity; ``uri`` defaults to the certificate's first URI SAN.

        Raises:
            OutRelayError: a file cannot be read, or the certificate carries no URI SAN
                and ``uri`` was not given.
        """
        cert, key, ca = Path(cert), Path(key), Path(ca)
        if uri is None:
            try:
                leaf = load_certificates(cert)[0]
            except Exception as exc:
                raise OutRelayError(f"cannot read certificate {cert}: {exc}") from exc
            uri = first_uri_san(leaf)
            if uri is None:
                raise OutRelayError(f"{cert}: no URI SAN; pass uri=")
        for path in (key, ca):
            if not path.is_file():
                raise OutRelayError(f"no such file: {path}")
        return cls(cert, key, ca, uri)


def _parse_relay(text: str) -> tuple[str, int]:
    return parse_host_port(text, what="relay address", port_zero=False)


@dataclass
class _Served:
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Agent:
    """An OutRelay agent inside this process; use as ``async with Agent(...) as agent``.

    Args:
        relays: relay endpoints ``"host:port"`` (QUIC), tried in order (spec 03 §2.1).
        identity: this agent's :class:`Identity`.
        connect_timeout: how long entering the context waits for a relay to accept us.
        resume_window: how long a stream broken by a relay restart waits to be resumed.
        transport: ``"auto"`` (QUIC, TCP fallback), ``"quic"`` or ``"tcp"``.
        relays_tcp: TLS+yamux fallback endpoints ``"host:port"``.
        server_name: the TLS name the relay certificate must carry (as ``--server-name``).

    Entering connects (or raises :class:`RelayUnreachable`); leaving closes every
    stream (in-flight ones get ``shutdown_grace`` seconds), unregisters the services
    and says goodbye to the relay.
    """

    def __init__(
        self,
        relays: Sequence[str],
        identity: Identity,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        resume_window: float | None = None,
        transport: str = "auto",
        relays_tcp: Sequence[str] = (),
        server_name: str = "localhost",
        shutdown_grace: float = 5.0,
    ) -> None:
        if not relays and not relays_tcp:
            raise ValueError("at least one relay address is needed")
        extra: dict[str, Any] = {}
        if resume_window is not None:
            extra["resume_window"] = resume_window
        tls = QuicTlsConfig(
            str(identity.cert), str(identity.key), str(identity.ca), server_name=server_name
        )
        session = SessionConfig(
            relays=tuple(_parse_relay(r) for r in relays),
            uri=identity.uri,
            tls=tls,
            services={},
            relays_tcp=tuple(_parse_relay(r) for r in relays_tcp),
            transport=transport,
            **extra,
        )
        self.identity = identity
        self.connect_timeout = connect_timeout
        self._config = AgentConfig(
            session=session, shutdown_grace=shutdown_grace, exit_on_refusal=True
        )
        self._agent: _SidecarAgent | None = None
        self._closed = False
        self._served: dict[str, _Served] = {}
        self._streams: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to a relay (what ``async with`` does on entry).

        Raises:
            RelayUnreachable: no relay accepted us within ``connect_timeout``, or one
                refused this identity.
            AgentClosed: the agent was already closed.
        """
        if self._closed:
            raise AgentClosed("agent is closed")
        if self._agent is not None:
            return
        agent = _SidecarAgent(self._config)
        await agent.start()
        self._agent = agent
        connected = asyncio.ensure_future(agent.session.connected.wait())
        stopped = asyncio.ensure_future(agent.wait_stopped())
        try:
            await asyncio.wait(
                {connected, stopped}, timeout=self.connect_timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            connected.cancel()
            stopped.cancel()
        if not agent.session.connected.is_set():
            why = (
                str(agent.refused)
                if agent.refused is not None
                else f"no relay answered within {self.connect_timeout:g}s"
            )
            await self.close()
            raise RelayUnreachable(f"cannot reach a relay ({', '.join(self._relays())}): {why}")

    def _relays(self) -> list[str]:
        s = self._config.session
        return [f"{h}:{p}" for h, p in (*s.relays, *s.relays_tcp)]

    async def close(self) -> None:
        """Close every stream and listener, then the relay connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent.shutdown()
        for task in list(self._streams):
            task.cancel()
        if self._streams:
            await asyncio.wait(self._streams, timeout=2.0)
        for served in self._served.values():
            for task in list(served.tasks):
                task.cancel()
            if served.tasks:
                await asyncio.wait(served.tasks, timeout=2.0)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def uri(self) -> str:
        """This agent's identity URI."""
        return self.identity.uri

    def _running(self) -> _SidecarAgent:
        if self._closed or self._agent is None:
            raise AgentClosed("agent is closed" if self._closed else "agent is not started")
        return self._agent

    # -- consumer -------------------------------------------------------------------------

    async def open_connection(
        self, service: str, *, limit: int = STREAM_LIMIT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a stream to ``service``, like :func:`asyncio.open_connection`.

        Returns once the relay accepted the open (spec 03 §3.5). ``writer.write_eof()``
        half-closes (the provider's backend reads EOF); ``writer.close()`` ends the
        stream as the application closing (``APPLICATION_CLOSED``). Across a relay
        restart the stream stalls and resumes (within the resume window) without data
        loss, as in the sidecar.

        Raises:
            OpenRejected: ``STREAM_REJECT`` (``.code``, ``.reason``): 404, 403, 502, 503.
            OpenFailed: no relay link (reconnecting too long) or the link was lost.
            AgentClosed: the agent is not running.
        """
        sock = await self.open_socket(service)
        try:
            return await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise

    async def open_socket(self, service: str) -> socket.socket:
        """Like :meth:`open_connection`, but return a plain (non-blocking) socket.

        The socket is one end of a private ``socketpair`` whose other end the agent
        carries; ``shutdown(SHUT_WR)`` half-closes, ``close()`` ends the stream. Used by
        :mod:`outrelay.sync`. Raises as :meth:`open_connection` does.
        """
        agent = self._running()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        try:
            local_reader, local_writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[str | StreamRejected | Exception] = loop.create_future()

        def on_answer(answer: str | StreamRejected | Exception) -> None:
            if not outcome.done():
                outcome.set_result(answer)

        local = SocketStream(local_reader, local_writer)

        async def carry() -> None:
            try:
                await handle_consumer_connection(agent.session, local, service, on_answer=on_answer)
            finally:
                await local.aclose()
                if not outcome.done():
                    outcome.set_result(OpenFailed("stream ended before the relay answered"))

        task = loop.create_task(carry(), name=f"api-open-{service}")
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)
        bound = OPEN_TIMEOUT + CONSUMER_MODE_WAIT + OPEN_ANSWER_MARGIN
        try:
            async with asyncio.timeout(bound):
                answer = await asyncio.shield(outcome)
        except BaseException as exc:
            theirs.close()
            task.cancel()
            if isinstance(exc, TimeoutError):
                raise OpenFailed(f"open {service!r}: no answer within {bound:g}s") from exc
            raise
        if isinstance(answer, StreamRejected):
            theirs.close()
            raise OpenRejected(service, answer.code, answer.reason)
        if isinstance(answer, Exception):
            theirs.close()
            if isinstance(answer, OutRelayError):
                raise answer
            raise OpenFailed(f"open {service!r}: {answer}") from answer
        return theirs

    # -- provider -------------------------------------------------------------------------

    async def serve(self, service: str, handler: Handler) -> None:
        """Expose ``service``: every incoming stream runs ``await handler(reader, writer)``.

        Returns once the relay acknowledged the registration (REGISTER_ACK); the
        service stays exposed (re-registered on every reconnect) until :meth:`close`.
        The handler's ``writer.close()`` (or returning) ends the stream (the consumer
        reads EOF); ``write_eof()`` half-closes. An exception in the handler is logged
        (logger ``outrelay.api``) and aborts that stream (the consumer sees a reset).

        The handler is reached inside this process (each stream is one end of a private
        ``socketpair``), so no port is opened: only the relay's authenticated streams reach
        it.

        Raises:
            OutRelayError: the relay refused the registration.
            AgentClosed: the agent is not running.
        """
        self._running()
        if service in self._served:
            raise ValueError(f"service {service!r} is already exposed")
        served = _Served()
        self._served[service] = served

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except asyncio.CancelledError:
                writer.transport.abort()
            except Exception:
                log.exception("serve: handler failed; stream aborted", extra=kv(svc=service))
                writer.transport.abort()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        async def connect() -> Stream:
            """One incoming stream: the agent bridges one end, the handler gets the other."""
            ours, theirs = socket.socketpair()
            try:
                reader, writer = await asyncio.open_connection(sock=ours)
                handler_reader, handler_writer = await asyncio.open_connection(sock=theirs)
            except BaseException:
                ours.close()
                theirs.close()
                raise
            task = asyncio.get_running_loop().create_task(on_conn(handler_reader, handler_writer))
            served.tasks.add(task)
            task.add_done_callback(served.tasks.discard)
            return SocketStream(reader, writer)

        self._running().local_backends[service] = connect
        await self._register(service, IN_PROCESS)

    async def expose(self, service: str, target: str) -> None:
        """Expose ``service`` as a bridge to the TCP backend ``target`` (``host:port``).

        What ``outrelay-agent --expose service=target`` does: each incoming stream dials
        ``target`` (a dial failure rejects the open with 502).

        Raises:
            ValueError: ``target`` is not ``host:port``.
            OutRelayError: the relay refused the registration.
            AgentClosed: the agent is not running.
        """
        self._running()
        parse_host_port(target, what="expose target", port_zero=False)
        if service in self._served:
            raise ValueError(f"service {service!r} is already exposed")
        self._served[service] = _Served()
        await self._register(service, target)

    async def _register(self, service: str, target: str) -> None:
        agent = self._running()
        try:
            await agent.session.add_service(service, target)
        except TimeoutError as exc:
            raise OutRelayError(f"register {service!r}: {exc}") from exc
        except TransportError as exc:
            # The link died meanwhile; the next link registers the service.
            log.info("register deferred to the next link", extra=kv(svc=service, err=str(exc)))
