"""How qh3 2.x returns stream receive credit (issue 16), by experiment.

``python -m bench.qh3_credit [--seconds 3]`` starts outrelay's aioquic server
in-process (dev PKI in a temporary directory) and dials it with outrelay's qh3
client (:func:`outrelay.transport.quic.qh3.connect_quic_qh3`). The client opens
streams A and B; the server writes to both without pause; the client reads B
continuously and never reads A. Each scenario changes only how the qh3
connection pops its core's event queue, or the core's receive arguments:

* ``held``: as shipped, the core's queue is left unpopped while A holds a
  window of unread bytes (``_qh3.HeldQuicConnection``).
* ``pop-all``: every event is popped at once; A's bytes pile up in Python.
* ``no-pop``: nothing is popped after the handshake (not even B's bytes).
* ``max_stream_data``/``max_data``: qh3's two receive options
  (``QuicConfiguration``), announced to the peer; qh3's wrapper passes
  ``max_stream_data`` as the core's ``stream_receive_window`` *and*
  ``max_stream_reassembly``, ``max_data`` as ``connection_receive_window``.
* ``core ...``: one core argument changed alone (not announced).

Per scenario: A's bytes popped into Python, the bytes the client core took in
on A (written by the server and acknowledged), the credit the client granted
on A (the server's aioquic view of its MAX_STREAM_DATA), B's throughput once
A is full, and the credit on B. Bounded: each scenario runs ``--seconds`` and
stops early once A holds 64 MiB in Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outrelay.pki import ClientVerifier, load_certificates
from outrelay.pki.cli import main as pki_main
from outrelay.transport import QuicTlsConfig, Stream, serve_quic
from outrelay.transport.quic import _qh3, settings
from outrelay.transport.quic import qh3 as qh3_backend
from outrelay.transport.quic.protocol import QuicConn

MiB = 1 << 20
CAP = 64 * MiB
"""Stop a scenario once A holds this much in Python (the unbounded case)."""
CHUNK = b"a" * 65536


@dataclass(frozen=True)
class Scenario:
    name: str
    pop: str
    """``held`` (as shipped), ``all`` (never held) or ``none`` (held from the handshake on)."""
    core: dict[str, int] = field(default_factory=dict)
    """``QuicConnectionCore`` arguments to override, by name (not announced to the peer)."""
    window: int = 0
    """``QuicConfiguration.max_stream_data`` (announced, and the core's
    ``stream_receive_window`` and ``max_stream_reassembly``); 0: as shipped."""
    conn_window: int = 0
    """``QuicConfiguration.max_data`` (announced, and ``connection_receive_window``)."""


SCENARIOS = (
    Scenario("held (as shipped)", "held"),
    Scenario("pop-all", "all"),
    Scenario("no-pop", "none"),
    Scenario("no-pop, max_stream_data 256K", "none", window=256 << 10),
    Scenario("no-pop, max_data 2M", "none", conn_window=2 * MiB),
    Scenario("no-pop, core reassembly 64K", "none", {"max_stream_reassembly": 64 << 10}),
    Scenario("no-pop, core stream window 256K", "none", {"stream_receive_window": 256 << 10}),
    Scenario("pop-all, core reassembly 64K", "all", {"max_stream_reassembly": 64 << 10}),
    Scenario("pop-all, max_data 2M", "all", conn_window=2 * MiB),
)

CORE_ARGS = [
    p.strip() for p in (_qh3.QuicConnectionCore.__text_signature__ or "").strip("()").split(",")
]


@contextlib.contextmanager
def _connection_class(scenario: Scenario) -> Iterator[None]:
    """``connect_quic_qh3`` builds this scenario's connection class (bench only)."""
    base = _qh3.HeldQuicConnection
    overrides = {CORE_ARGS.index(k): v for k, v in scenario.core.items()}
    real_core = _qh3._connection_module.QuicConnectionCore

    class Variant(base):  # type: ignore[misc, valid-type]
        def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
            def core(*args: Any) -> Any:
                args = tuple(overrides.get(i, a) for i, a in enumerate(args))
                return real_core(*args)

            with _qh3._replaced("QuicConnectionCore", lambda _: core):
                super()._create_core(remote_addr, initial_dcid, now)

    _qh3.HeldQuicConnection = Variant  # type: ignore[misc]
    try:
        yield
    finally:
        _qh3.HeldQuicConnection = base  # type: ignore[misc]


def _credit(peer: QuicConn, stream_id: int) -> int:
    """The receive limit the client granted on ``stream_id`` (aioquic's private view)."""
    stream = peer._quic._streams.get(stream_id)
    return int(stream.max_stream_data_remote) if stream is not None else 0


class _Flood:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.sent = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                await self.stream.send_all(CHUNK)
                self.sent += len(CHUNK)

    @property
    def delivered(self) -> int:
        """Written and acknowledged by the client's core."""
        return self.sent - self.stream.unsent_bytes


@dataclass
class Row:
    name: str
    a_popped: int = 0
    a_delivered: int = 0
    a_credit: int = 0
    b_rate: float = 0.0
    b_credit: int = 0
    seconds: float = 0.0
    note: str = ""


async def _run(scenario: Scenario, pki: dict[str, str], seconds: float) -> Row:
    row = Row(scenario.name)
    conns: asyncio.Queue[QuicConn] = asyncio.Queue()
    verifier = ClientVerifier(load_certificates(pki["ca"]))
    relay = QuicTlsConfig(pki["relay_cert"], pki["relay_key"], pki["ca"])
    agent = QuicTlsConfig(pki["agent_cert"], pki["agent_key"], pki["ca"])
    handle = await serve_quic(
        "127.0.0.1",
        0,
        relay,
        verify_client=lambda leaf, chain: verifier.verify(leaf, chain),
        on_connection=conns.put_nowait,
    )
    floods: list[_Flood] = []
    reader: asyncio.Task[None] | None = None
    try:
        saved = settings.STREAM_WINDOW, settings.CONNECTION_WINDOW
        settings.STREAM_WINDOW = scenario.window or saved[0]
        settings.CONNECTION_WINDOW = scenario.conn_window or saved[1]
        try:
            with _connection_class(scenario):
                client = await qh3_backend.connect_quic_qh3("127.0.0.1", handle.address[1], agent)
        finally:
            settings.STREAM_WINDOW, settings.CONNECTION_WINDOW = saved
        peer = await asyncio.wait_for(conns.get(), 5)
        quic = client._quic
        if scenario.pop == "all":
            quic.held = lambda: False
        elif scenario.pop == "none":
            quic.held = lambda: True
        a, b = await client.open_stream(), await client.open_stream()
        await a.send_all(b"A")
        await b.send_all(b"B")
        remote: dict[int, Stream] = {}
        if scenario.pop == "none":  # the opens arrive only if the core is popped once
            quic.drain_held()
            client._protocol.process_events()
        for _ in range(2):
            s = await asyncio.wait_for(peer.accept_stream(), 5)
            remote[s.stream_id] = s
        fa, fb = _Flood(remote[a.stream_id]), _Flood(remote[b.stream_id])
        floods = [fa, fb]
        b_read = 0

        async def read_b() -> None:
            nonlocal b_read
            while chunk := await b.receive_some(65536):
                b_read += len(chunk)

        reader = asyncio.create_task(read_b())
        t0 = time.monotonic()
        full_at: float | None = None
        b_at_full = 0
        while (elapsed := time.monotonic() - t0) < seconds:
            await asyncio.sleep(0.05)
            popped = a.statistics().buffered
            if full_at is None and popped >= settings.STREAM_WINDOW:
                full_at, b_at_full = elapsed, b_read
            if popped >= CAP:
                row.note = f"stopped at {CAP // MiB} MiB"
                break
        elapsed = time.monotonic() - t0
        row.seconds = elapsed
        row.a_popped = a.statistics().buffered
        row.a_delivered = fa.delivered
        row.a_credit = _credit(peer, a.stream_id)
        row.b_credit = _credit(peer, b.stream_id)
        if full_at is None:
            full_at, b_at_full = 0.0, 0
            row.note = row.note or "A never filled a window in Python"
        span = max(elapsed - full_at, 1e-3)
        row.b_rate = (b_read - b_at_full) / span / 1e6
        core = quic._core
        if core is not None and core.state not in ("connected", "established"):
            row.note = f"client core {core.state}: {core.local_error}"
        elif client.terminated:
            row.note = "client connection ended"
        client.close()
    finally:
        if reader is not None:
            reader.cancel()
        for f in floods:
            f.task.cancel()
        handle.close()
        await asyncio.sleep(0.1)
    return row


def _dev_pki(out: Path) -> dict[str, str]:
    with contextlib.redirect_stdout(io.StringIO()):
        pki_main(["pki", "dev", "--out", str(out)])
    agent = json.loads((out / "identities.json").read_text())["agents"][0]
    return {
        "ca": str(out / "ca.crt"),
        "relay_cert": str(out / "relay.crt"),
        "relay_key": str(out / "relay.key"),
        "agent_cert": agent["cert"],
        "agent_key": agent["key"],
    }


def _table(rows: list[Row]) -> str:
    head = (
        "| scenario | A popped to Python | A taken in by the core | A credit granted "
        "| B MB/s after A full | B credit granted | note |"
    )
    lines = [head, "|" + "---|" * 7]

    def mib(n: int) -> str:
        return f"{n / MiB:.1f} MiB"

    for r in rows:
        lines.append(
            f"| {r.name} | {mib(r.a_popped)} | {mib(r.a_delivered)} | {mib(r.a_credit)} "
            f"| {r.b_rate:.1f} | {mib(r.b_credit)} | {r.note or f'{r.seconds:.1f} s'} |"
        )
    return "\n".join(lines)


async def _main(seconds: float, only: Callable[[Scenario], bool]) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        pki = _dev_pki(Path(tmp))
        return [await _run(s, pki, seconds) for s in SCENARIOS if only(s)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.qh3_credit", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per scenario (default 3)")
    parser.add_argument("--only", default="", help="scenarios whose name contains this")
    args = parser.parse_args(argv)
    import qh3

    print(
        f"qh3 {qh3.__version__}: stream window {settings.STREAM_WINDOW // MiB} MiB, "
        f"connection window {settings.CONNECTION_WINDOW // MiB} MiB; A unread, B read"
    )
    rows = asyncio.run(_main(args.seconds, lambda s: args.only in s.name))
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
