"""Our extensions to ORP, negotiated so that reference peers never see a difference.

Spec 02 §2.3: the reference relay ignores ``Hello.capabilities`` and unknown protobuf
fields, and turns every stream reset into a FIN (spec 02 §6.5). So each extension here is
either a capability string that our relay echoes in ``HelloAck.accepted_features`` (an agent
acts on it only when echoed), an extension field numbered from 100 (skipped by reference
decoders), or an application error code on a stream reset that a reference peer treats like
any other reset.

Stream end codes ([REC] beyond spec 03 §4.2)
--------------------------------------------
The reference cannot tell "the application at the other end closed its connection" from
"the relay link broke": both are a reset (code 0) or a FIN, and its agent parks the bridge
for the 30 s resume window either way. We carry the difference in the application error
code of QUIC RESET_STREAM / STOP_SENDING, and in the length field of a yamux
WINDOW_UPDATE|RST frame (hashicorp yamux adds that length to a send window that the RST just
made useless, so it is harmless there). A reset with a code in :data:`FINAL_CODES` ends the
stream on both sides at once; any other code (0 included) means the link failed and the
stream is resumed.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = [
    "CAP_CLOSE_ACK",
    "CAP_INSTANCE",
    "CAP_MESH",
    "CAP_P2P_MODE",
    "CAP_P2P_RESUME_V2",
    "CAP_PIPELINE",
    "CAP_RESUME_PEER",
    "FINAL_CODES",
    "RELAY_CAPABILITIES",
    "P2PMode",
    "StreamEndCode",
    "decode_p2p_mode",
    "encode_p2p_mode",
    "end_code_name",
    "is_final",
]


class StreamEndCode(IntEnum):
    """Application error codes on a stream reset (QUIC) or RST (yamux), ours."""

    LINK = 0
    """The reference's only code: something between the agents failed; resume."""
    APPLICATION_CLOSED = 0x4F01
    """The application (or backend) at that end closed or reset its connection while
    bytes were still flowing: the stream is over, do not resume."""
    AGENT_GONE = 0x4F02
    """The agent at that end exited or restarted: none of its streams can be resumed."""
    REFUSED = 0x4F03
    """The relay refused a resume half: not one of the stream's two agents, or over a
    per-agent bound. Trying again would only be refused again."""


FINAL_CODES: Final = frozenset(
    {StreamEndCode.APPLICATION_CLOSED, StreamEndCode.AGENT_GONE, StreamEndCode.REFUSED}
)
"""Codes that end a stream for good; every other code is a link failure."""


def is_final(code: int | None) -> bool:
    """Does a reset with ``code`` end the stream (rather than call for a resume)?"""
    return code in FINAL_CODES


def end_code_name(code: int | None) -> str:
    """A log word for ``code``: ``application_closed``, ``agent_gone``, ``link`` or the number."""
    if code is None:
        return "link"
    try:
        return StreamEndCode(code).name.lower()
    except ValueError:
        return str(code)


CAP_P2P_MODE: Final = "p2p-mode"
"""HELLO capability: our relay then tells the pair's p2p mode in STREAM_READY
(``StreamReady.outrelay_p2p_mode``, see :func:`encode_p2p_mode`)."""


class P2PMode(IntEnum):
    """The policy's word on P2P for a stream (spec 02 §6.2.4): the proto ``P2PMode`` numbers."""

    ALLOWED = 0
    FORBIDDEN = 1
    REQUIRED = 2


def encode_p2p_mode(mode: int) -> int:
    """``StreamReady.outrelay_p2p_mode`` for ``mode``: its P2PMode number + 1.

    The + 1 keeps 0 (the proto3 default, all a reference relay ever sends) for "not told".
    """
    return int(P2PMode(mode)) + 1


def decode_p2p_mode(value: int) -> P2PMode | None:
    """The :class:`P2PMode` carried by ``StreamReady.outrelay_p2p_mode`` (None: not told).

    A value this version does not know also reads as "not told".
    """
    try:
        return P2PMode(value - 1) if value else None
    except ValueError:
        return None


CAP_P2P_RESUME_V2: Final = "p2p-resume-v2"
"""HELLO capability (spec 03 §7.7 [REC]): this agent migrates symmetrically. A reference
relay neither reads nor forwards capabilities, so peers also learn it in-band, from a marker
entry in CANDIDATE_OFFER/ANSWER (see ``agent.p2p``)."""
CAP_INSTANCE: Final = "instance"
"""HELLO capability: ``Hello.outrelay_instance`` names this agent process. When an agent's
URI comes back with another instance, our relay ends the streams of the old one at once
(code ``AGENT_GONE``) instead of parking them for the resume window; echoed in HELLO_ACK."""
CAP_RESUME_PEER: Final = "resume-peer"
"""HELLO capability: STREAM_READY tells the agent its peer's URI
(``StreamReady.outrelay_peer_uri``), and the agent names that peer in every
STREAM_RESUME (``StreamResume.outrelay_peer_uri``), so our relay pairs a resume half
only with its own peer's, even after a restart that lost all records of the stream."""
CAP_PIPELINE: Final = "pipeline"
"""HELLO capability, for both roles (issue 16: fewer round trips before the first byte).

* Consumer: when our relay echoed it, the agent writes the application's first bytes right
  behind OPEN_STREAM instead of waiting for the relay's answer. A reference relay never
  echoes it, and it discards pipelined bytes in forward mode (spec 02 §6.4), which is why
  the reference never pipelines. Our relay discards them in forward mode too, and the
  consumer, which keeps every byte it pipelined until the answer, sends them first on the
  end-to-end connection. A reject drops them (the relay drains them, spec 02 §13).
* Provider: to an agent whose HELLO carried it, our relay sends, for a stream it will
  splice, ``IncomingStream.outrelay_spliced`` and the consumer's pipelined bytes right
  behind INCOMING_STREAM, before the provider accepts; the provider then bridges as soon as
  it has sent STREAM_ACCEPT instead of waiting for STREAM_READY. Other providers get the
  bytes after STREAM_ACCEPT, in the splice, as the reference does (spec 02 §6.1 step 1).
"""
CAP_CLOSE_ACK: Final = "close-ack"
"""HELLO capability: our relay goes on forwarding a stream's STREAM_CHECKPOINTs for a while
after its splice ended (``relay.pairs.CLOSED_PAIR_TTL_MS``). An agent's last checkpoint, the
one that acknowledges the peer's final bytes, can only be sent once those bytes and the FIN
behind them arrived, which is when the relay ends the splice; a reference relay then drops it
(spec 02 §5). Where the relay echoed it, a finished resumable stream stays resumable until
the peer acknowledged every byte, so a relay dying just after both sides finished loses
nothing; against a reference relay, whose forwarding stops with the splice, the agent does
not wait for an acknowledgement that cannot come."""
CAP_MESH: Final = "mesh"
"""HELLO capability: our relay echoes it when it shares a registry with other relays
(``--registry etcd://``, issue 18). A consumer then reaches a provider on any relay of the
mesh, and the two halves of a resumed stream meet across relays, so after losing such a relay
the agent takes the first relay of its list that answers instead of waiting for an earlier
one (which, without a mesh, both agents must meet on). A reference relay never echoes it."""
RELAY_CAPABILITIES: Final = frozenset(
    {CAP_P2P_MODE, CAP_INSTANCE, CAP_RESUME_PEER, CAP_PIPELINE, CAP_CLOSE_ACK, CAP_MESH}
)
"""The HELLO capabilities our relay acts on and echoes in ``accepted_features``."""
