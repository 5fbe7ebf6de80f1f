"""The public surface of outrelay.orp (STYLE §3, trio's test_exports)."""

from __future__ import annotations

import outrelay.orp as orp

REQUIRED = {
    # errors
    "OrpError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "FrameTooLarge",
    "UnexpectedEOF",
    "MalformedPayload",
    "RejectCode",
    # codec
    "MAX_PAYLOAD",
    "FrameType",
    "Frame",
    "encode_frame",
    "encode_message",
    "FrameDecoder",
    "decode_frame",
    "decode_message",
    "MESSAGE_TYPES",
    # messages (spec 01)
    "Hello",
    "HelloAck",
    "Register",
    "RegisterAck",
    "OpenStream",
    "IncomingStream",
    "StreamAccept",
    "StreamReject",
    "StreamCheckpoint",
    "StreamResume",
    "ObservedAddrQuery",
    "ObservedAddrResp",
    "Candidate",
    "CandidateOffer",
    "CandidateAnswer",
    "MigrateToP2P",
    "MigrateToRelay",
    "AllocGranted",
    "StreamReady",
    # extensions and answers
    "P2PMode",
    "encode_p2p_mode",
    "decode_p2p_mode",
    "classify_open_answer",
    "encode_reject",
}


def test_all_is_complete_and_resolvable() -> None:
    assert set(orp.__all__) >= REQUIRED
    assert len(orp.__all__) == len(set(orp.__all__))
    for name in orp.__all__:
        assert not name.startswith("_")
        assert hasattr(orp, name), name


def test_error_hierarchy() -> None:
    assert issubclass(orp.LocalProtocolError, orp.OrpError)
    assert issubclass(orp.LocalProtocolError, ValueError)
    assert issubclass(orp.RemoteProtocolError, orp.OrpError)
    assert not issubclass(orp.RemoteProtocolError, orp.LocalProtocolError)
    for cls in (orp.FrameTooLarge, orp.UnexpectedEOF, orp.MalformedPayload):
        assert issubclass(cls, orp.RemoteProtocolError)


def test_reject_codes() -> None:
    assert {c.name: int(c) for c in orp.RejectCode} == {
        "FORBIDDEN": 403,
        "NOT_FOUND": 404,
        "STREAM_ID_COLLISION": 409,
        "BAD_GATEWAY": 502,
        "UNAVAILABLE": 503,
    }


def test_frame_type_codes() -> None:
    expected = {
        "HELLO": 0x001,
        "HELLO_ACK": 0x002,
        "REGISTER": 0x003,
        "REGISTER_ACK": 0x004,
        "RESOLVE": 0x005,
        "RESOLVE_RESP": 0x006,
        "OPEN_STREAM": 0x010,
        "INCOMING_STREAM": 0x011,
        "STREAM_ACCEPT": 0x012,
        "STREAM_REJECT": 0x013,
        "PING": 0x020,
        "PONG": 0x021,
        "POLICY_UPDATE": 0x030,
        "METRIC_REPORT": 0x040,
        "GOAWAY": 0x0FF,
        "STREAM_INIT": 0x100,
        "STREAM_DATA": 0x101,
        "STREAM_FIN": 0x102,
        "STREAM_RESET": 0x103,
        "STREAM_CHECKPOINT": 0x110,
        "STREAM_RESUME": 0x111,
        "OBSERVED_ADDR_QUERY": 0x120,
        "OBSERVED_ADDR_RESP": 0x121,
        "CANDIDATE_OFFER": 0x122,
        "CANDIDATE_ANSWER": 0x123,
        "MIGRATE_TO_P2P": 0x124,
        "MIGRATE_TO_RELAY": 0x125,
        "FORWARD_STREAM": 0x140,
        "ALLOC_GRANTED": 0x151,
        "STREAM_READY": 0x152,
        "PEER_CONTROL": 0x1F0,  # ours, relay to relay (issue 18)
        "PEER_RESUME": 0x1F1,
    }
    assert {t.name: t.value for t in orp.FrameType} == expected


def test_frame_is_frozen_with_defaults() -> None:
    frame = orp.Frame(orp.FrameType.PING)
    assert (frame.payload, frame.version, frame.flags) == (b"", 1, 0)
    assert not hasattr(frame, "__dict__")
    try:
        frame.payload = b"x"  # type: ignore[misc]
    except AttributeError:
        pass
    else:
        raise AssertionError("Frame must be frozen")
