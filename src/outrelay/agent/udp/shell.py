"""UDP over a relay stream, asyncio shell (issue 19 item 2; framing in :mod:`.core`).

* :class:`DatagramStream` presents one UDP flow as a :class:`~outrelay.transport.Stream`
  of framed datagrams, so the consumer and provider roles (open, reject, resume,
  forward mode, bridge) carry it unchanged. Its inbound queue is bounded: a flood
  drops datagrams (counted) instead of growing memory. UDP has no half-close: the
  flow's end in either direction (idle expiry, the peer's EOF) ends both.
* :class:`UdpConsumer` (``--consume-udp svc@host:port``): one bound socket; each client
  source address is one flow and one relay stream, idle flows expire.
* :func:`open_udp_backend` (``--expose-udp svc=host:port``): per flow a connected
  UDP socket to the backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from outrelay.agent.udp.core import (
    CTRL_DATAGRAMS_REACH_ME,
    DGRAM_HEADER,
    KIND_DATA,
    KIND_PROBE,
    DatagramDeframer,
    FlowTable,
    FramingError,
    control_frame,
    frame_datagram,
)
from outrelay.observe import kv
from outrelay.transport import ClosedResourceError, Stream

__all__ = [
    "DATAGRAM_QUEUE",
    "FLOW_IDLE",
    "MAX_FLOWS",
    "DatagramLink",
    "DatagramRouter",
    "DatagramStream",
    "UdpConsumer",
    "UdpDrops",
    "open_udp_backend",
]

log = logging.getLogger("outrelay.agent.udp")

DATAGRAM_QUEUE = 512
"""Datagrams queued per flow towards the relay stream; beyond this they are dropped."""
QUEUE_BYTES = 256 * 1024
"""Payload bytes queued per flow, at most (large datagrams reach it before the count):
with ``MAX_FLOWS`` flows the queues hold at most 256 MiB however hard the flood."""
FLOW_IDLE = 60.0
"""Seconds without a datagram either way before a flow (and its stream) ends."""
MAX_FLOWS = 1024
"""Flows per ``--consume-udp`` socket; a new client beyond this is dropped."""
SEND_BUFFER_MAX = 256 * 1024
"""Bytes the kernel refused that asyncio may hold per UDP socket before we drop."""
SOCKET_RCVBUF = 1 << 20
"""SO_RCVBUF asked for each UDP socket (the kernel caps it at ``net.core.rmem_max``):
asyncio reads one datagram per readiness event, so bursts wait in the kernel."""


def _enlarge_rcvbuf(transport: asyncio.DatagramTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RCVBUF)


def _buffered(transport: asyncio.DatagramTransport) -> int:
    """Bytes asyncio holds for a UDP socket the kernel would not take yet."""
    size = getattr(transport, "get_write_buffer_size", None)  # not in the ABC's stubs
    return int(size()) if size is not None else 0


class UdpDrops:
    """Dropped-datagram counters, by reason (read by ``/metrics``)."""

    def __init__(self) -> None:
        self.by_reason: collections.Counter[str] = collections.Counter()

    def drop(self, reason: str, n: int = 1) -> None:
        self.by_reason[reason] += n


PROBE_INTERVAL = 0.5
PROBES = 8
"""QUIC DATAGRAM probes sent per flow (one per ``PROBE_INTERVAL``) until the peer says
they reach it; without an answer the flow stays on its stream."""


class DatagramLink(Protocol):
    """What a flow needs of the relay session for QUIC DATAGRAM frames."""

    @property
    def link_generation(self) -> int: ...

    def send_datagram(self, data: bytes) -> bool: ...


class DatagramRouter:
    """QUIC DATAGRAM frames of the relay link <-> flows, by relay stream id.

    Our relay forwards a DATAGRAM frame from one agent to the other agent of the
    stream's pair (``relay.control``); a reference relay, the TLS+yamux fallback or a
    pair across relays drops it, and the flow then stays on its stream.
    """

    def __init__(self, link: DatagramLink) -> None:
        self.link = link
        self._flows: dict[int, DatagramStream] = {}
        self.received = 0
        self.sent = 0

    def register(self, sid: int, flow: DatagramStream) -> None:
        self._flows[sid] = flow

    def unregister(self, sid: int, flow: DatagramStream) -> None:
        if self._flows.get(sid) is flow:
            del self._flows[sid]

    def send(self, sid: int, kind: int, payload: bytes) -> bool:
        ok = self.link.send_datagram(DGRAM_HEADER.pack(sid, kind) + payload)
        if ok and kind == KIND_DATA:
            self.sent += 1
        return ok

    def received_datagram(self, data: bytes) -> None:
        """From the relay link (``RelaySession.datagram_handler``)."""
        if len(data) < DGRAM_HEADER.size:
            return
        sid, kind = DGRAM_HEADER.unpack_from(data)
        flow = self._flows.get(sid)
        if flow is not None:
            self.received += kind == KIND_DATA
            flow.on_link_datagram(kind, data[DGRAM_HEADER.size :])


class DatagramStream(Stream):
    """One UDP flow as a stream of length-prefixed datagrams.

    ``send`` is called with each whole datagram the relay side writes; it must not
    block (a UDP ``sendto``). :meth:`deliver` queues a datagram from the UDP side.
    """

    def __init__(
        self,
        send: Callable[[bytes], None],
        drops: UdpDrops,
        *,
        queue_max: int = DATAGRAM_QUEUE,
        peername: tuple[str, int] | None = None,
        on_activity: Callable[[], None] | None = None,
        router: DatagramRouter | None = None,
    ) -> None:
        self._send = send
        self._drops = drops
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._queue_max = queue_max
        self._deframer = DatagramDeframer()
        self._wake = asyncio.Event()
        self._input_closed = False
        self._closed = False
        self._on_activity = on_activity
        self.peername = peername
        self.stream_id = -1
        self._router_offered = router
        self._router: DatagramRouter | None = None
        self._sid = 0
        self._direct_gen: int | None = None
        """The link generation on which the peer said our probes reach it."""
        self._ack_due = False
        self._probes_left = 0
        self._probe_timer: asyncio.TimerHandle | None = None

    # -- QUIC DATAGRAM frames ---------------------------------------------------------

    def attach(self, sid: int) -> None:
        """The flow's relay stream (splice mode) is ``sid``: try QUIC DATAGRAM frames
        beside it, if the flow was given a router."""
        router = self._router_offered
        if router is None or sid == 0 or self._closed:
            return
        self._router, self._sid = router, sid
        router.register(sid, self)
        self._probes_left = PROBES
        self._probe()

    def _probe(self) -> None:
        self._probe_timer = None
        router = self._router
        if router is None or self._input_closed or self._direct_gen is not None:
            return
        if self._probes_left <= 0:
            return
        self._probes_left -= 1
        router.send(self._sid, KIND_PROBE, b"")
        self._probe_timer = asyncio.get_running_loop().call_later(PROBE_INTERVAL, self._probe)

    def on_link_datagram(self, kind: int, payload: bytes) -> None:
        """A DATAGRAM frame for this flow from the peer agent, via the relay."""
        if kind == KIND_PROBE:
            if not self._input_closed:
                self._ack_due = True  # answered in-band, on the stream
                self._wake.set()
                if self._direct_gen is None and self._probes_left > 0:
                    # The peer's path works now: probe ours at once rather than at the
                    # next tick (its first probes may have come before our attach).
                    if self._probe_timer is not None:
                        self._probe_timer.cancel()
                    self._probe()
        elif kind == KIND_DATA and not self._closed:
            self._send(payload)
            if self._on_activity is not None:
                self._on_activity()

    def _send_direct(self, datagram: bytes) -> bool:
        router, gen = self._router, self._direct_gen
        if router is None or gen is None:
            return False
        if router.link.link_generation != gen:
            # A new relay link (resume): the path must be proven again.
            self._direct_gen = None
            self._probes_left = PROBES
            self._probe()
            return False
        return router.send(self._sid, KIND_DATA, datagram)

    @property
    def direct(self) -> bool:
        """True while this side sends its datagrams as QUIC DATAGRAM frames."""
        return self._direct_gen is not None

    # -- the UDP side -------------------------------------------------------------

    def deliver(self, datagram: bytes) -> None:
        """Queue a datagram for the relay stream; drop it if the queue is full."""
        if self._input_closed:
            self._drops.drop("closed")
            return
        if self._direct_gen is not None and self._send_direct(datagram):
            return
        if len(self._queue) >= self._queue_max or self._queued + len(datagram) > QUEUE_BYTES:
            self._drops.drop("queue_full")
            return
        self._queue.append(datagram)
        self._queued += len(datagram)
        self._wake.set()

    def close_input(self) -> None:
        """End the flow: the reader gets EOF once the queue is drained."""
        self._input_closed = True
        self._wake.set()

    # -- Stream -------------------------------------------------------------------

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        while not self._queue and not self._ack_due:
            if self._input_closed or self._closed:
                if self._closed:
                    raise ClosedResourceError("datagram flow closed")
                return b""
            self._wake.clear()
            await self._wake.wait()
        out = bytearray()
        if self._ack_due:
            self._ack_due = False
            out += control_frame(CTRL_DATAGRAMS_REACH_ME)
        while self._queue and (not out or len(out) + 2 + len(self._queue[0]) <= max_bytes):
            datagram = self._queue.popleft()
            self._queued -= len(datagram)
            try:
                out += frame_datagram(datagram)
            except FramingError:  # pragma: no cover - UDP payloads fit in 65535
                self._drops.drop("too_large")
        if self._on_activity is not None:
            self._on_activity()
        return bytes(out)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ClosedResourceError("datagram flow closed")
        deframer = self._deframer
        datagrams = deframer.feed(data)
        if deframer.controls:
            if CTRL_DATAGRAMS_REACH_ME in deframer.controls and self._router is not None:
                if self._direct_gen is None:
                    log.info("udp flow: QUIC datagrams on", extra=kv(stream_id=self._sid))
                self._direct_gen = self._router.link.link_generation
            deframer.controls.clear()
        for datagram in datagrams:
            self._send(datagram)
        if datagrams and self._on_activity is not None:
            self._on_activity()

    async def send_eof(self) -> None:
        # No half-close in UDP: the other side's end is the flow's end.
        self.close_input()

    def abort(self, error_code: int = 0) -> None:
        self._closed = True
        self._input_closed = True
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        if self._router is not None:
            self._router.unregister(self._sid, self)
        self._queue.clear()
        self._queued = 0
        self._wake.set()

    async def aclose(self) -> None:
        self.abort()

    @property
    def unsent_bytes(self) -> int:
        return 0


class _BackendProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.stream: DatagramStream | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.stream is not None:
            self.stream.deliver(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp backend error", extra=kv(err=str(exc)))


class _BackendStream(DatagramStream):
    """A provider's flow: closing it closes its connected socket."""

    transport: asyncio.DatagramTransport | None = None

    def abort(self, error_code: int = 0) -> None:
        super().abort(error_code)
        if self.transport is not None:
            self.transport.close()

    async def send_eof(self) -> None:
        await super().send_eof()
        if self.transport is not None:
            self.transport.close()


async def open_udp_backend(
    host: str, port: int, drops: UdpDrops, router: DatagramRouter | None = None
) -> DatagramStream:
    """A connected UDP socket to ``host:port`` as a :class:`DatagramStream`.

    Raises:
        OSError: the socket could not be created or connected.
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _BackendProtocol, remote_addr=(host, port)
    )
    _enlarge_rcvbuf(transport)

    def send(datagram: bytes) -> None:
        if transport.is_closing():
            drops.drop("closed")
        elif _buffered(transport) > SEND_BUFFER_MAX:
            drops.drop("send_buffer_full")
        else:
            transport.sendto(datagram)

    stream = _BackendStream(send, drops, peername=(host, port), router=router)
    stream.transport = transport
    protocol.stream = stream
    return stream


FlowHandler = Callable[[DatagramStream], Coroutine[Any, Any, None]]
"""Carries one flow to the service (the consumer role); returns when the flow is over."""


class _ConsumerProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpConsumer) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner.received(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp consumer socket error", extra=kv(err=str(exc)))


class UdpConsumer:
    """One ``--consume-udp`` socket: client address -> flow -> relay stream."""

    def __init__(
        self,
        service: str,
        handler: FlowHandler,
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        drops: UdpDrops,
        *,
        idle_timeout: float = FLOW_IDLE,
        max_flows: int = MAX_FLOWS,
        queue_max: int = DATAGRAM_QUEUE,
        router: DatagramRouter | None = None,
    ) -> None:
        self.service = service
        self._router = router
        self._handler = handler
        self._spawn = spawn
        self._drops = drops
        self._queue_max = queue_max
        self.flows: FlowTable[DatagramStream] = FlowTable(idle_timeout, max_flows)
        self.expired = 0
        """Flows ended by idle expiry."""
        self.opened = 0
        """Flows started (one relay stream each)."""
        self._transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind the socket and start the idle sweeper; returns the bound address.

        Raises:
            OSError: the bind failed.
        """
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ConsumerProtocol(self), local_addr=(host or "0.0.0.0", port)
        )
        self._transport = transport
        _enlarge_rcvbuf(transport)
        sock = transport.get_extra_info("sockname")
        self.bound = (str(sock[0]), int(sock[1]))
        self._sweeper = loop.create_task(self._sweep(), name=f"udp-sweep-{self.service}")
        return self.bound

    def received(self, data: bytes, addr: tuple[str, int]) -> None:
        now = asyncio.get_running_loop().time()
        flow = self.flows.get(addr)
        if flow is None:
            if self.flows.full():
                self._drops.drop("too_many_flows")
                return
            flow = self._new_flow(addr, now)
        self.flows.touch(addr, now)
        flow.deliver(data)

    def _new_flow(self, addr: tuple[str, int], now: float) -> DatagramStream:
        transport = self._transport
        assert transport is not None
        drops = self._drops

        def send(datagram: bytes) -> None:
            if transport.is_closing():
                drops.drop("closed")
            elif _buffered(transport) > SEND_BUFFER_MAX:
                drops.drop("send_buffer_full")
            else:
                transport.sendto(datagram, addr)

        loop = asyncio.get_running_loop()
        flow = DatagramStream(
            send,
            drops,
            queue_max=self._queue_max,
            peername=addr,
            on_activity=lambda: self.flows.touch(addr, loop.time()),
            router=self._router,
        )
        self.flows.add(addr, flow, now)
        self.opened += 1
        log.debug("udp flow opened", extra=kv(svc=self.service, client=f"{addr[0]}:{addr[1]}"))
        self._spawn(self._carry(addr, flow), "udp-consumer")
        return flow

    async def _carry(self, addr: tuple[str, int], flow: DatagramStream) -> None:
        try:
            await self._handler(flow)
        finally:
            flow.abort()
            if self.flows.get(addr) is flow:
                self.flows.remove(addr)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(1.0, max(0.05, self.flows.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            for addr, flow in self.flows.expire(loop.time()):
                self.expired += 1
                log.info(
                    "udp flow idle; closing its stream",
                    extra=kv(svc=self.service, client=f"{addr[0]}:{addr[1]}"),
                )
                flow.close_input()

    async def close(self) -> None:
        """Stop receiving; end every flow."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._transport is not None:
            self._transport.close()
        for _, flow in list(self.flows):
            flow.close_input()
