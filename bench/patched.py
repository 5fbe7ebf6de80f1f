"""Run the relay or the agent with optional runtime patches or cProfile.

    python -m bench.patched [--patch NAME,...] [--cprofile OUT] relay|agent -- ARGS...

The benchmark must not edit ``src/``; candidate optimisations are measured by
monkeypatching them into the process here, side by side with the unpatched
code in the same run (``python -m bench --only experiments``). Each patch is a
proposal for the lead, with its before/after ratio in BENCHMARKS.md; the ones
src took (``coalesce``, ``batchrx``, ``fastdead``, ``streams1k``: commits
6a0fdff and c0d973e) are gone from here:

``nocopy``
    ``QuicConn.send_data`` hands aioquic the memoryview slice instead of a
    ``bytes`` copy of it (aioquic appends it to a bytearray either way).
``gso``
    Send runs of equal-size datagrams with one ``sendmsg`` (Linux UDP GSO).
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


@_patch("nocopy")
def _nocopy() -> None:
    from outrelay.transport.quic.protocol import QuicConn

    def send_data(self: Any, stream_id: int, data: memoryview) -> None:
        self._quic.send_stream_data(stream_id, data, False)  # no bytes()

    QuicConn.send_data = send_data  # type: ignore[method-assign]


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


def _bigdgram(size: int) -> Callable[[], None]:
    def apply() -> None:
        """QUIC datagrams of ``size`` bytes instead of 1,350 (loopback's MTU allows 65,536)."""
        from outrelay.transport.quic import settings

        settings.MAX_DATAGRAM_SIZE = size

    return apply


for _size in (4096, 9000, 16384, 32768, 65000):
    PATCHES[f"dgram{_size}"] = _bigdgram(_size)


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
