"""agent.control.ControlState: what each control frame settles, without sockets (spec 03 §3)."""

from __future__ import annotations

import pytest

from outrelay.agent.control import (
    PONG_GRACE,
    AddressInvalid,
    AddressObserved,
    CandidatesReceived,
    CheckpointReceived,
    ControlState,
    ModeResolved,
    Registered,
    StreamMode,
    Unexpected,
)
from outrelay.orp import (
    AllocGranted,
    CandidateOffer,
    FrameType,
    ObservedAddrResp,
    P2PMode,
    RegisterAck,
    StreamCheckpoint,
    StreamReady,
    encode_p2p_mode,
)

pytestmark = pytest.mark.timeout(20)


def test_register_acks_answer_the_oldest_waiting_register() -> None:
    state = ControlState()
    state.new_link(0.0)
    first, second = state.register(), state.register()
    ack = RegisterAck(service_id="s1")
    assert state.receive(FrameType.REGISTER_ACK, ack, 1.0) == [Registered(first, "s1")]
    assert state.receive(FrameType.REGISTER_ACK, RegisterAck(), 1.0) == [Registered(second, "")]
    [extra] = state.receive(FrameType.REGISTER_ACK, RegisterAck(), 1.0)
    assert isinstance(extra, Unexpected) and not extra.quiet


def test_a_forgotten_register_is_skipped_and_a_new_link_forgets_them_all() -> None:
    state = ControlState()
    gone, kept = state.register(), state.register()
    state.forget_register(gone)
    assert state.receive(FrameType.REGISTER_ACK, RegisterAck(), 0.0) == [Registered(kept, "")]
    state.register()
    state.new_link(5.0)
    assert isinstance(state.receive(FrameType.REGISTER_ACK, RegisterAck(), 5.0)[0], Unexpected)


def test_stream_ready_resolves_splice_once_and_keeps_the_extensions() -> None:
    state = ControlState()
    state.expect_mode(7)
    ready = StreamReady(
        stream_id=7,
        outrelay_p2p_mode=encode_p2p_mode(P2PMode.REQUIRED),
        outrelay_peer_uri="outrelay://t/b",
    )
    assert state.receive(FrameType.STREAM_READY, ready, 0.0) == [ModeResolved(7, StreamMode.SPLICE)]
    assert state.p2p_mode(7) is P2PMode.REQUIRED
    assert state.peer_of(7) == "outrelay://t/b"
    [again] = state.receive(FrameType.STREAM_READY, ready, 0.0)
    assert isinstance(again, Unexpected) and again.quiet


def test_stream_ready_for_a_stranger_keeps_nothing() -> None:
    state = ControlState()
    ready = StreamReady(stream_id=9, outrelay_p2p_mode=2, outrelay_peer_uri="outrelay://t/x")
    [dropped] = state.receive(FrameType.STREAM_READY, ready, 0.0)
    assert isinstance(dropped, Unexpected)
    assert state.p2p_mode(9) is None and state.peer_of(9) == ""


def test_tracked_stream_learns_extensions_without_a_waiter_and_untrack_forgets() -> None:
    state = ControlState()
    state.track(3)
    state.receive(FrameType.STREAM_READY, StreamReady(stream_id=3, outrelay_p2p_mode=1), 0.0)
    assert state.p2p_mode(3) is P2PMode.ALLOWED
    assert state.is_active(3) and 3 in state.ids_in_use()
    state.untrack(3)
    assert state.p2p_mode(3) is None and not state.is_active(3)


def test_alloc_granted_resolves_forward_and_keeps_the_grant_once() -> None:
    state = ControlState()
    state.expect_mode(4)
    grant = AllocGranted(stream_id=4, my_allocation=1, peer_allocation=2)
    assert state.receive(FrameType.ALLOC_GRANTED, grant, 0.0) == [
        ModeResolved(4, StreamMode.FORWARD)
    ]
    assert state.take_grant(4) == grant
    assert state.take_grant(4) is None


def test_alloc_granted_after_forget_mode_is_dropped_without_a_grant() -> None:
    state = ControlState()
    state.expect_mode(4)
    state.forget_mode(4)
    grant = AllocGranted(stream_id=4)
    assert isinstance(state.receive(FrameType.ALLOC_GRANTED, grant, 0.0)[0], Unexpected)
    assert state.take_grant(4) is None


def test_observed_address_is_matched_by_request_id() -> None:
    state = ControlState()
    first, second = state.query_address(), state.query_address()
    assert first != second
    resp = ObservedAddrResp(request_id=second, ip="fe80::1%eth0", port=0x1_0050)
    assert state.receive(FrameType.OBSERVED_ADDR_RESP, resp, 0.0) == [
        AddressObserved(second, "fe80::1", 0x50)
    ]
    [late] = state.receive(FrameType.OBSERVED_ADDR_RESP, resp, 0.0)
    assert isinstance(late, Unexpected) and late.quiet
    bogus = ObservedAddrResp(request_id=first, ip="not-an-ip", port=1)
    [invalid] = state.receive(FrameType.OBSERVED_ADDR_RESP, bogus, 0.0)
    assert isinstance(invalid, AddressInvalid) and invalid.request_id == first


def test_forgotten_query_is_not_answered() -> None:
    state = ControlState()
    request_id = state.query_address()
    state.forget_query(request_id)
    resp = ObservedAddrResp(request_id=request_id, ip="192.0.2.1", port=1)
    assert isinstance(state.receive(FrameType.OBSERVED_ADDR_RESP, resp, 0.0)[0], Unexpected)


def test_checkpoints_and_candidates_are_handed_on() -> None:
    state = ControlState()
    checkpoint = StreamCheckpoint(stream_id=5, my_position=10, peer_ack_position=3)
    assert state.receive(FrameType.STREAM_CHECKPOINT, checkpoint, 0.0) == [
        CheckpointReceived(5, 10, 3)
    ]
    offer = CandidateOffer(stream_id=5)
    assert state.receive(FrameType.CANDIDATE_OFFER, offer, 0.0) == [
        CandidatesReceived(FrameType.CANDIDATE_OFFER, offer)
    ]


def test_pong_keeps_the_link_alive_by_the_clock_argument() -> None:
    state = ControlState()
    state.new_link(100.0)
    assert not state.pong_overdue(100.0 + PONG_GRACE)
    assert state.pong_overdue(100.0 + PONG_GRACE + 0.1)
    assert state.receive(FrameType.PONG, None, 130.0) == []
    assert not state.pong_overdue(130.0 + PONG_GRACE)


def test_any_other_frame_is_unexpected() -> None:
    [action] = ControlState().receive(FrameType.HELLO_ACK, None, 0.0)
    assert isinstance(action, Unexpected) and not action.quiet
