"""Golden vectors: every hex example of spec 02 §0 and spec 03 §3.8, byte for byte.

The hex strings are copied verbatim from the spec; where the spec says "followed by the N
ASCII bytes of ...", the bytes are appended from the string itself. Each vector pairs the
bytes with the frame type and message they encode; ``None`` means an empty payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from outrelay.orp import (
    FrameType,
    Hello,
    Message,
    ObservedAddrQuery,
    OpenStream,
    Register,
    StreamCheckpoint,
    StreamReady,
    StreamReject,
    StreamResume,
)


@dataclass(frozen=True)
class GoldenVector:
    """One spec example."""

    name: str
    source: str
    frame_type: FrameType
    message: Message | None
    wire: bytes


def _hex(text: str, tail: str = "") -> bytes:
    """Spec-style hex (``"20 02 00 ..."``), optionally followed by ``tail`` as ASCII."""
    return bytes.fromhex(text) + tail.encode("ascii")


AGENT_URI = "outrelay://acme/agent/00000000-0000-0000-0000-000000000002"

GOLDEN: tuple[GoldenVector, ...] = (
    # --- spec 02 §0, "Sample encodings" ---------------------------------------------------
    GoldenVector(
        "HELLO_ACK (empty)",
        "spec 02 §0",
        FrameType.HELLO_ACK,
        None,
        _hex("20 02 00 00 00 00 00 00"),
    ),
    GoldenVector(
        "PONG (empty)",
        "spec 02 §0",
        FrameType.PONG,
        None,
        _hex("20 21 00 00 00 00 00 00"),
    ),
    GoldenVector(
        "STREAM_READY{stream_id=0xfeedface}",
        "spec 02 §0",
        FrameType.STREAM_READY,
        StreamReady(stream_id=0xFEEDFACE),
        _hex("21 52 00 00 00 00 00 06 08 ce f5 b7 f7 0f"),
    ),
    GoldenVector(
        'STREAM_REJECT{404,"service not found"}',
        "spec 02 §0",
        FrameType.STREAM_REJECT,
        StreamReject(code=404, reason="service not found"),
        _hex("20 13 00 00 00 00 00 16 08 94 03 12 11", "service not found"),
    ),
    # --- spec 03 §3.8, "Wire examples (hex)" -----------------------------------------------
    GoldenVector(
        "HELLO outrelay://acme/agent/...0002",
        "spec 03 §3.8",
        FrameType.HELLO,
        Hello(protocol_version="orp/1", agent_uri=AGENT_URI),
        _hex("20 01 00 00 00 00 00 43 0a 05 6f 72 70 2f 31 12 3a", AGENT_URI),
    ),
    GoldenVector(
        "REGISTER svc-echo / 127.0.0.1:8080",
        "spec 03 §3.8",
        FrameType.REGISTER,
        Register(service_name="svc-echo", local_addr="127.0.0.1:8080"),
        _hex(
            "20 03 00 00 00 00 00 1a 0a 08 73 76 63 2d 65 63 68 6f 12 0e 31 32 37 2e 30 2e 30 2e"
            " 31 3a 38 30 38 30"
        ),
    ),
    GoldenVector(
        "REGISTER replayed on reconnect",
        "spec 03 §3.8",
        FrameType.REGISTER,
        Register(service_name="svc-echo"),
        _hex("20 03 00 00 00 00 00 0a 0a 08 73 76 63 2d 65 63 68 6f"),
    ),
    GoldenVector(
        "OPEN_STREAM svc-echo id 0x0123456789abcdef",
        "spec 03 §3.8",
        FrameType.OPEN_STREAM,
        OpenStream(target_service="svc-echo", stream_id=0x0123456789ABCDEF),
        _hex("20 10 00 00 00 00 00 14 0a 08 73 76 63 2d 65 63 68 6f 18 ef 9b af cd f8 ac d1 91 01"),
    ),
    GoldenVector(
        "STREAM_ACCEPT",
        "spec 03 §3.8",
        FrameType.STREAM_ACCEPT,
        None,
        _hex("20 12 00 00 00 00 00 00"),
    ),
    GoldenVector(
        'STREAM_REJECT 404 "no handler"',
        "spec 03 §3.8",
        FrameType.STREAM_REJECT,
        StreamReject(code=404, reason="no handler"),
        _hex("20 13 00 00 00 00 00 0f 08 94 03 12 0a 6e 6f 20 68 61 6e 64 6c 65 72"),
    ),
    GoldenVector(
        "STREAM_RESUME id 0xfeedface my=100 peer_ack=30",
        "spec 03 §3.8",
        FrameType.STREAM_RESUME,
        StreamResume(stream_id=0xFEEDFACE, my_position=100, peer_ack_position=30),
        _hex("21 11 00 00 00 00 00 0a 08 ce f5 b7 f7 0f 10 64 18 1e"),
    ),
    GoldenVector(
        "STREAM_CHECKPOINT id 0x1234 my=64 peer_ack=48",
        "spec 03 §3.8",
        FrameType.STREAM_CHECKPOINT,
        StreamCheckpoint(stream_id=0x1234, my_position=64, peer_ack_position=48),
        _hex("21 10 00 00 00 00 00 07 08 b4 24 10 40 18 30"),
    ),
    GoldenVector(
        "OBSERVED_ADDR_QUERY request_id 1",
        "spec 03 §3.8",
        FrameType.OBSERVED_ADDR_QUERY,
        ObservedAddrQuery(request_id=1),
        _hex("21 20 00 00 00 00 00 02 08 01"),
    ),
)

ALL_WIRE: bytes = b"".join(v.wire for v in GOLDEN)
"""Every golden frame, back to back."""
