"""Pairs whose other agent is on a peer relay, and the peer control channels (issue 18, ours).

Spec 02 §10.2 records no pair for an inter-relay stream, so checkpoints and candidates
cannot cross relays. Between two of our relays, both relays record the pair in their
:class:`~.pairs.PairTable` (consumer and provider URIs as usual), and this module remembers
which member is *remote*, and on which peer relay:

* :class:`RemoteSides` (sans-IO, ``now_ms`` an argument): ``stream_id → (remote agent URI,
  peer relay id)``. Marked when the pair is recorded, kept for ``CLOSED_PAIR_TTL_MS`` after
  the pair is forgotten (the close-ack checkpoints, ``orp.CAP_CLOSE_ACK``, come after the
  splice ended), bounded like the closed pairs.
* :class:`PeerControls`: the control outboxes of the peer connections (the stream whose
  first frame is PEER_CONTROL), by peer relay id. Control dispatch posts a frame for a
  remote member there; the peer relay delivers it to its local agent. Posting never waits.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from outrelay.relay.outbox import ControlOutbox
from outrelay.relay.pairs import CLOSED_PAIR_CAPACITY, CLOSED_PAIR_TTL_MS

__all__ = ["PeerControls", "RemoteMember", "RemoteSides"]


class RemoteMember(NamedTuple):
    """The member of a pair that is connected to a peer relay."""

    uri: str
    relay_id: str


class RemoteSides:
    """``stream_id → RemoteMember`` for pairs split across two relays (module docstring)."""

    __slots__ = ("_capacity", "_closed", "_live", "_ttl")

    def __init__(
        self, *, ttl_ms: int = CLOSED_PAIR_TTL_MS, capacity: int = CLOSED_PAIR_CAPACITY
    ) -> None:
        self._ttl = ttl_ms
        self._capacity = capacity
        self._live: dict[int, RemoteMember] = {}
        self._closed: OrderedDict[int, tuple[RemoteMember, int]] = OrderedDict()
        """Marks of forgotten pairs, oldest first, with the time they were forgotten."""

    def mark(self, stream_id: int, uri: str, relay_id: str) -> None:
        """The pair of ``stream_id`` has its member ``uri`` on the peer ``relay_id``."""
        if stream_id == 0:
            return
        self._closed.pop(stream_id, None)
        self._live[stream_id] = RemoteMember(uri, relay_id)

    def unmark(self, stream_id: int, now_ms: int) -> None:
        """The pair was forgotten at ``now_ms``: keep the mark for the close-ack TTL."""
        member = self._live.pop(stream_id, None)
        if member is None:
            return
        closed = self._closed
        closed[stream_id] = (member, now_ms)
        while closed:
            _, removed_at = next(iter(closed.values()))
            if now_ms - removed_at < self._ttl and len(closed) <= self._capacity:
                break
            closed.popitem(last=False)

    def get(self, stream_id: int, now_ms: int) -> RemoteMember | None:
        """The remote member of ``stream_id``, live or forgotten less than the TTL ago."""
        member = self._live.get(stream_id)
        if member is not None:
            return member
        entry = self._closed.get(stream_id)
        if entry is None:
            return None
        if now_ms - entry[1] >= self._ttl:
            del self._closed[stream_id]
            return None
        return entry[0]

    def live(self, stream_id: int) -> RemoteMember | None:
        """The remote member of ``stream_id`` while its pair is live (not forgotten)."""
        return self._live.get(stream_id)

    def relay_of(self, stream_id: int, uri: str, now_ms: int) -> str | None:
        """The peer relay of ``uri`` if it is the remote member of ``stream_id``."""
        member = self.get(stream_id, now_ms)
        return member.relay_id if member is not None and member.uri == uri else None

    def __len__(self) -> int:
        """Live marks (forgotten ones still held for close-acks are not counted)."""
        return len(self._live)


class PeerControls:
    """Control outboxes of live peer connections, by peer relay id (module docstring).

    A peer may have two connections to us (ours to it and its to us); either carries the
    frames, the most recently added first.
    """

    def __init__(self) -> None:
        self._by_relay: dict[str, list[ControlOutbox]] = {}
        self.posted = 0
        """Frames handed to a peer relay's channel (statistics)."""

    def add(self, relay_id: str, outbox: ControlOutbox) -> None:
        self._by_relay.setdefault(relay_id, []).insert(0, outbox)

    def remove(self, relay_id: str, outbox: ControlOutbox) -> None:
        outboxes = self._by_relay.get(relay_id, [])
        if outbox in outboxes:
            outboxes.remove(outbox)
        if not outboxes:
            self._by_relay.pop(relay_id, None)

    def post_raw(self, relay_id: str, data: bytes, *, droppable: bool) -> bool:
        """Queue encoded frames to ``relay_id``; False if no live channel took them."""
        for outbox in self._by_relay.get(relay_id, []):
            if outbox.dead is None:
                if outbox.post_raw(data, droppable=droppable) is None:
                    return droppable
                self.posted += 1
                return True
        return False

    def __contains__(self, relay_id: object) -> bool:
        return relay_id in self._by_relay
