"""ORP frame type codes (spec 01, "Frame types"; spec 02 §0).

The code occupies the low 11 bits of the first two header bytes, so it ranges over
``0x000..0x7FF``. Codes not listed here are legal on the wire: the decoder returns them as
plain ``int`` and the relay ignores them.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["FrameType"]


class FrameType(IntEnum):
    """Every frame type of the reference shared library, with its spec names."""

    # Session setup, control stream (spec 02 §2.3, §4).
    HELLO = 0x001
    HELLO_ACK = 0x002
    REGISTER = 0x003
    REGISTER_ACK = 0x004
    RESOLVE = 0x005  # unused by the reference
    RESOLVE_RESP = 0x006  # unused by the reference

    # Opening a data stream (spec 02 §6).
    OPEN_STREAM = 0x010
    INCOMING_STREAM = 0x011
    STREAM_ACCEPT = 0x012
    STREAM_REJECT = 0x013

    # Liveness, control stream; both carry an empty payload.
    PING = 0x020
    PONG = 0x021

    POLICY_UPDATE = 0x030  # unused by the reference
    METRIC_REPORT = 0x040  # unused by the reference
    GOAWAY = 0x0FF  # unused by the reference

    # Defined but never put on the wire by the reference (spec 01).
    STREAM_INIT = 0x100
    STREAM_DATA = 0x101
    STREAM_FIN = 0x102
    STREAM_RESET = 0x103

    # Resume (spec 03 §4).
    STREAM_CHECKPOINT = 0x110
    STREAM_RESUME = 0x111

    # STUN-lite and P2P migration (spec 02 §7).
    OBSERVED_ADDR_QUERY = 0x120
    OBSERVED_ADDR_RESP = 0x121
    CANDIDATE_OFFER = 0x122
    CANDIDATE_ANSWER = 0x123
    MIGRATE_TO_P2P = 0x124
    MIGRATE_TO_RELAY = 0x125

    # Inter-relay forwarding (spec 02 §10); payload is an IncomingStream.
    FORWARD_STREAM = 0x140

    # Forward plane, mini-TURN (spec 02 §8).
    ALLOC_GRANTED = 0x151
    STREAM_READY = 0x152

    # outrelay extensions between two outrelay relays (issue 18), never sent to agents.
    PEER_CONTROL = 0x1F0
    """First frame of a peer connection's control stream (no payload); then agents'
    STREAM_CHECKPOINT / CANDIDATE_* frames of pairs whose other agent is on the peer."""
    PEER_RESUME = 0x1F1
    """First frame of a peer stream carrying a parked resume half (``PeerResume``)."""
