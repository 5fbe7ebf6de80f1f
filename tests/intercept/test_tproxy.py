"""The tproxy listener without iptables: the original destination is faked.

The real ``SO_ORIGINAL_DST`` path (iptables REDIRECT in a network namespace)
is covered by ``tests/e2e/test_tproxy.py``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from outrelay.agent.intercept import (
    OriginalDstError,
    TproxyListener,
    VipAllocator,
    original_dst,
    parse_sockaddr,
)
from outrelay.transport import SocketStream

from .records import Records

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0


# -- sockaddr parsing ---------------------------------------------------------------------


def test_parse_sockaddr_in() -> None:
    # captured from a REDIRECTed connection to 100.64.0.7:443
    raw = bytes.fromhex("020001bb644000070000000000000000")
    assert parse_sockaddr(raw) == ("100.64.0.7", 443)


def test_parse_sockaddr_in6() -> None:
    addr = socket.inet_pton(socket.AF_INET6, "fd00::1")
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 8443, 0) + addr + b"\0" * 4
    assert len(raw) == 28
    assert parse_sockaddr(raw) == ("fd00::1", 8443)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x02\x00\x01",
        struct.pack("=H", 99) + b"\0" * 14,  # unknown family
        struct.pack("=H", socket.AF_INET6) + b"\0" * 14,  # sockaddr_in6 cut short
    ],
)
def test_parse_sockaddr_rejects(raw: bytes) -> None:
    with pytest.raises(OriginalDstError):
        parse_sockaddr(raw)


def test_original_dst_without_nat_is_an_error() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as srv,
        socket.create_connection(srv.getsockname()[:2], timeout=WAIT),
    ):
        conn, _ = srv.accept()
        with conn:
            try:
                dst = original_dst(conn)
            except OriginalDstError:
                return  # no conntrack entry (or not Linux)
            # With conntrack loaded and no NAT, the "original" is the listener itself.
            assert dst == srv.getsockname()[:2]


# -- the listener ---------------------------------------------------------------------------


class Harness:
    def __init__(self) -> None:
        self.vips = VipAllocator()
        self.vips.allocate("svc-web")
        self.vips.allocate("svc-db")
        self.dst: tuple[str, int] | Exception = ("100.64.0.1", 443)
        self.handed: list[tuple[str, tuple[str, int]]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.listener = TproxyListener(
            "127.0.0.1",
            0,
            resolve=self.vips.reverse,
            handler=self.handler,
            get_original_dst=self.get_dst,
        )

    def get_dst(self, sock: socket.socket) -> tuple[str, int]:
        if isinstance(self.dst, Exception):
            raise self.dst
        return self.dst

    def handler(self, local: SocketStream, service: str, dst: tuple[str, int]) -> None:
        self.handed.append((service, dst))

        async def serve() -> None:
            try:
                await local.send_all(f"hello from {service} via {dst[0]}:{dst[1]}\n".encode())
                await local.send_eof()
                while await local.receive_some():
                    pass
            finally:
                await local.aclose()

        task = asyncio.get_running_loop().create_task(serve())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @property
    def addr(self) -> tuple[str, int]:
        assert self.listener.address is not None
        return self.listener.address


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    await h.listener.start()
    try:
        yield h
    finally:
        await h.listener.close()
        for task in list(h.tasks):
            task.cancel()


async def dial_and_read(addr: tuple[str, int], send: bytes = b"") -> tuple[bytes, str]:
    """Connect, send, half-close, read to the end: (data, "eof" | "reset")."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(*addr)
        try:
            if send:
                writer.write(send)
            data = bytearray()
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    return bytes(data), "reset"
                if not chunk:
                    return bytes(data), "eof"
                data += chunk
        finally:
            writer.close()


async def test_hit_is_handed_over_with_service_and_destination(harness: Harness) -> None:
    data, how = await dial_and_read(harness.addr)
    assert (data, how) == (b"hello from svc-web via 100.64.0.1:443\n", "eof")
    assert harness.handed == [("svc-web", ("100.64.0.1", 443))]


async def test_any_port_reaches_the_same_service(harness: Harness) -> None:
    for port in (80, 443, 5432, 65535):
        harness.dst = ("100.64.0.2", port)
        data, _ = await dial_and_read(harness.addr)
        assert data == f"hello from svc-db via 100.64.0.2:{port}\n".encode()
    assert [s for s, _ in harness.handed] == ["svc-db"] * 4


async def test_ipv4_mapped_destination_hits(harness: Harness) -> None:
    harness.dst = ("::ffff:100.64.0.1", 8080)
    data, _ = await dial_and_read(harness.addr)
    assert data.startswith(b"hello from svc-web")


@pytest.mark.parametrize("dst", [("100.64.99.99", 80), ("2001:db8::1", 80), ("bogus", 1)])
async def test_vip_lookup_miss_closes_cleanly(
    harness: Harness, logs: Records, dst: tuple[str, int]
) -> None:
    harness.dst = dst
    data, how = await dial_and_read(harness.addr)
    assert (data, how) == (b"", "eof")
    assert harness.handed == []
    assert harness.listener.misses == 1
    (miss,) = logs.find("intercept: VIP lookup miss")
    assert miss["dst"].endswith(f":{dst[1]}") and dst[0] in miss["dst"]
    assert miss["peer"].startswith("127.0.0.1:")


async def test_miss_with_unread_request_still_ends_with_fin(harness: Harness) -> None:
    harness.dst = ("100.64.99.99", 80)
    data, how = await dial_and_read(harness.addr, send=b"GET / HTTP/1.0\r\n\r\n")
    assert (data, how) == (b"", "eof")


async def test_original_dst_failure_closes_and_logs(harness: Harness, logs: Records) -> None:
    harness.dst = OriginalDstError("No such file or directory")
    data, how = await dial_and_read(harness.addr)
    assert data == b""
    assert how in ("eof", "reset")
    assert logs.find("intercept: SO_ORIGINAL_DST failed")
    assert harness.handed == []
    # and the listener keeps serving
    harness.dst = ("100.64.0.1", 443)
    data, _ = await dial_and_read(harness.addr)
    assert data.startswith(b"hello from svc-web")


async def test_accept_errors_never_stop_the_loop(
    harness: Harness, logs: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    real: Callable[..., Any] = loop.sock_accept
    failures = [OSError(errno.EMFILE, "Too many open files"), OSError(errno.ECONNABORTED, "x")]

    async def flaky(sock: socket.socket) -> Any:
        if failures:
            raise failures.pop(0)
        return await real(sock)

    monkeypatch.setattr(loop, "sock_accept", flaky)
    # The loop is already parked in the real sock_accept; restart it so it uses ours.
    await harness.listener.close()
    await harness.listener.start()
    data, _ = await dial_and_read(harness.addr)
    assert data.startswith(b"hello from svc-web")
    assert harness.listener.accept_errors == 2
    assert harness.listener.statistics().accept_errors == 2
    warned = logs.find("intercept: tproxy accept failed")
    assert [w["errno"] for w in warned] == [errno.EMFILE, errno.ECONNABORTED]


async def test_close_stops_accepting_but_not_live_connections(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection(*harness.addr)
    try:
        async with asyncio.timeout(WAIT):
            line = await reader.readline()
        assert line.startswith(b"hello from svc-web")
        addr = harness.addr
        await harness.listener.close()
        with pytest.raises(OSError):
            async with asyncio.timeout(WAIT):
                await asyncio.open_connection(*addr)
        # the handed-over connection is still open: it answers EOF only when we finish
        writer.write_eof()
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b""
    finally:
        writer.close()


async def test_bind_failure_raises() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        listener = TproxyListener(
            "127.0.0.1", port, resolve=lambda a: None, handler=lambda *a: None
        )
        with pytest.raises(OSError):
            await listener.start()


def test_vip_reverse_matches_the_resolver_signature() -> None:
    vips = VipAllocator()
    vip = vips.allocate("x")
    resolve: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], str | None] = vips.reverse
    assert resolve(vip) == "x"
