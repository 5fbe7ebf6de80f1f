"""Our yamux against Go's hashicorp/yamux, both ways (issue 8, "Interop test peer").

``yamuxpeer/main.go`` is built once per test session from Debian's
``golang-github-hashicorp-yamux-dev`` (GOPATH mode, no network, no module
proxy). Each scenario runs twice: Go as yamux server (we dial) and Go as
yamux client (we listen). Plain TCP on 127.0.0.1; TLS is not part of yamux.
The Go side prints ``OK`` or ``FAIL <reason>``; hashicorp logs every protocol
complaint as ``[ERR]`` on stderr, and there must be none.

Needs (Debian): ``golang-go golang-github-hashicorp-yamux-dev``. Skipped, with
that message, only when the ``go`` command is missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from outrelay.transport import BrokenResourceError, Stream
from outrelay.transport.tcp import TcpConn, connect_yamux_plaintext, serve_yamux_plaintext
from outrelay.transport.yamux import INITIAL_STREAM_WINDOW

pytestmark = pytest.mark.timeout(60)

DEBIAN_GOCODE = Path("/usr/share/gocode")
YAMUX_SOURCE = DEBIAN_GOCODE / "src/github.com/hashicorp/yamux"
PEER_SOURCE = Path(__file__).parent / "yamuxpeer"


@pytest.fixture(scope="session")
def yamuxpeer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip(
            "Go interop tests need the Go toolchain: "
            "apt-get install golang-go golang-github-hashicorp-yamux-dev"
        )
    if not YAMUX_SOURCE.is_dir():
        pytest.fail(
            f"hashicorp/yamux source not found at {YAMUX_SOURCE}: "
            "apt-get install golang-github-hashicorp-yamux-dev"
        )
    out = tmp_path_factory.mktemp("yamuxpeer")
    env = {
        **os.environ,
        "GO111MODULE": "off",  # GOPATH mode: Debian's source tree, never the module proxy
        "GOPATH": f"{DEBIAN_GOCODE}:{out / 'gopath'}",
        "GOCACHE": str(out / "cache"),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    binary = out / "yamuxpeer"
    result = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=PEER_SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"go build of {PEER_SOURCE} failed:\n{result.stdout}{result.stderr}")
    return binary


def pattern(n: int) -> bytes:
    """Byte i is i mod 251, as in main.go."""
    return (bytes(range(251)) * (n // 251 + 1))[:n]


async def read_all(stream: Stream, max_bytes: int = 65536) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(max_bytes):
        out += chunk
    return bytes(out)


async def send_and_finish(stream: Stream, data: bytes) -> None:
    await stream.send_all(data)
    await stream.send_eof()


# --------------------------------------------------------------------------- our side


@dataclass
class Notes:
    """What our side observed, checked after the Go side reported."""

    elapsed: float = 0.0
    max_unsent: int = 0
    window_exhausted: bool = False
    receive_window: int = 0


PySide = Callable[[TcpConn, int, Notes], Awaitable[None]]


async def py_echo(conn: TcpConn, size: int, notes: Notes) -> None:
    async def one(i: int) -> None:
        stream = await conn.open_stream()
        data = os.urandom(size // 8 + i * 1000)
        _, back = await asyncio.gather(send_and_finish(stream, data), read_all(stream))
        assert back == data

    await asyncio.gather(*(one(i) for i in range(8)))


async def py_send(conn: TcpConn, size: int, notes: Notes) -> None:
    stream = await conn.accept_stream()
    got = await read_all(stream, 1 << 20)
    assert got == pattern(size)
    notes.receive_window = conn.receive_window(stream.stream_id)
    await stream.aclose()


async def py_send_to_slow_reader(conn: TcpConn, size: int, notes: Notes) -> None:
    stream = await conn.accept_stream()
    got = bytearray()
    await asyncio.sleep(0.2)
    while chunk := await stream.receive_some(64 * 1024):
        got += chunk
        window = conn.receive_window(stream.stream_id)
        assert stream.statistics().buffered <= window  # never more than we granted
        notes.receive_window = max(notes.receive_window, window)
        await asyncio.sleep(0.01)
    assert bytes(got) == pattern(size)
    await stream.aclose()


async def py_recv(conn: TcpConn, size: int, notes: Notes) -> None:
    stream = await conn.open_stream()
    data = pattern(size)
    await send_and_finish(stream, data)  # half-close: Go answers after our FIN
    reply = await read_all(stream)
    assert reply == hashlib.sha256(data).hexdigest().encode()


async def py_bidir(conn: TcpConn, size: int, notes: Notes) -> None:
    stream = await conn.open_stream()
    _, got = await asyncio.gather(send_and_finish(stream, pattern(size)), read_all(stream))
    assert got == pattern(size)


async def py_slowread(conn: TcpConn, size: int, notes: Notes) -> None:
    stream = await conn.open_stream()
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            notes.max_unsent = max(notes.max_unsent, stream.unsent_bytes)
            if conn.stream_state(stream.stream_id) is not None:
                notes.window_exhausted |= conn.send_window(stream.stream_id) == 0
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    start = time.perf_counter()
    await send_and_finish(stream, pattern(size))
    notes.elapsed = time.perf_counter() - start
    done.set()
    await watcher
    assert await read_all(stream) == b"ok"


async def py_reset(conn: TcpConn, size: int, notes: Notes) -> None:
    stream = await conn.open_stream()
    await stream.send_all(b"abc" * 1000)
    await asyncio.sleep(0.1)
    stream.abort()
    await asyncio.sleep(0.1)
    async with asyncio.timeout(5):
        await conn.ping()  # the session survives a stream reset


async def py_backlog(conn: TcpConn, size: int, notes: Notes) -> None:
    first = await conn.open_stream()
    second = await conn.open_stream()
    await first.send_all(b"one")
    await second.send_all(b"two")
    with pytest.raises(BrokenResourceError, match="reset"):
        async with asyncio.timeout(5):
            await second.receive_some()
    async with asyncio.timeout(5):
        await conn.ping()
    await first.send_all(b"still open")


async def py_goaway_go(conn: TcpConn, size: int, notes: Notes) -> None:
    stream = await conn.accept_stream()
    assert await read_all(stream) == b"hi"
    with pytest.raises(BrokenResourceError, match="GO_AWAY"):
        await conn.open_stream()
    await stream.aclose()


async def py_goaway_py(conn: TcpConn, size: int, notes: Notes) -> None:
    stream = await conn.open_stream()
    await stream.send_all(b"x")
    conn.go_away()
    await stream.send_eof()
    assert await read_all(stream) == b""


async def py_ping(conn: TcpConn, size: int, notes: Notes) -> None:
    async with asyncio.timeout(5):
        rtt = await conn.ping()
    assert rtt < 1
    stream = await conn.open_stream()
    await send_and_finish(stream, b"pinged")
    assert await read_all(stream) == b""


async def py_many(conn: TcpConn, size: int, notes: Notes) -> None:
    async def echo(stream: Stream) -> None:
        while chunk := await stream.receive_some():
            await stream.send_all(chunk)
        await stream.send_eof()

    async with asyncio.TaskGroup() as tg:
        for _ in range(20):
            tg.create_task(echo(await conn.accept_stream()))


# (test id, Go scenario, size, our side)
SCENARIOS: list[tuple[str, str, int, PySide]] = [
    ("echo", "echo", 1 << 20, py_echo),
    ("go-sends-16MiB", "send", 16 << 20, py_send),
    ("go-sends-to-slow-reader", "send", 2 << 20, py_send_to_slow_reader),
    ("we-send-then-half-close", "recv", 16 << 20, py_recv),
    ("both-ways", "bidir", 8 << 20, py_bidir),
    ("go-reads-slowly", "slowread", 1 << 20, py_slowread),
    ("we-reset", "reset", 0, py_reset),
    ("go-backlog-rst", "backlog", 0, py_backlog),
    ("go-away-from-go", "goaway_go", 0, py_goaway_go),
    ("go-away-from-us", "goaway_py", 0, py_goaway_py),
    ("ping", "ping", 0, py_ping),
    ("go-opens-20", "many", 100_000, py_many),
]


@dataclass
class GoResult:
    stdout: str
    stderr: str
    returncode: int | None

    def line(self, prefix: str) -> str | None:
        for line in self.stdout.splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        return None


async def run_against_go(
    binary: Path, go_role: str, scenario: str, size: int, ours: PySide, notes: Notes
) -> GoResult:
    args = [str(binary), "-role", go_role, "-scenario", scenario, "-size", str(size)]
    handle = None
    first = b""
    if go_role == "server":
        proc = await asyncio.create_subprocess_exec(
            *args, "-addr", "127.0.0.1:0", stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 10)
        host, _, port = first.decode().split()[1].rpartition(":")
        conn = await connect_yamux_plaintext(host, int(port))
    else:
        accepted: asyncio.Queue[TcpConn] = asyncio.Queue()
        handle = await serve_yamux_plaintext("127.0.0.1", 0, on_connection=accepted.put_nowait)
        proc = await asyncio.create_subprocess_exec(
            *args,
            "-addr",
            f"127.0.0.1:{handle.address[1]}",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        conn = await asyncio.wait_for(accepted.get(), 10)
    try:
        async with asyncio.timeout(30):
            await ours(conn, size, notes)
    finally:
        conn.close()
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 15)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
        if handle is not None:
            handle.close()
    return GoResult((first + out).decode(), err.decode(), proc.returncode)


@pytest.mark.parametrize("go_role", ["server", "client"], ids=["go-server", "go-client"])
@pytest.mark.parametrize(
    ("scenario", "size", "ours"),
    [pytest.param(s, n, f, id=name) for name, s, n, f in SCENARIOS],
)
async def test_against_hashicorp_yamux(
    yamuxpeer: Path, go_role: str, scenario: str, size: int, ours: PySide
) -> None:
    notes = Notes()
    result = await run_against_go(yamuxpeer, go_role, scenario, size, ours, notes)
    report = f"go stdout:\n{result.stdout}\ngo stderr:\n{result.stderr}"
    assert result.line("OK") is not None and result.returncode == 0, report
    assert "[ERR]" not in result.stderr, report
    if ours is py_slowread:
        # Go did not read for 300 ms: we waited for its window instead of overrunning it.
        assert notes.window_exhausted, report
        assert notes.max_unsent <= INITIAL_STREAM_WINDOW, report
        assert notes.elapsed >= 0.25, report
    if ours is py_send_to_slow_reader:
        # ... and the other way round: Go's writer waited for our credit.
        write_ms = result.line("WRITE_MS")
        assert write_ms is not None and int(write_ms) >= 150, report
    if ours is py_send:
        # We grew our receive window for a reader that keeps up.
        assert notes.receive_window > INITIAL_STREAM_WINDOW, report
