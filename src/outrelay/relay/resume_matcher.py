"""The resume matcher: pair STREAM_RESUME / MIGRATE_TO_RELAY halves (spec 02 §7.4).

Sans-IO: halves come in with ``now_ms``; the shell asks for the next
deadline and for expired halves. One half may be pending per stream id; the
next half with that id matches it and the entry is cleared (a third starts
a new entry). No identity checks, as in the reference.

The [REC] of spec 02 §7.4 / §15 item 1 is the shell's: on a match it
writes the echo to each STREAM_RESUME half (never to a MIGRATE_TO_RELAY
half) and runs exactly one splice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["RESUME_WINDOW_MS", "Half", "HalfKind", "ResumeMatcher"]

RESUME_WINDOW_MS = 30_000  # spec 02 §7.4 / §12 (the docs' 5 s is wrong, §17 item 1)

T = TypeVar("T")


class HalfKind(enum.Enum):
    RESUME = "resume"
    """STREAM_RESUME: gets the peer's positions echoed back."""
    MIGRATE = "migrate"
    """MIGRATE_TO_RELAY: no echo."""


@dataclass(eq=False)
class Half(Generic[T]):
    """One side of a resumed stream, as it arrived at the relay."""

    stream_id: int
    kind: HalfKind
    my_position: int
    peer_ack_position: int
    agent_uri: str
    handle: T
    """Whatever the shell needs to finish the job (its stream, a future...)."""
    deadline_ms: int = field(default=0)
    expected_peer: str = ""
    """Ours: the agent URI this half names as its peer (``StreamResume.outrelay_peer_uri``);
    "" from a reference agent."""

    def fits(self, other: Half[T]) -> bool:
        """Could ``self`` and ``other`` be the two halves of one stream?

        Each half that names its peer must name the other's agent; a half that
        names nobody (a reference agent) accepts anyone, as in the reference.
        """
        return (not self.expected_peer or self.expected_peer == other.agent_uri) and (
            not other.expected_peer or other.expected_peer == self.agent_uri
        )


class ResumeMatcher(Generic[T]):
    """Bucket halves by stream id until their peer arrives or the window ends."""

    def __init__(self, window_ms: int = RESUME_WINDOW_MS) -> None:
        self.window_ms = window_ms
        self._pending: dict[int, Half[T]] = {}

    def submit(self, half: Half[T], now_ms: int) -> Half[T] | None:
        """Offer ``half``.

        Returns:
            The pending half it matches (the entry is cleared), or None when
            ``half`` is now the pending one for its id.
        """
        peer = self._pending.pop(half.stream_id, None)
        if peer is not None:
            return peer
        half.deadline_ms = now_ms + self.window_ms
        self._pending[half.stream_id] = half
        return None

    def pending(self, stream_id: int) -> Half[T] | None:
        """The half waiting for ``stream_id``, if any."""
        return self._pending.get(stream_id)

    def halves(self) -> list[Half[T]]:
        """Every pending half (a copy: withdrawing while iterating is fine)."""
        return list(self._pending.values())

    def withdraw(self, half: Half[T]) -> bool:
        """Remove ``half`` if it is still pending (its stream died, or it expired)."""
        if self._pending.get(half.stream_id) is half:
            del self._pending[half.stream_id]
            return True
        return False

    def expire(self, now_ms: int) -> list[Half[T]]:
        """Remove and return every half whose window has ended."""
        gone = [h for h in self._pending.values() if h.deadline_ms <= now_ms]
        for half in gone:
            del self._pending[half.stream_id]
        return gone

    def next_deadline(self) -> int | None:
        return min((h.deadline_ms for h in self._pending.values()), default=None)

    def __len__(self) -> int:
        return len(self._pending)
