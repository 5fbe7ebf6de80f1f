"""Hostile agents (issue 14): one agent cannot stall another or take over its streams.

A real relay and a real provider agent (echo backend) run as processes. The
other agents are raw ORP clients built from the library's transport and codec:
* ``Observer`` (in this process) opens a stream to the provider, keeps bytes
  flowing and records when the provider's STREAM_CHECKPOINTs reach it through
  the relay;
* a *bad consumer* (a child process) opens streams to the same provider and
  keeps them busy, but never reads its control stream, with a 4 KiB receive
  window on it so the relay's writes to it block at once;
* a *squatter* (this process) is another agent of the same tenant that names
  the observer's stream id in STREAM_RESUME, STREAM_CHECKPOINT, MIGRATE_TO_P2P
  and CANDIDATE_OFFER.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from outrelay.orp import (
    CandidateOffer,
    FrameType,
    Hello,
    MigrateToP2P,
    OpenStream,
    StreamCheckpoint,
    StreamResume,
    decode_message,
    encode_message,
)
from outrelay.transport import QuicTlsConfig, Stream, TransportError, connect_quic
from outrelay.wire import FrameReader

from .harness import OUTRELAY_CMD, Backends, Cluster, Identity, Pki, Relay, child_env

pytestmark = [pytest.mark.e2e]

KiB = 1 << 10


def issue_identity(pki: Pki, name: str) -> Identity:
    """One more agent identity of the dev PKI's tenant (``outrelay pki agent``)."""
    out = pki.dir / "extra"
    proc = subprocess.run(
        [
            *OUTRELAY_CMD,
            "pki",
            "agent",
            "--ca-dir",
            str(pki.dir),
            "--out",
            str(out),
            "--tenant",
            "acme",
            "--name",
            name,
            "--force",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=True,
    )
    uri = next(w for w in proc.stdout.split() if w.startswith("outrelay://"))
    return Identity(name, uri, out / f"{name}.crt", out / f"{name}.key")


class RawAgent:
    """mTLS QUIC, HELLO, and a control reader that records what arrives."""

    def __init__(self, conn: object, ctrl: Stream) -> None:
        self.conn = conn
        self.ctrl = ctrl
        self.ready: dict[int, asyncio.Future[None]] = {}
        self.checkpoints: dict[int, list[float]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read_ctrl())

    @classmethod
    async def connect(cls, relay: Relay, ident: Identity, ca: Path) -> RawAgent:
        host, port = relay.addr.rsplit(":", 1)
        tls = QuicTlsConfig(str(ident.cert), str(ident.key), str(ca))
        conn = await connect_quic(host, int(port), tls)
        ctrl = await conn.open_stream()
        await ctrl.send_all(
            encode_message(FrameType.HELLO, Hello(protocol_version="orp/1", agent_uri=ident.uri))
        )
        return cls(conn, ctrl)

    async def _read_ctrl(self) -> None:
        reader = FrameReader(self.ctrl)
        with contextlib.suppress(TransportError):
            while (frame := await reader.read_frame()) is not None:
                if frame.type not in (FrameType.STREAM_READY, FrameType.STREAM_CHECKPOINT):
                    continue
                sid = int(getattr(decode_message(frame), "stream_id", 0))
                if frame.type == FrameType.STREAM_READY:
                    waiter = self.ready.get(sid)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                else:
                    self.checkpoints.setdefault(sid, []).append(time.monotonic())

    async def open(self, service: str) -> tuple[int, Stream]:
        """OPEN_STREAM; returns once the relay says STREAM_READY."""
        sid = secrets.randbits(63) | 1
        self.ready[sid] = asyncio.get_running_loop().create_future()
        stream = await self.conn.open_stream()  # type: ignore[attr-defined]
        await stream.send_all(
            encode_message(FrameType.OPEN_STREAM, OpenStream(target_service=service, stream_id=sid))
        )
        async with asyncio.timeout(10):
            await self.ready[sid]
        return sid, stream

    async def send_ctrl(self, frame_type: FrameType, message: object) -> None:
        await self.ctrl.send_all(encode_message(frame_type, message))  # type: ignore[arg-type]

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.conn.close(0, "")  # type: ignore[attr-defined]


async def echo_loop(stream: Stream, seconds: float, chunk: int = 16 * KiB) -> int:
    """Write ``chunk`` bytes every 20 ms and read the echo; returns bytes echoed intact."""
    block = os.urandom(chunk)
    echoed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await stream.send_all(block)
        got = bytearray()
        async with asyncio.timeout(5):
            while len(got) < len(block):
                got += await stream.receive_some(len(block) - len(got))
        assert bytes(got) == block, "echo corrupted"
        echoed += len(got)
        await asyncio.sleep(0.02)
    return echoed


BAD_CONSUMER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    import outrelay.transport.quic as quic
    quic.STREAM_WINDOW = 4096  # tiny receive windows: the relay's ctrl writes block at once
    from outrelay.orp import FrameType, Hello, OpenStream, encode_message
    from outrelay.transport import QuicTlsConfig

    async def main(host, port, cert, key, ca, uri, service, streams, seconds):
        conn = await quic.connect_quic(host, int(port), QuicTlsConfig(cert, key, ca))
        ctrl = await conn.open_stream()
        hello = Hello(protocol_version="orp/1", agent_uri=uri)
        await ctrl.send_all(encode_message(FrameType.HELLO, hello))
        # ctrl is never read from here on
        block = os.urandom(4096)
        deadline = time.monotonic() + float(seconds)

        async def pump(i):
            s = await conn.open_stream()
            open_stream = OpenStream(target_service=service, stream_id=1000 + i)
            await s.send_all(encode_message(FrameType.OPEN_STREAM, open_stream))
            try:
                while time.monotonic() < deadline:
                    await s.send_all(block)
                    got = 0
                    while got < len(block):
                        got += len(await s.receive_some(65536))
                    await asyncio.sleep(0.01)
            except Exception:
                pass

        await asyncio.gather(*(pump(i) for i in range(int(streams))))
        print("bad consumer done", flush=True)

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.timeout(120)
async def test_a_consumer_that_never_reads_its_control_stream_stalls_nobody(
    cluster: Cluster, pki: Pki, backends: Backends
) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    cluster.start_agent(pki.agent(0), relay, expose={"svc": echo.addr})
    observer = await RawAgent.connect(relay, pki.agent(1), pki.ca_cert)
    bad_ident = issue_identity(pki, "bad-consumer")
    try:
        sid, stream = await observer.open("svc")
        await echo_loop(stream, 1.0)  # warm up: checkpoints flow
        bad = subprocess.Popen(  # noqa: ASYNC220 - started once; it never blocks the loop
            [
                sys.executable,
                "-c",
                BAD_CONSUMER,
                *relay.addr.rsplit(":", 1),
                str(bad_ident.cert),
                str(bad_ident.key),
                str(pki.ca_cert),
                bad_ident.uri,
                "svc",
                "40",
                "14",
            ],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            started = time.monotonic()
            echoed = await echo_loop(stream, 13.0)
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                bad.wait(timeout=15)
            if bad.poll() is None:
                bad.kill()
            out = bad.communicate(timeout=5)[0].decode(errors="replace")
        times = [t for t in observer.checkpoints.get(sid, []) if t >= started]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        longest = max(gaps, default=float("inf"))
        print(
            f"\nobserver: {echoed // KiB} KiB echoed, {len(times)} checkpoints from the provider"
            f" while the bad consumer ran; longest gap {longest * 1000:.0f} ms"
        )
        assert len(times) >= 50, f"only {len(times)} checkpoints in 13 s\n{out}"
        assert longest < 1.0, f"the provider's checkpoints stalled {longest:.1f}s"
        # The relay dropped the bad consumer's own checkpoints instead of waiting on it.
        relay.wait_for("agent slow to read its control stream", uri=bad_ident.uri, timeout=5)
    finally:
        await observer.close()


@pytest.mark.timeout(60)
async def test_frames_naming_another_agents_stream_change_nothing(
    cluster: Cluster, pki: Pki, backends: Backends
) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    cluster.start_agent(pki.agent(0), relay, expose={"svc": echo.addr})
    owner = await RawAgent.connect(relay, pki.agent(1), pki.ca_cert)
    squatter = await RawAgent.connect(relay, issue_identity(pki, "squatter"), pki.ca_cert)
    try:
        sid, stream = await owner.open("svc")
        await echo_loop(stream, 0.5)
        since = relay.count()
        huge = 1 << 40
        await squatter.send_ctrl(
            FrameType.STREAM_CHECKPOINT,
            StreamCheckpoint(stream_id=sid, my_position=huge, peer_ack_position=huge),
        )
        await squatter.send_ctrl(FrameType.MIGRATE_TO_P2P, MigrateToP2P(stream_id=sid))
        await squatter.send_ctrl(FrameType.CANDIDATE_OFFER, CandidateOffer(stream_id=sid))
        claim = await squatter.conn.open_stream()  # type: ignore[attr-defined]
        await claim.send_all(
            encode_message(
                FrameType.STREAM_RESUME,
                StreamResume(stream_id=sid, my_position=0, peer_ack_position=0),
            )
        )
        with pytest.raises(TransportError):
            async with asyncio.timeout(5):
                while await claim.receive_some():
                    pass  # the relay resets the claim; it never echoes
        for kind in ("STREAM_CHECKPOINT", "MIGRATE_TO_P2P", "CANDIDATE_OFFER", "STREAM_RESUME"):
            relay.wait_for(
                "frame for another agent's stream refused", since=since, type=kind, timeout=5
            )
        # The owner's stream is untouched: bytes still flow both ways, byte-exact.
        assert await echo_loop(stream, 1.0) > 0
        assert not relay.find("stream resumed", since=since)
    finally:
        await owner.close()
        await squatter.close()
