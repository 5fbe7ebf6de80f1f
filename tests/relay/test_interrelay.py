"""Inter-relay forwarding between in-process relays sharing a MemoryMesh (spec 02 §10, issue 18).

Raw agents on different relays: the frames each one sees are checked byte by byte.
"""

from __future__ import annotations

import asyncio

import pytest

from outrelay.orp import (
    CandidateAnswer,
    CandidateOffer,
    FrameType,
    IncomingStream,
    MigrateToRelay,
    StreamCheckpoint,
    StreamEndCode,
    StreamReject,
    StreamResume,
    encode_message,
    encode_reject,
)
from outrelay.pki import issue_relay
from outrelay.transport import BrokenResourceError, QuicTlsConfig, connect_quic

from .meshrelays import free_udp_port, mesh_relays, until
from .rawagent import (
    INCOMING_STREAM,
    OPEN_STREAM,
    STREAM_ACCEPT,
    STREAM_READY,
    WAIT,
    Buffered,
    Pki,
    RawAgent,
    frame,
    new_sid,
    open_pair,
    pb_bytes,
    pb_int,
)

pytestmark = pytest.mark.timeout(60)

STREAM_REJECT = 0x013


async def _open(consumer: RawAgent, service: str, sid: int) -> Buffered:
    stream = await consumer.conn.open_stream()
    await stream.send_all(frame(OPEN_STREAM, pb_bytes(1, service) + pb_int(3, sid)))
    return Buffered(stream)


async def _expect_reject(c: Buffered) -> StreamReject:
    got = await c.read_frame()
    assert got.type == STREAM_REJECT
    reject = StreamReject()
    reject.ParseFromString(got.payload)
    return reject


async def test_open_is_forwarded_to_a_provider_on_a_peer_relay(pki: Pki) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        consumer = await mesh.agent("r1")
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        sid = new_sid()
        pair = await open_pair(consumer, provider, "svc-a", sid)
        # Our extension: STREAM_READY to both agents, with the stream id.
        assert dict(pair.c_ready.fields())[1] == sid
        assert dict(pair.p_ready.fields())[1] == sid
        await pair.exchange(b"one")
        await pair.exchange(b"two" * 5000)
        r1, r2 = mesh.relays["r1"], mesh.relays["r2"]
        assert r1.statistics().pairs == 1 and r2.statistics().pairs == 1
        assert r1.state.remote.relay_of(sid, provider.uri, 0) == "r2"
        assert (r2.state.remote.relay_of(sid, consumer.uri, 0) or "").startswith("r1@127.0.0.1:")
        assert r1.state.counters.intra_relay_hops == 1


async def test_pipelined_bytes_arrive_once_before_the_accept(pki: Pki) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        consumer = await mesh.agent("r1", ("pipeline",))
        provider = await mesh.agent("r2", ("pipeline",))
        await provider.register("svc-a")
        sid = new_sid()
        c_stream = await consumer.conn.open_stream()
        await c_stream.send_all(
            frame(OPEN_STREAM, pb_bytes(1, "svc-a") + pb_int(3, sid)) + b"early-1;"
        )
        async with asyncio.timeout(WAIT):
            p_stream = await provider.conn.accept_stream()
        p = Buffered(p_stream)
        incoming = await p.read_frame()
        assert incoming.type == INCOMING_STREAM
        assert dict(incoming.fields()).get(100) == 1  # outrelay_spliced: bytes follow
        assert await p.read_exact(8) == b"early-1;"
        await c_stream.send_all(b"early-2;")  # before the provider answers
        assert await p.read_exact(8) == b"early-2;"
        await p_stream.send_all(frame(STREAM_ACCEPT) + b"reply")
        c = Buffered(c_stream)
        assert await c.read_exact(5) == b"reply"
        await c_stream.send_all(b"late;")
        assert await p.read_exact(5) == b"late;"
        await c_stream.send_eof()
        await p.wait_eof(WAIT)
        assert bytes(p.buf) == b""  # nothing twice


async def test_checkpoints_cross_relays_also_after_a_clean_close(pki: Pki) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        consumer = await mesh.agent("r1")
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        sid = new_sid()
        pair = await open_pair(consumer, provider, "svc-a", sid)
        checkpoint = encode_message(
            FrameType.STREAM_CHECKPOINT,
            StreamCheckpoint(stream_id=sid, my_position=3, peer_ack_position=4),
        )
        await consumer.send(checkpoint)
        assert (await provider.next_frame()).raw == checkpoint
        back = encode_message(
            FrameType.STREAM_CHECKPOINT,
            StreamCheckpoint(stream_id=sid, my_position=5, peer_ack_position=6),
        )
        await provider.send(back)
        assert (await consumer.next_frame()).raw == back
        # A clean close on both ends: the splices end, the pairs are forgotten ...
        await pair.c.stream.send_eof()
        await pair.p.wait_eof(WAIT)
        await pair.p.stream.send_eof()
        await pair.c.wait_eof(WAIT)
        await until(lambda: not any(r.statistics().pairs for r in mesh.relays.values()))
        # ... and the close-ack checkpoints still cross (closed pairs, CAP_CLOSE_ACK).
        last = encode_message(
            FrameType.STREAM_CHECKPOINT,
            StreamCheckpoint(stream_id=sid, my_position=7, peer_ack_position=8),
        )
        await consumer.send(last)
        assert (await provider.next_frame()).raw == last


async def test_a_far_reject_reaches_the_consumer_and_the_pool_survives(pki: Pki) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        consumer = await mesh.agent("r1")
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        sibling = await open_pair(consumer, provider, "svc-a", new_sid())
        c = await _open(consumer, "svc-a", new_sid())
        async with asyncio.timeout(WAIT):
            p_stream = await provider.conn.accept_stream()
        assert (await Buffered(p_stream).read_frame()).type == INCOMING_STREAM
        await p_stream.send_all(encode_reject(451, "not today"))
        reject = await _expect_reject(c)
        assert (reject.code, reject.reason) == (451, "not today")
        # A registered binding whose provider left r2 meanwhile: r2 answers 404.
        mesh.views["r2"].publish_binding("acme", "svc-ghost", "outrelay://acme/ghost", "")
        reject = await _expect_reject(await _open(consumer, "svc-ghost", new_sid()))
        assert (reject.code, reject.reason) == (404, "service not found")
        # The pooled connection carried all of it: the sibling stream still flows, and the
        # connection carries the next open.
        await sibling.exchange(b"still here")
        pair = await open_pair(consumer, provider, "svc-a", new_sid())
        await pair.exchange(b"after rejects")
        peers = mesh.relays["r1"].state.peers
        assert peers is not None and peers.dials == 1


async def test_the_far_relays_policy_is_enforced_too(pki: Pki) -> None:
    async with mesh_relays(pki, "r1") as mesh:
        deny_callee = [
            {"id": "c", "caller": "outrelay://acme/*", "target": "svc-*", "decision": "allow"},
            {"id": "no", "caller": "*", "target": "outrelay://acme/*", "decision": "deny"},
        ]
        await mesh.start("r2", deny_callee)
        consumer = await mesh.agent("r1")
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        reject = await _expect_reject(await _open(consumer, "svc-a", new_sid()))
        assert reject.code == 403 and reject.reason.startswith("denied (callee): ")


async def test_an_unreachable_peer_relay_is_502(pki: Pki) -> None:
    async with mesh_relays(pki) as mesh:
        await mesh.start("r1", peer_dial_timeout=1.0)  # nothing answers: the dial times out
        ghost = mesh.hub.view("r9", "local", f"127.0.0.1:{free_udp_port()}")
        ghost.publish_binding("acme", "svc-a", "outrelay://acme/far", "")
        consumer = await mesh.agent("r1")
        reject = await _expect_reject(await _open(consumer, "svc-a", new_sid()))
        assert (reject.code, reject.reason) == (502, "peer relay unreachable")


async def test_a_lost_peer_relay_resets_the_consumer_with_link(pki: Pki) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        consumer = await mesh.agent("r1")
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        pair = await open_pair(consumer, provider, "svc-a", new_sid())
        await pair.exchange(b"x")
        await mesh.stop("r2")
        with pytest.raises(BrokenResourceError) as caught:
            async with asyncio.timeout(WAIT):
                while await pair.c.stream.receive_some(65536):
                    pass
        assert caught.value.code == StreamEndCode.LINK


async def test_a_reference_forward_stream_without_stream_id(pki: Pki) -> None:
    """Spec 02 §10.1: a reference relay's FORWARD_STREAM (stream_id 0, no extensions)."""
    async with mesh_relays(pki, "r2") as mesh:
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        cert, key = pki.dev.write("relay-ref", issue_relay(pki.dev.ca, relay_id="ref"))
        tls = QuicTlsConfig(str(cert), str(key), str(pki.dev.ca_cert))
        async with asyncio.timeout(WAIT):
            conn = await connect_quic("127.0.0.1", mesh.ports["r2"], tls)
        try:
            f_stream = await conn.open_stream()
            _, c_uri = pki.agent()
            forward = IncomingStream(target_service="svc-a", source_agent_uri=c_uri)
            await f_stream.send_all(encode_message(FrameType.FORWARD_STREAM, forward))
            async with asyncio.timeout(WAIT):
                p_stream = await provider.conn.accept_stream()
            p = Buffered(p_stream)
            incoming = await p.read_frame()
            assert incoming.type == INCOMING_STREAM
            assert dict(incoming.fields()).get(4, 0) == 0
            await p_stream.send_all(frame(STREAM_ACCEPT) + b"hi")
            f = Buffered(f_stream)
            accept = await f.read_frame()
            assert accept.raw == frame(STREAM_ACCEPT)  # empty, as §10.1 step 7
            assert await f.read_exact(2) == b"hi"
            await f_stream.send_all(b"there")
            assert await p.read_exact(5) == b"there"
            await provider.ping_pong()  # no STREAM_READY was queued before the PONG
            assert mesh.relays["r2"].statistics().pairs == 0
        finally:
            conn.close(0, "")


async def test_ready_frames_name_the_remote_peer(pki: Pki) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        consumer = await mesh.agent("r1", ("resume-peer",))
        provider = await mesh.agent("r2", ("resume-peer",))
        await provider.register("svc-a")
        pair = await open_pair(consumer, provider, "svc-a", new_sid())
        assert dict(pair.c_ready.fields())[101] == provider.uri.encode()
        assert dict(pair.p_ready.fields())[101] == consumer.uri.encode()
        assert pair.c_ready.type == STREAM_READY


async def _resume_half(agent: RawAgent, sid: int, mine: int, acked: int, peer: str) -> Buffered:
    stream = await agent.conn.open_stream()
    half = StreamResume(
        stream_id=sid, my_position=mine, peer_ack_position=acked, outrelay_peer_uri=peer
    )
    await stream.send_all(encode_message(FrameType.STREAM_RESUME, half) + b"surplus;")
    return Buffered(stream)


async def _echo_of(half: Buffered) -> tuple[int, int]:
    got = await half.read_frame()
    assert got.type == FrameType.STREAM_RESUME
    echo = StreamResume()
    echo.ParseFromString(got.payload)
    return echo.my_position, echo.peer_ack_position


@pytest.mark.parametrize("first", ["r1", "r2"])
async def test_halves_parked_on_two_relays_meet_through_the_mesh(pki: Pki, first: str) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        a = await mesh.agent("r1")
        b = await mesh.agent("r2")
        sid = new_sid()
        if first == "r1":
            a_half = await _resume_half(a, sid, 10, 20, b.uri)
            await until(lambda: len(mesh.hub.halves) == 1)
            b_half = await _resume_half(b, sid, 30, 5, a.uri)
        else:
            b_half = await _resume_half(b, sid, 30, 5, a.uri)
            await until(lambda: len(mesh.hub.halves) == 1)
            a_half = await _resume_half(a, sid, 10, 20, b.uri)
        # Each agent gets the other's positions (the [REC] echo), then the other's bytes.
        assert await _echo_of(a_half) == (30, 5)
        assert await _echo_of(b_half) == (10, 20)
        assert await a_half.read_exact(8) == b"surplus;"
        assert await b_half.read_exact(8) == b"surplus;"
        await a_half.stream.send_all(b"a->b")
        assert await b_half.read_exact(4) == b"a->b"
        await b_half.stream.send_all(b"b->a")
        assert await a_half.read_exact(4) == b"b->a"
        assert not mesh.hub.halves  # withdrawn on the match
        # The pair is recorded on both relays: checkpoints cross.
        checkpoint = encode_message(
            FrameType.STREAM_CHECKPOINT,
            StreamCheckpoint(stream_id=sid, my_position=14, peer_ack_position=24),
        )
        await a.send(checkpoint)
        assert (await b.next_frame()).raw == checkpoint
        later = mesh.relays["r2" if first == "r1" else "r1"]
        assert later._resume.remote is not None and later._resume.remote.forwarded == 1


async def test_halves_that_name_other_peers_do_not_meet(pki: Pki) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        a = await mesh.agent("r1")
        b = await mesh.agent("r2")
        sid = new_sid()
        a_half = await _resume_half(a, sid, 10, 20, "outrelay://acme/someone-else")
        await until(lambda: len(mesh.hub.halves) == 1)
        await _resume_half(b, sid, 30, 5, a.uri)
        await until(lambda: len(mesh.hub.halves) == 2)
        await a_half.assert_open()
        assert mesh.relays["r1"].statistics().parked_halves == 1
        assert mesh.relays["r2"].statistics().parked_halves == 1


@pytest.mark.parametrize("closer", ["consumer", "provider"])
async def test_an_applications_close_passes_through_the_hop(pki: Pki, closer: str) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        consumer = await mesh.agent("r1")
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        pair = await open_pair(consumer, provider, "svc-a", new_sid())
        await pair.exchange(b"x")
        closing, other = (pair.c, pair.p) if closer == "consumer" else (pair.p, pair.c)
        closing.stream.abort(StreamEndCode.APPLICATION_CLOSED)
        with pytest.raises(BrokenResourceError) as caught:
            async with asyncio.timeout(WAIT):
                while await other.stream.receive_some(65536):
                    pass
        assert caught.value.code == StreamEndCode.APPLICATION_CLOSED


@pytest.mark.parametrize("first", ["migrate", "resume"])
async def test_a_migrate_to_relay_half_meets_a_resume_half_on_another_relay(
    pki: Pki, first: str
) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        a = await mesh.agent("r1")
        b = await mesh.agent("r2")
        sid = new_sid()

        async def migrate_half() -> Buffered:
            stream = await a.conn.open_stream()
            half = MigrateToRelay(stream_id=sid, my_position=10, peer_ack_position=20)
            await stream.send_all(encode_message(FrameType.MIGRATE_TO_RELAY, half) + b"m;")
            return Buffered(stream)

        if first == "migrate":
            a_half = await migrate_half()
            await until(lambda: len(mesh.hub.halves) == 1)
            b_half = await _resume_half(b, sid, 30, 5, a.uri)
        else:
            b_half = await _resume_half(b, sid, 30, 5, a.uri)
            await until(lambda: len(mesh.hub.halves) == 1)
            a_half = await migrate_half()
        assert await _echo_of(b_half) == (10, 20)  # only the STREAM_RESUME half is echoed
        assert await a_half.read_exact(8) == b"surplus;"  # no echo before B's bytes
        assert await b_half.read_exact(2) == b"m;"


async def test_peers_sharing_one_certificate_keep_their_pairs_apart(pki: Pki) -> None:
    """Two relays presenting the same relay certificate: r2 routes each pair's control
    frames back over the connection that carried the pair."""
    async with mesh_relays(pki, "r2") as mesh:
        shared = pki.dev.write("relay-shared", issue_relay(pki.dev.ca, relay_id="shared"))
        await mesh.start("r1", cert=shared)
        await mesh.start("r3", cert=shared)
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        consumers = [await mesh.agent("r1"), await mesh.agent("r3")]
        sids = [new_sid(), new_sid()]
        for consumer, sid in zip(consumers, sids, strict=True):
            await open_pair(consumer, provider, "svc-a", sid)
        for consumer, sid in zip(consumers, sids, strict=True):
            back = encode_message(
                FrameType.STREAM_CHECKPOINT,
                StreamCheckpoint(stream_id=sid, my_position=1, peer_ack_position=2),
            )
            await provider.send(back)
            assert (await consumer.next_frame()).raw == back


async def test_a_remote_agent_resuming_elsewhere_resets_our_side_at_once(pki: Pki) -> None:
    """The provider's relay looks alive, but the provider parks a resume half on r3 (its
    link to r2 broke): r1 resets the consumer's stream with LINK now, not after the QUIC
    idle timeout, and the consumer's half meets the provider's through the mesh."""
    async with mesh_relays(pki, "r1", "r2", "r3") as mesh:
        consumer = await mesh.agent("r1")
        p_identity = pki.agent()
        provider = await mesh.agent("r2", identity=p_identity)
        await provider.register("svc-a")
        sid = new_sid()
        pair = await open_pair(consumer, provider, "svc-a", sid)
        await pair.exchange(b"x")
        moved = await mesh.agent("r3", identity=p_identity)
        p_half = await _resume_half(moved, sid, 1, 1, consumer.uri)
        with pytest.raises(BrokenResourceError) as caught:
            async with asyncio.timeout(WAIT):
                while await pair.c.stream.receive_some(65536):
                    pass
        assert caught.value.code == StreamEndCode.LINK
        c_half = await _resume_half(consumer, sid, 1, 1, provider.uri)
        assert await _echo_of(c_half) == (1, 1)
        assert await _echo_of(p_half) == (1, 1)


async def test_the_consumers_relay_decides_both_sides_before_forwarding(pki: Pki) -> None:
    async with mesh_relays(pki, "r2") as mesh:
        deny_callee = [
            {"id": "c", "caller": "outrelay://acme/*", "target": "svc-*", "decision": "allow"},
            {"id": "no", "caller": "*", "target": "outrelay://acme/*", "decision": "deny"},
        ]
        r1 = await mesh.start("r1", deny_callee)
        consumer = await mesh.agent("r1")
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        await until(lambda: mesh.sees("r2", "svc-a"))
        reject = await _expect_reject(await _open(consumer, "svc-a", new_sid()))
        assert reject.code == 403 and reject.reason.startswith("denied (callee): ")
        assert r1.state.peers is not None and r1.state.peers.dials == 0  # never forwarded
        reject = await _expect_reject(await _open(consumer, "other", new_sid()))
        assert reject.code == 403 and reject.reason.startswith("denied: ")  # caller side


async def test_candidates_cross_relays_and_strangers_are_refused(pki: Pki) -> None:
    async with mesh_relays(pki, "r1", "r2") as mesh:
        consumer = await mesh.agent("r1")
        provider = await mesh.agent("r2")
        await provider.register("svc-a")
        sid = new_sid()
        await open_pair(consumer, provider, "svc-a", sid)
        offer = encode_message(FrameType.CANDIDATE_OFFER, CandidateOffer(stream_id=sid))
        await consumer.send(offer)
        assert (await provider.next_frame()).raw == offer
        answer = encode_message(FrameType.CANDIDATE_ANSWER, CandidateAnswer(stream_id=sid))
        await provider.send(answer)
        assert (await consumer.next_frame()).raw == answer
        # An agent that is not one of the pair's may not speak for it.
        stranger = await mesh.agent("r1")
        await stranger.send(offer)
        await provider.ping_pong()  # nothing was queued for the provider before the PONG
        await stranger.ping_pong()
        assert mesh.relays["r1"].state.refused_not_owner == 1
