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
from devpki import DevPki, Identity

from outrelay.orp import (
    Candidate,
    CandidateOffer,
    FrameType,
    Hello,
    MigrateToP2P,
    OpenStream,
    Register,
    StreamCheckpoint,
    StreamEndCode,
    StreamResume,
    decode_message,
    encode_message,
)
from outrelay.transport import (
    BrokenResourceError,
    QuicTlsConfig,
    Stream,
    TransportError,
    connect_quic,
)
from outrelay.wire import FrameReader

from .harness import Backends, Cluster, Relay, child_env

pytestmark = [pytest.mark.e2e]

KiB = 1 << 10


class RawAgent:
    """mTLS QUIC, HELLO, and a control reader that records what arrives."""

    def __init__(self, conn: object, ctrl: Stream) -> None:
        self.conn = conn
        self.ctrl = ctrl
        self.ready: dict[int, asyncio.Future[None]] = {}
        self.checkpoints: dict[int, list[float]] = {}
        self._ctrl_lock = asyncio.Lock()
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
        async with self._ctrl_lock:  # whole frames, one writer at a time
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
    import asyncio, sys
    import outrelay.transport.quic as quic
    quic.settings.STREAM_WINDOW = 4096  # tiny receive window: the relay's ctrl writes back up
    from outrelay.orp import FrameType, Hello, OpenStream, encode_message
    from outrelay.transport import QuicTlsConfig

    async def main(host, port, cert, key, ca, uri, service, sid, seconds):
        conn = await quic.connect_quic(host, int(port), QuicTlsConfig(cert, key, ca))
        ctrl = await conn.open_stream()
        hello = Hello(protocol_version="orp/1", agent_uri=uri)
        await ctrl.send_all(encode_message(FrameType.HELLO, hello))
        # ctrl is never read from here on
        s = await conn.open_stream()
        open_stream = OpenStream(target_service=service, stream_id=int(sid))
        await s.send_all(encode_message(FrameType.OPEN_STREAM, open_stream))
        print("bad consumer opened", flush=True)
        await asyncio.sleep(float(seconds))

    asyncio.run(main(*sys.argv[1:]))
    """
)


class RawProvider:
    """A provider that echoes every stream, checkpoints the ones it is told to, and can
    send large CANDIDATE_OFFERs (a few KiB each) for a stream: many candidates."""

    def __init__(self, agent: RawAgent) -> None:
        self.agent = agent
        self.opened: dict[int, str] = {}
        """Stream id -> consumer URI, from INCOMING_STREAM."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._new_stream = asyncio.Event()
        self._accept = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        with contextlib.suppress(TransportError):
            while True:
                stream = await self.agent.conn.accept_stream()  # type: ignore[attr-defined]
                task = asyncio.get_running_loop().create_task(self._serve(stream))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: Stream) -> None:
        reader = FrameReader(stream)
        with contextlib.suppress(TransportError):
            frame = await reader.read_frame()
            assert frame is not None and frame.type == FrameType.INCOMING_STREAM
            incoming = decode_message(frame)
            await stream.send_all(encode_message(FrameType.STREAM_ACCEPT))
            self.opened[int(incoming.stream_id)] = str(incoming.source_agent_uri)  # type: ignore[union-attr]
            self._new_stream.set()
            data = reader.take_leftover()
            while True:
                if data:
                    await stream.send_all(data)
                data = await stream.receive_some()
                if not data:
                    break

    async def wait_opened(self, sid: int) -> None:
        while sid not in self.opened:
            self._new_stream.clear()
            await self._new_stream.wait()

    async def checkpoints(self, sid: int, seconds: float) -> None:
        """STREAM_CHECKPOINT for ``sid`` every 100 ms, as our agents do."""
        deadline = time.monotonic() + seconds
        position = 0
        while time.monotonic() < deadline:
            position += 1
            await self.agent.send_ctrl(
                FrameType.STREAM_CHECKPOINT,
                StreamCheckpoint(stream_id=sid, my_position=position, peer_ack_position=position),
            )
            await asyncio.sleep(0.1)

    async def offers(self, sid: int, total: int) -> None:
        """``total`` bytes of CANDIDATE_OFFERs for ``sid``, ~8 KiB each."""
        offer = CandidateOffer(
            stream_id=sid,
            candidates=[
                Candidate(kind="host", ip=f"10.0.{i // 250}.{i % 250}", port=40000 + i)
                for i in range(400)
            ],
        )
        sent = 0
        while sent < total:
            await self.agent.send_ctrl(FrameType.CANDIDATE_OFFER, offer)
            sent += offer.ByteSize()
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        self._accept.cancel()
        for task in list(self._tasks):
            task.cancel()
        await self.agent.close()


@pytest.mark.timeout(120)
async def test_a_consumer_that_never_reads_its_control_stream_stalls_nobody(
    cluster: Cluster, pki: DevPki
) -> None:
    relay = cluster.start_relay()
    provider = RawProvider(await RawAgent.connect(relay, pki.agent(0), pki.ca_cert))
    await provider.agent.send_ctrl(FrameType.REGISTER, Register(service_name="svc"))
    observer = await RawAgent.connect(relay, pki.agent(1), pki.ca_cert)
    bad_ident = pki.issue_agent("bad-consumer")
    bad_sid = secrets.randbits(63) | 1
    try:
        await asyncio.sleep(0.5)  # REGISTER handled
        sid, stream = await observer.open("svc")
        host, port = relay.addr.rsplit(":", 1)
        identity = [str(bad_ident.cert), str(bad_ident.key), str(pki.ca_cert), bad_ident.uri]
        argv = [sys.executable, "-c", BAD_CONSUMER, host, port, *identity, "svc", str(bad_sid)]
        bad = subprocess.Popen(  # noqa: ASYNC220 - started once; it never blocks the loop
            [*argv, "20"],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(15):
                await provider.wait_opened(bad_sid)
            started = time.monotonic()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(provider.checkpoints(sid, 12.0))
                tg.create_task(provider.offers(bad_sid, 4 << 20))
                echoed = await echo_loop(stream, 12.0)
        finally:
            bad.kill()
            out = bad.communicate(timeout=5)[0].decode(errors="replace")
        times = [t for t in observer.checkpoints.get(sid, []) if t >= started]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        longest = max(gaps, default=float("inf"))
        print(
            f"\nobserver: {echoed // KiB} KiB echoed, {len(times)} checkpoints from the provider"
            f" while the bad consumer ran; longest gap {longest * 1000:.0f} ms"
        )
        assert len(times) >= 80, f"only {len(times)} checkpoints in 12 s\n{out}"
        assert longest < 1.0, f"the provider's checkpoints stalled {longest:.1f}s"
        # The relay closed the bad consumer's connection, with the reason.
        rec = relay.wait_for(
            "agent not reading its control stream; closing", uri=bad_ident.uri, timeout=5
        )
        assert "not read" in str(rec.get("err", "")), rec
    finally:
        await observer.close()
        await provider.close()


@pytest.mark.timeout(60)
async def test_frames_naming_another_agents_stream_change_nothing(
    cluster: Cluster, pki: DevPki, backends: Backends
) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    cluster.start_agent(pki.agent(0), relay, expose={"svc": echo.addr})
    owner = await RawAgent.connect(relay, pki.agent(1), pki.ca_cert)
    squatter = await RawAgent.connect(relay, pki.issue_agent("squatter"), pki.ca_cert)
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
        with pytest.raises(BrokenResourceError) as refused:
            async with asyncio.timeout(5):
                while await claim.receive_some():
                    pass  # the relay resets the claim; it never echoes
        assert refused.value.code == StreamEndCode.REFUSED  # final: no point retrying
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


@pytest.mark.timeout(90)
async def test_a_squatter_cannot_claim_a_stream_after_a_relay_restart(
    cluster: Cluster, pki: DevPki, backends: Backends
) -> None:
    """The restarted relay has no record of the stream; our agents name their peer in
    STREAM_RESUME, so a half from anyone else is never paired with theirs."""
    relay = cluster.start_relay()
    echo = backends.echo()
    cluster.start_agent(pki.agent(0), relay, expose={"svc": echo.addr})
    consumer = cluster.start_agent(pki.agent(1), relay, consume=["svc"])
    squatter_ident = pki.issue_agent("squatter-2")
    reader, writer = await asyncio.open_connection("127.0.0.1", consumer.port("svc"))
    try:
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 10) == b"before"
        opened = consumer.wait_for("session: stream opened", svc="svc", timeout=5)
        sid = int(opened["stream_id"])
        port = int(relay.addr.rsplit(":", 1)[1])
        relay.kill()
        relay2 = cluster.start_relay(port=port, name="relay-restarted")
        squatter = await RawAgent.connect(relay2, squatter_ident, pki.ca_cert)
        claim = await squatter.conn.open_stream()  # type: ignore[attr-defined]
        await claim.send_all(
            encode_message(
                FrameType.STREAM_RESUME,
                StreamResume(stream_id=sid, my_position=0, peer_ack_position=0),
            )
        )
        writer.write(b"after")  # stalls until the stream is resumed by its own agents
        assert await asyncio.wait_for(reader.readexactly(5), 30) == b"after"
        relay2.wait_for("stream resumed", stream_id=sid, timeout=5)
        relay2.wait_for(
            "frame for another agent's stream refused", uri=squatter_ident.uri, timeout=5
        )
        with pytest.raises(TransportError):
            async with asyncio.timeout(5):
                while await claim.receive_some():
                    pass  # never echoed: reset
        await squatter.close()
    finally:
        writer.close()
