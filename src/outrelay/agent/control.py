"""The agent's side of the control stream, sans-IO (spec 03 §3.3–§3.7).

:class:`ControlState` takes decoded control frames and ``now`` and returns
actions; it does no I/O, reads no clock and holds no future. The session shell
(:mod:`outrelay.agent.session`) keeps one future per thing it waits for, keyed
by the same token, stream id or request id, and settles it when an action says
so.

What it decides:

* **REGISTER_ACK** answers the oldest REGISTER still waiting (the relay answers
  in order; spec 03 §3.3 [REC]): :class:`Registered`.
* **STREAM_READY** resolves a stream's mode as splice, **ALLOC_GRANTED** as
  forward (keeping the grant until :meth:`take_grant`): :class:`ModeResolved`.
  STREAM_READY's extensions (``orp.CAP_P2P_MODE``, ``orp.CAP_RESUME_PEER``) are
  kept for streams of ours: the relay's p2p mode and the peer agent's URI.
* **OBSERVED_ADDR_RESP** answers the query with its request id (§3.7 [REC]):
  :class:`AddressObserved`, or :class:`AddressInvalid` if it names no IP.
* **STREAM_CHECKPOINT** is handed on: :class:`CheckpointReceived`.
* **CANDIDATE_OFFER/ANSWER** are handed on: :class:`CandidatesReceived`.
* **PONG** refreshes liveness; :meth:`ControlState.pong_overdue` says when the
  TCP path is dead (spec 03 §2.2 [REC]).
* Anything else, or an answer nobody waits for: :class:`Unexpected`.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import Final

from outrelay.agent.p2p import RequestIds
from outrelay.orp import (
    AllocGranted,
    CandidateAnswer,
    CandidateOffer,
    FrameType,
    ObservedAddrResp,
    P2PMode,
    RegisterAck,
    StreamCheckpoint,
    StreamReady,
    decode_p2p_mode,
)

__all__ = [
    "PING_INTERVAL",
    "PONG_GRACE",
    "Action",
    "AddressInvalid",
    "AddressObserved",
    "CandidatesReceived",
    "CheckpointReceived",
    "ControlState",
    "ModeResolved",
    "Registered",
    "StreamMode",
    "Unexpected",
]

PING_INTERVAL: Final = 10.0
"""Spec 03 §2.2 [REC]: PING on ctrl this often on the TCP path (no QUIC keep-alive)."""
PONG_GRACE: Final = 2 * PING_INTERVAL + 1
"""No PONG for this long: the TCP path is dead (two PINGs lost, plus a second)."""


class StreamMode:
    """How the relay carries a stream: its answer to OPEN_STREAM / INCOMING_STREAM."""

    SPLICE = "splice"
    FORWARD = "forward"


@dataclass(frozen=True)
class Registered:
    """REGISTER_ACK for the REGISTER that :meth:`ControlState.register` numbered ``token``."""

    token: int
    service_id: str


@dataclass(frozen=True)
class ModeResolved:
    """The relay said how ``stream_id`` is carried (a :class:`StreamMode` value)."""

    stream_id: int
    mode: str


@dataclass(frozen=True)
class AddressObserved:
    """OBSERVED_ADDR_RESP for ``request_id``: our address as the relay sees it."""

    request_id: int
    ip: str
    port: int


@dataclass(frozen=True)
class AddressInvalid:
    """OBSERVED_ADDR_RESP for ``request_id`` that names no IP address."""

    request_id: int
    reason: str


@dataclass(frozen=True)
class CheckpointReceived:
    """STREAM_CHECKPOINT from the peer of ``stream_id`` (spec 03 §4.3)."""

    stream_id: int
    my_position: int
    peer_ack_position: int


@dataclass(frozen=True)
class CandidatesReceived:
    """CANDIDATE_OFFER or CANDIDATE_ANSWER, for P2P (spec 03 §7.5)."""

    frame_type: int
    message: CandidateOffer | CandidateAnswer


@dataclass(frozen=True)
class Unexpected:
    """A frame nobody waits for; ``quiet``: a late answer (debug), else worth a warning."""

    frame_type: int
    detail: str
    quiet: bool = False


Action = (
    Registered
    | ModeResolved
    | AddressObserved
    | AddressInvalid
    | CheckpointReceived
    | CandidatesReceived
    | Unexpected
)


class ControlState:
    """What the agent expects on its control stream, and what each frame settles.

    One per session. Register tokens and liveness belong to the current relay
    connection and start afresh with :meth:`new_link`; stream modes, peers and
    observed-address queries outlive a reconnect.
    """

    def __init__(self) -> None:
        self._registers: deque[int] = deque()
        self._next_token = 0
        self._modes: dict[int, str | None] = {}
        """Stream id -> resolved mode, None while waiting (from expect_mode to forget_mode)."""
        self._active: set[int] = set()
        self._grants: dict[int, AllocGranted] = {}
        self._peers: dict[int, str] = {}
        self._p2p_modes: dict[int, int] = {}
        self._queries: set[int] = set()
        self._request_ids = RequestIds()
        self.last_pong = 0.0

    # -- inputs from the shell ---------------------------------------------------------

    def new_link(self, now: float) -> None:
        """A relay connection starts: no REGISTER is outstanding on it, and it is alive."""
        self._registers.clear()
        self.last_pong = now

    def register(self) -> int:
        """A REGISTER is about to be sent; returns the token its :class:`Registered` carries."""
        self._next_token += 1
        self._registers.append(self._next_token)
        return self._next_token

    def forget_register(self, token: int) -> None:
        """The shell stopped waiting for ``token`` (timeout, cancel)."""
        if token in self._registers:
            self._registers.remove(token)

    def expect_mode(self, stream_id: int) -> None:
        """OPEN_STREAM / INCOMING_STREAM seen for ``stream_id``: wait for its mode."""
        self._modes[stream_id] = None

    def forget_mode(self, stream_id: int) -> None:
        self._modes.pop(stream_id, None)

    def track(self, stream_id: int) -> None:
        """``stream_id`` is a stream of ours until :meth:`untrack`."""
        self._active.add(stream_id)

    def untrack(self, stream_id: int) -> None:
        self._active.discard(stream_id)
        self._peers.pop(stream_id, None)
        self._grants.pop(stream_id, None)
        self._p2p_modes.pop(stream_id, None)

    def query_address(self) -> int:
        """An OBSERVED_ADDR_QUERY is about to be sent; returns its request id."""
        request_id = self._request_ids.next()
        self._queries.add(request_id)
        return request_id

    def forget_query(self, request_id: int) -> None:
        self._queries.discard(request_id)

    def remember_peer(self, stream_id: int, peer_uri: str) -> None:
        """The peer agent of ``stream_id`` (the provider learns it from INCOMING_STREAM)."""
        if peer_uri:
            self._peers[stream_id] = peer_uri

    def forget_peer(self, stream_id: int) -> None:
        self._peers.pop(stream_id, None)

    # -- what the session asks ---------------------------------------------------------

    def is_active(self, stream_id: int) -> bool:
        return stream_id in self._active

    def ids_in_use(self) -> set[int]:
        """Stream ids a new stream must not take (ours, and those awaiting a mode)."""
        return self._active | self._modes.keys()

    def peer_of(self, stream_id: int) -> str:
        return self._peers.get(stream_id, "")

    def p2p_mode(self, stream_id: int) -> P2PMode | None:
        return decode_p2p_mode(self._p2p_modes.get(stream_id, 0))

    def take_grant(self, stream_id: int) -> AllocGranted | None:
        return self._grants.pop(stream_id, None)

    def pong_overdue(self, now: float) -> bool:
        """No PONG for :data:`PONG_GRACE`: the TCP path is dead (spec 03 §2.2 [REC])."""
        return now - self.last_pong > PONG_GRACE

    # -- frames ------------------------------------------------------------------------

    def receive(self, frame_type: int, message: object, now: float) -> list[Action]:
        """One control frame (``message`` decoded, None for PING/PONG); returns actions.

        Never raises: a payload of the wrong type counts as an empty message.
        """
        if frame_type == FrameType.REGISTER_ACK:
            service_id = message.service_id if isinstance(message, RegisterAck) else ""
            if self._registers:
                return [Registered(self._registers.popleft(), service_id)]
            return [Unexpected(frame_type, "REGISTER_ACK for no REGISTER")]
        if frame_type == FrameType.STREAM_READY:
            ready = message if isinstance(message, StreamReady) else StreamReady()
            sid = ready.stream_id
            if sid in self._active or sid in self._modes:
                if ready.outrelay_p2p_mode:
                    self._p2p_modes[sid] = ready.outrelay_p2p_mode
                if ready.outrelay_peer_uri:
                    self._peers[sid] = ready.outrelay_peer_uri  # the consumer learns its provider
            return self._resolve(frame_type, sid, StreamMode.SPLICE)
        if frame_type == FrameType.ALLOC_GRANTED:
            if not isinstance(message, AllocGranted):
                return []
            sid = message.stream_id
            if self._modes.get(sid, "") is None:
                self._grants[sid] = message
            return self._resolve(frame_type, sid, StreamMode.FORWARD)
        if frame_type == FrameType.STREAM_CHECKPOINT:
            if not isinstance(message, StreamCheckpoint):
                return []
            return [
                CheckpointReceived(
                    message.stream_id, message.my_position, message.peer_ack_position
                )
            ]
        if frame_type == FrameType.OBSERVED_ADDR_RESP:
            return self._observed(frame_type, message)
        if frame_type in (FrameType.CANDIDATE_OFFER, FrameType.CANDIDATE_ANSWER):
            if isinstance(message, (CandidateOffer, CandidateAnswer)):
                return [CandidatesReceived(frame_type, message)]
            return []
        if frame_type == FrameType.PONG:
            self.last_pong = now
            return []
        return [Unexpected(frame_type, "unexpected ctrl frame")]

    def _resolve(self, frame_type: int, stream_id: int, mode: str) -> list[Action]:
        if self._modes.get(stream_id, "") is not None:
            return [Unexpected(frame_type, "stream-mode delivery dropped (no waiter)", quiet=True)]
        self._modes[stream_id] = mode
        return [ModeResolved(stream_id, mode)]

    def _observed(self, frame_type: int, message: object) -> list[Action]:
        if not isinstance(message, ObservedAddrResp):
            return []
        if message.request_id not in self._queries:
            return [Unexpected(frame_type, "OBSERVED_ADDR_RESP for no query", quiet=True)]
        self._queries.discard(message.request_id)
        try:
            ip = str(ipaddress.ip_address(message.ip.split("%", 1)[0]))
        except ValueError:
            return [AddressInvalid(message.request_id, f"observed address {message.ip!r} is no ip")]
        return [AddressObserved(message.request_id, ip, message.port & 0xFFFF)]
