"""The embedded DNS server on a real UDP socket (127.0.0.1 only).

* garbage (hypothesis-generated and seeded-random) never stops it: after every
  batch it still answers a real query;
* forwarding to an upstream: the answer is relayed with the client's ID, a
  silent upstream gives SERVFAIL after the timeout, an unreachable one gives
  SERVFAIL at once, and the in-flight bound answers SERVFAIL beyond it.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outrelay.agent.intercept import DnsResponder, DnsServer, VipAllocator

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0


def _vips() -> VipAllocator:
    v = VipAllocator()
    v.allocate("svc-web")
    return v


# -- a blocking client ------------------------------------------------------------------


def exchange(
    addr: tuple[str, int], q: dns.message.Message, timeout: float = WAIT, tries: int = 1
) -> dns.message.Message:
    """Send ``q`` and return the reply with its ID (other datagrams are skipped).

    With ``tries`` > 1 the query is re-sent every ``timeout / tries`` seconds, as
    a stub resolver does: after a flood the server's socket buffer may be full
    and the kernel drops the first copy.
    """
    per_try = timeout / tries
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(tries):
            s.sendto(q.to_wire(), addr)
            deadline = time.monotonic() + per_try
            while (remaining := deadline - time.monotonic()) > 0:
                s.settimeout(remaining)
                try:
                    data, _ = s.recvfrom(65535)
                except TimeoutError:
                    break
                if len(data) >= 2 and struct.unpack("!H", data[:2])[0] == q.id:
                    return dns.message.from_wire(data)
    raise AssertionError(f"no reply for id {q.id} within {timeout}s ({tries} tries)")


def assert_answers(addr: tuple[str, int]) -> None:
    r = exchange(addr, dns.message.make_query("svc-web.outrelay", "A"), tries=5)
    assert r.rcode() == dns.rcode.NOERROR
    assert [rd.address for rd in r.answer[0]] == ["100.64.0.1"]


# -- a server on its own loop in a thread (for the synchronous hypothesis test) ------------


class ThreadedServer:
    def __init__(self, server_factory: Callable[[], DnsServer]) -> None:
        self.loop = asyncio.new_event_loop()
        self._factory = server_factory
        self.server: DnsServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        fut.result(timeout=WAIT)

    async def _start(self) -> None:
        self.server = self._factory()
        await self.server.start()

    @property
    def addr(self) -> tuple[str, int]:
        assert self.server is not None and self.server.address is not None
        return self.server.address

    def close(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(timeout=WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=WAIT)
        self.loop.close()


@pytest.fixture(scope="module")
def threaded() -> Iterator[ThreadedServer]:
    vips = _vips()
    srv = ThreadedServer(lambda: DnsServer(DnsResponder(vips.lookup), "127.0.0.1", 0))
    try:
        yield srv
    finally:
        srv.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.binary(max_size=1600), min_size=1, max_size=8))
def test_hypothesis_garbage_then_still_answers(
    threaded: ThreadedServer, packets: list[bytes]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in packets:
            s.sendto(p, threaded.addr)
    assert_answers(threaded.addr)


def test_random_garbage_flood_then_still_answers(threaded: ThreadedServer) -> None:
    rng = random.Random(20240611)
    valid = dns.message.make_query("svc-web.outrelay", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(3000):
            if i % 3 == 0:
                data = bytearray(valid)
                for _ in range(rng.randint(1, 6)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                packet = bytes(data[: rng.randint(0, len(data))])
            else:
                packet = rng.randbytes(rng.randint(0, 1500))
            s.sendto(packet, threaded.addr)
            if i % 500 == 0:
                time.sleep(0.01)  # let the server drain rather than overflow its queue
    assert_answers(threaded.addr)
    assert threaded.server is not None
    stats = threaded.server.statistics()
    assert stats.queries > 0 and stats.dropped > 0


# -- asyncio tests with a fake upstream -------------------------------------------------------


class FakeUpstream(asyncio.DatagramProtocol):
    """Answers every query with ``A 192.0.2.7`` unless ``silent``; records the IDs it saw."""

    def __init__(self, *, silent: bool = False, wrong_id_first: bool = False) -> None:
        self.silent = silent
        self.wrong_id_first = wrong_id_first
        self.seen: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append(data)
        if self.silent or self.transport is None:
            return
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", "192.0.2.7"))
        if self.wrong_id_first:
            bogus = dns.message.make_response(q)
            bogus.id = (q.id + 1) % 65536
            self.transport.sendto(bogus.to_wire(), addr)
        self.transport.sendto(r.to_wire(), addr)


@pytest.fixture
async def upstream_factory() -> AsyncIterator[Callable[..., Any]]:
    opened: list[asyncio.DatagramTransport] = []

    async def make(**kw: Any) -> tuple[FakeUpstream, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: FakeUpstream(**kw), local_addr=("127.0.0.1", 0)
        )
        opened.append(transport)
        return proto, transport.get_extra_info("sockname")[:2]

    yield make
    for t in opened:
        t.close()


async def aexchange(addr: tuple[str, int], q: dns.message.Message) -> dns.message.Message:
    return await asyncio.to_thread(exchange, addr, q, WAIT)


async def start_server(upstream: tuple[str, int] | None, **kw: Any) -> DnsServer:
    vips = _vips()
    server = DnsServer(
        DnsResponder(vips.lookup, forwarding=upstream is not None),
        "127.0.0.1",
        0,
        upstream=upstream,
        **kw,
    )
    await server.start()
    return server


async def test_forwards_outside_names_and_restores_the_id(upstream_factory: Any) -> None:
    fake, up = await upstream_factory()
    server = await start_server(up)
    try:
        assert server.address is not None
        q = dns.message.make_query("example.com", "A")
        r = await aexchange(server.address, q)
        assert r.id == q.id
        assert r.rcode() == dns.rcode.NOERROR
        assert [rd.address for rd in r.answer[0]] == ["192.0.2.7"]
        assert len(fake.seen) == 1
        assert fake.seen[0][2:] == q.to_wire()[2:]  # only the ID is changed
        # names under the suffix never reach the upstream
        local = await aexchange(server.address, dns.message.make_query("svc-web.outrelay", "A"))
        assert local.flags & dns.flags.AA and local.flags & dns.flags.RA
        assert len(fake.seen) == 1
        assert server.statistics().forwarded == 1
    finally:
        await server.close()


async def test_reply_with_the_wrong_id_is_ignored(upstream_factory: Any) -> None:
    _, up = await upstream_factory(wrong_id_first=True)
    server = await start_server(up)
    try:
        assert server.address is not None
        q = dns.message.make_query("example.org", "A")
        r = await aexchange(server.address, q)
        assert r.id == q.id and [rd.address for rd in r.answer[0]] == ["192.0.2.7"]
    finally:
        await server.close()


async def test_silent_upstream_gives_servfail_after_the_timeout(upstream_factory: Any) -> None:
    fake, up = await upstream_factory(silent=True)
    server = await start_server(up, upstream_timeout=0.3)
    try:
        assert server.address is not None
        started = time.monotonic()
        r = await aexchange(server.address, dns.message.make_query("example.com", "AAAA"))
        elapsed = time.monotonic() - started
        assert r.rcode() == dns.rcode.SERVFAIL
        assert 0.25 <= elapsed < 3.0
        assert len(fake.seen) == 1
        assert server.statistics().upstream_failures == 1
        assert server.statistics().upstream_inflight == 0
    finally:
        await server.close()


async def test_unreachable_upstream_gives_servfail(upstream_factory: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[:2]  # closed when the block ends: ICMP port unreachable
    server = await start_server(dead, upstream_timeout=3.0)
    try:
        assert server.address is not None
        started = time.monotonic()
        r = await aexchange(server.address, dns.message.make_query("example.com", "A"))
        assert r.rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < 2.5  # did not wait for the timeout
    finally:
        await server.close()


async def test_inflight_bound_answers_servfail_at_once(upstream_factory: Any) -> None:
    fake, up = await upstream_factory(silent=True)
    server = await start_server(up, upstream_timeout=1.5, max_inflight=2)
    try:
        assert server.address is not None
        addr = server.address
        queries = [dns.message.make_query(f"n{i}.example.com", "A") for i in range(5)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            for q in queries:
                s.sendto(q.to_wire(), addr)
            loop = asyncio.get_running_loop()
            got: dict[int, tuple[float, int]] = {}
            started = loop.time()
            async with asyncio.timeout(WAIT):
                while len(got) < len(queries):
                    data = await loop.sock_recv(s, 65535)
                    r = dns.message.from_wire(data)
                    got[r.id] = (loop.time() - started, r.rcode())
        assert all(rcode == dns.rcode.SERVFAIL for _, rcode in got.values())
        fast = [t for t, _ in got.values() if t < 1.0]
        slow = [t for t, _ in got.values() if t >= 1.0]
        assert len(fast) == 3 and len(slow) == 2
        stats = server.statistics()
        assert stats.upstream_rejected == 3 and stats.forwarded == 2
        assert len(fake.seen) == 2
    finally:
        await server.close()


async def test_close_cancels_exchanges_in_flight(upstream_factory: Any) -> None:
    _, up = await upstream_factory(silent=True)
    server = await start_server(up, upstream_timeout=30.0)
    assert server.address is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(dns.message.make_query("example.com", "A").to_wire(), server.address)
        async with asyncio.timeout(WAIT):
            while server.statistics().upstream_inflight == 0:  # noqa: ASYNC110 - polling a counter
                await asyncio.sleep(0.01)
    started = time.monotonic()
    await server.close()
    assert time.monotonic() - started < 2.0
    assert server.statistics().upstream_inflight == 0


async def test_bind_failure_raises_oserror() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        server = DnsServer(DnsResponder(_vips().lookup), "127.0.0.1", port)
        with pytest.raises(OSError):
            await server.start()


def test_upstream_needs_a_forwarding_responder() -> None:
    with pytest.raises(ValueError):
        DnsServer(DnsResponder(_vips().lookup), "127.0.0.1", 0, upstream=("127.0.0.1", 53))
