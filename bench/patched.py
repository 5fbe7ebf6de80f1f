"""Run the relay or the agent with optional runtime patches or cProfile.

    python -m bench.patched [--patch NAME,...] [--cprofile OUT] relay|agent -- ARGS...

The benchmark must not edit ``src/``; candidate optimisations are measured by
monkeypatching them into the process here, side by side with the unpatched
code in the same run (``python -m bench --only experiments``). Each patch is a
proposal for the lead, with its before/after ratio in BENCHMARKS.md:

``coalesce``
    :meth:`outrelay.transport.quic.QuicStream.receive_some` returns every
    buffered chunk up to ``max_bytes`` joined, instead of one QUIC frame
    (~1.3 kB) per call. Each splice iteration then moves up to 64 KiB: one
    ``send()`` to the backend socket, one ``send_stream_data`` on the relay,
    instead of one per packet.
``nocopy``
    :meth:`QuicStream.send_all` hands aioquic the memoryview slice instead of
    a ``bytes`` copy of it (aioquic appends it to a bytearray either way).
``batchrx``
    Drain the UDP socket per wake-up (up to 64 datagrams) and transmit once
    per connection per batch, instead of one datagram and one ``transmit()``
    per event-loop iteration.
``gso``
    Send runs of equal-size datagrams with one ``sendmsg`` (Linux UDP GSO).
``fastdead``
    Agents declare a silent relay dead after ``max(2 s, 4 x PTO)`` while
    bytes are in flight (checked every 0.25 s) instead of 6.5 s checked on
    the 3 s keep-alive tick (resume scenario).
``streams1k``
    1,100 concurrent peer-opened streams per QUIC connection instead of 100
    (concurrency scenario).
``ring4k``
    Resume rings allocated at 4 KiB instead of 64 KiB (concurrency scenario).

``uvloop``
    Run the entry point on uvloop's event loop instead of asyncio's (the
    ``backends`` scenario: agents on qh3 and on the TCP transport).

``--cprofile OUT`` runs the entry point under :mod:`cProfile` and writes the
stats to OUT when the process exits (SIGTERM leads to a clean exit).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

PATCHES: dict[str, Callable[[], None]] = {}


def _patch(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        PATCHES[name] = fn
        return fn

    return register


@_patch("coalesce")
def _coalesce() -> None:
    from outrelay.transport import quic

    original = quic.QuicStream.receive_some

    async def receive_some(self: Any, max_bytes: int = 65536) -> bytes:
        data: bytes = await original(self, max_bytes)
        chunks = self._chunks
        if not data or not chunks or len(data) + len(chunks[0]) > max_bytes:
            return data
        # The change: also hand over every further whole chunk that fits.
        parts = [data]
        size = len(data)
        while chunks and size + len(chunks[0]) <= max_bytes:
            part = chunks.popleft()
            parts.append(part)
            size += len(part)
            self._buffered -= len(part)
            self._consumed += len(part)
        self._conn._credit_consumed(self)
        return b"".join(parts)

    quic.QuicStream.receive_some = receive_some  # type: ignore[method-assign]


@_patch("nocopy")
def _nocopy() -> None:
    from outrelay.transport import quic
    from outrelay.transport.base import BusyResourceError

    async def send_all(self: Any, data: bytes | bytearray | memoryview) -> None:
        if self._writing:
            raise BusyResourceError("another task is writing this stream")
        self._writing = True
        try:
            view = memoryview(data).cast("B")
            while True:
                self._check_writable()
                room = quic.SEND_BUFFER - self.unsent_bytes
                if room <= 0:
                    self._send_ready.clear()
                    self._conn._want_send.add(self)
                    await self._send_ready.wait()
                    continue
                chunk = view[:room]
                self._conn._quic.send_stream_data(self.stream_id, chunk, False)  # no bytes()
                self._conn._transmit_soon()
                view = view[len(chunk) :]
                if not view:
                    return
        finally:
            self._writing = False

    quic.QuicStream.send_all = send_all  # type: ignore[method-assign]


@_patch("batchrx")
def _batchrx() -> None:
    """Read every queued datagram per wake-up, transmit once per connection per batch.

    asyncio's datagram transport reads one datagram per event-loop iteration
    and aioquic's protocol runs ``transmit()`` (build packets, re-arm the
    timer) after each. Here the socket is drained (at most 64
    datagrams) and each connection that received something transmits once at
    the end. In src this would be a small reader of our own in
    ``transport/quic.py`` (``loop.add_reader`` + ``recvfrom`` loop) instead of
    patching asyncio's private transport.
    """
    import asyncio.selector_events as sel

    from outrelay.transport import quic

    batch_size = 64
    pending: dict[Any, None] = {}
    state = {"batching": False}
    original_transmit = quic._Protocol.transmit

    def transmit(self: Any) -> None:
        if state["batching"]:
            pending[self] = None  # once, at the end of the batch
        else:
            original_transmit(self)

    def _read_ready(self: Any) -> None:
        if self._conn_lost:
            return
        state["batching"] = True
        try:
            for _ in range(batch_size):
                try:
                    data, addr = self._sock.recvfrom(self.max_size)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._protocol.error_received(exc)
                    break
                self._protocol.datagram_received(data, addr)
        finally:
            state["batching"] = False
            protocols = list(pending)
            pending.clear()
            for protocol in protocols:
                protocol.transmit()

    quic._Protocol.transmit = transmit  # type: ignore[method-assign]
    sel._SelectorDatagramTransport._read_ready = _read_ready  # type: ignore[method-assign]


@_patch("gso")
def _gso() -> None:
    """Send each run of equal-size datagrams with one ``sendmsg`` (Linux UDP GSO).

    aioquic's ``transmit()`` makes one ``sendto`` system call per datagram.
    With ``UDP_SEGMENT`` the kernel splits one buffer into datagrams of the
    given size (the last may be shorter), up to 64 per call.
    """
    import socket
    import struct

    from aioquic.asyncio.protocol import QuicConnectionProtocol

    udp_segment = getattr(socket, "UDP_SEGMENT", 103)
    max_segments = 64

    def transmit(self: Any) -> None:
        self._transmit_task = None
        transport = self._transport
        sock = getattr(transport, "_sock", None)
        datagrams = self._quic.datagrams_to_send(now=self._loop.time())
        if sock is None or getattr(transport, "_buffer", None):
            for data, addr in datagrams:
                transport.sendto(data, addr)
        else:
            run: list[bytes] = []
            run_addr: Any = None

            def flush() -> None:
                if len(run) == 1:
                    transport.sendto(run[0], run_addr)
                elif run:
                    cmsg = [(socket.SOL_UDP, udp_segment, struct.pack("@H", len(run[0])))]
                    try:
                        sock.sendmsg([b"".join(run)], cmsg, 0, run_addr)
                    except OSError:
                        for item in run:
                            transport.sendto(item, run_addr)
                run.clear()

            for data, addr in datagrams:
                if run and (
                    addr != run_addr
                    or len(data) > len(run[0])
                    or len(run[-1]) < len(run[0])
                    or len(run) >= max_segments
                ):
                    flush()
                run.append(data)
                run_addr = addr
            flush()
        timer_at = self._quic.get_timer()
        if self._timer is not None and self._timer_at != timer_at:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and timer_at is not None:
            self._timer = self._loop.call_at(timer_at, self._handle_timer)
        self._timer_at = timer_at

    QuicConnectionProtocol.transmit = transmit  # type: ignore[method-assign]


@_patch("fastdead")
def _fastdead() -> None:
    """Declare a silent relay dead sooner when we are waiting for acknowledgements.

    Today the silence check (``PEER_SILENCE_TIMEOUT`` 6.5 s) only runs on the
    3 s keep-alive tick, so a relay that vanishes is noticed 6.5-9.5 s later:
    a restarted relay drops our packets for the old connection silently (no
    stateless reset in aioquic). With ack-eliciting bytes in flight a live
    peer answers within a few PTOs, so here a 0.25 s check declares the
    connection dead after ``max(2 s, 4 x PTO)`` of silence while bytes are in
    flight; idle connections keep the 6.5 s rule (checked at its deadline).
    """
    from outrelay.transport import quic

    check_every = 0.25
    floor = 2.0
    original_made = quic._Protocol.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        original_made(self, transport)
        self._fastdead = self._loop.call_later(check_every, _check, self)

    def _check(self: Any) -> None:
        if self.conn._terminated:
            return
        silent = self._loop.time() - self._last_rx
        loss = self._quic._loss
        in_flight = loss.bytes_in_flight > 0 and self._connected
        limit = max(floor, 4 * loss.get_probe_timeout()) if in_flight else None
        idle_limit = getattr(self, "_silence_timeout", quic.PEER_SILENCE_TIMEOUT)
        if silent > idle_limit or (limit is not None and silent > limit):
            reason = f"peer silent for {silent:.1f}s" + (" with bytes in flight" if limit else "")
            self.conn._on_terminated(reason)
            self._quic.close(error_code=0, reason_phrase="")
            self.transmit()
            return
        self._fastdead = self._loop.call_later(check_every, _check, self)

    quic._Protocol.connection_made = connection_made  # type: ignore[method-assign]


@_patch("streams1k")
def _streams1k() -> None:
    """Allow 1,100 concurrent peer-opened streams per QUIC connection instead of 100.

    outrelay advertises quic-go's default (spec 02 §2.1), so one agent pair
    carries at most 99 streams at once and further opens wait, then fail
    after the consumer's 10 s open timeout. This measures what the rest of
    the stack does with 1,000 streams open (apply to relay and both agents).
    """
    from outrelay.transport import quic

    quic.MAX_INCOMING_STREAMS = 1100


@_patch("ring4k")
def _ring4k() -> None:
    """Resume rings start (and may shrink back to) 4 KiB instead of 64 KiB.

    Each resumable stream allocates its ring at the first write with
    ``RING_MIN`` (64 KiB) even for a 1-byte exchange; most of an agent's
    per-stream memory. In src: allocate small and grow by doubling (the
    64 KiB floor could still apply once a stream has been busy).
    """
    from outrelay.resume import ring

    defaults = ring.RingBuffer.__init__.__defaults__
    assert defaults is not None and len(defaults) == 2
    ring.RingBuffer.__init__.__defaults__ = (defaults[0], 4096)


@_patch("uvloop")
def _uvloop() -> None:
    import asyncio

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _entry(name: str) -> Callable[[list[str]], int]:
    if name == "relay":
        from outrelay.relay.cli import main as relay_main

        return relay_main
    from outrelay.agent.cli import main as agent_main

    return agent_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", default="", help="comma-separated: " + ", ".join(PATCHES))
    parser.add_argument("--cprofile", default="", help="write cProfile stats here at exit")
    parser.add_argument("entry", choices=["relay", "agent"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    rest = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    for name in filter(None, opts.patch.split(",")):
        PATCHES[name]()
    entry = _entry(opts.entry)
    if not opts.cprofile:
        return entry(rest)
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(entry, rest)
    finally:
        profiler.dump_stats(opts.cprofile)


if __name__ == "__main__":
    sys.exit(main())
