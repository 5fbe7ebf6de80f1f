"""The pair table and the migrated cache (spec 02 §5, §6.1 step 6, §7.3).

**Pair table** (spec 02 §5). While a local OPEN_STREAM handler runs, the relay knows which
consumer and provider share a ``stream_id``. STREAM_CHECKPOINT, CANDIDATE_OFFER and
CANDIDATE_ANSWER arriving on one agent's ctrl are forwarded to the other agent's ctrl by looking
the id up here. The relay inserts after INCOMING_STREAM was written (§6.1 step 6) and removes
when the handler returns; it never inserts ``stream_id == 0``, inter-relay, resumed or demoted
streams.

**Closed pairs** (ours, ``orp.CAP_CLOSE_ACK``). A removed pair stays routable for
STREAM_CHECKPOINT alone for ``CLOSED_PAIR_TTL_MS``: each agent's last checkpoint acknowledges
bytes that arrived together with the FIN that ended the splice, so it always comes after the
removal; the reference drops it, and the agents can never learn that the last bytes arrived.

**Migrated cache** (spec 02 §7.3, the reference's "migrated LRU"). MIGRATE_TO_P2P on ctrl notes
``{stream_id, consumer_uri, provider_uri, migrated_at}`` for 60 s; the REQUIRED timer (§7.5)
and MIGRATE_TO_RELAY (§7.4) look it up.

**Ended pairs and agent instances** (ours). When a splice breaks, both ends are noted as
(URI, process instance) for the resume window; when an agent's URI comes back as another
process, or its process says goodbye, halves waiting for it are ended at once.

Sans-IO: no I/O, no clock (``now_ms`` is an argument, any monotonic millisecond clock), no
tasks; the caller serialises access.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = [
    "AGENT_INSTANCES_CAPACITY",
    "CLOSED_PAIR_CAPACITY",
    "CLOSED_PAIR_TTL_MS",
    "ENDED_PAIR_CAPACITY",
    "ENDED_PAIR_TTL_MS",
    "MIGRATED_CAPACITY",
    "MIGRATION_TTL_MS",
    "AgentInstances",
    "EndedPairs",
    "Member",
    "MigratedCache",
    "MigratedStream",
    "PairTable",
    "StreamPair",
]

MIGRATION_TTL_MS: Final = 60_000
"""How long a MIGRATE_TO_P2P is remembered: 60 s, expired when ``age >= 60 s`` (spec 02 §7.3,
§12 "MigrationTTL")."""

MIGRATED_CAPACITY: Final = 65_536
"""[REC] Cap of the migrated cache; the reference has none (spec 02 §7.3, §17 item 10). Any
authenticated agent can send MIGRATE_TO_P2P with fresh ids on ctrl as fast as it likes, so an
uncapped map lets one agent grow the relay's memory for 60 s at a time. 65,536 entries (a few
MiB) is far above the streams one relay migrates in a minute; beyond it the oldest note is
dropped, which at worst makes a REQUIRED stream's timer fire (its FIN, §7.5) or loses a log
line."""


CLOSED_PAIR_TTL_MS: Final = 10_000
"""How long after its OPEN_STREAM (or resume) handler returned a stream's checkpoints are still
forwarded (ours, ``orp.CAP_CLOSE_ACK``). The agents send their last checkpoint within one
checkpoint period (100 ms) of reading the FIN; 10 s covers a loaded machine many times over."""

CLOSED_PAIR_CAPACITY: Final = 65_536
"""The most closed pairs remembered; beyond it the oldest is dropped (its agents then stop
waiting at the end of their resume window, as with a reference relay). A few MiB at most."""


class StreamPair(NamedTuple):
    """The two agents of one relay-mediated stream; unpacks as ``consumer, provider``."""

    consumer_uri: str
    """The agent that sent OPEN_STREAM."""
    provider_uri: str
    """The agent that received INCOMING_STREAM."""


class PairTable:
    """``stream_id → (consumer_uri, provider_uri)`` for live local splices (spec 02 §5)."""

    __slots__ = ("_closed", "_closed_capacity", "_closed_ttl", "_pairs")

    def __init__(
        self,
        *,
        closed_ttl_ms: int = CLOSED_PAIR_TTL_MS,
        closed_capacity: int = CLOSED_PAIR_CAPACITY,
    ) -> None:
        self._pairs: dict[int, StreamPair] = {}
        self._closed: OrderedDict[int, tuple[StreamPair, int]] = OrderedDict()
        """Removed pairs, oldest first, with the time of removal (checkpoints only)."""
        self._closed_ttl = closed_ttl_ms
        self._closed_capacity = closed_capacity

    def record(self, stream_id: int, consumer_uri: str, provider_uri: str) -> bool:
        """Record the pair of ``stream_id`` (spec 02 §6.1 step 6, the reference's
        ``recordPair``).

        ``stream_id`` 0 ("unset") is never recorded and always succeeds. Re-recording an
        identical pair succeeds and changes nothing.

        Returns:
            ``False`` only when ``stream_id`` already maps to a **different** pair; the entry is
            then left intact and the relay rejects with ``STREAM_REJECT{409, "stream id
            collision"}``. ``True`` otherwise.
        """
        if stream_id == 0:
            return True
        pair = StreamPair(consumer_uri, provider_uri)
        existing = self._pairs.setdefault(stream_id, pair)
        return existing == pair

    def forget(
        self, stream_id: int, consumer_uri: str, provider_uri: str, now_ms: int | None = None
    ) -> bool:
        """Remove ``stream_id`` when its OPEN_STREAM handler returns (spec 02 §5 "Remove").

        Only an entry holding this very pair is removed, so a handler whose :meth:`record` was
        refused cannot delete the pair of the splice that holds the id. (The reference's
        ``forgetPair`` deletes by id alone and relies on only successful recorders calling it.)
        As in the reference, two handlers that recorded the same pair share one entry, and the
        first to finish removes it.

        With ``now_ms``, the removed pair stays routable for STREAM_CHECKPOINT until
        ``now_ms + CLOSED_PAIR_TTL_MS`` (:meth:`route_closed`).

        Returns:
            Whether an entry was removed.
        """
        pair = StreamPair(consumer_uri, provider_uri)
        if self._pairs.get(stream_id) != pair:
            return False
        del self._pairs[stream_id]
        if now_ms is not None:
            closed = self._closed
            closed.pop(stream_id, None)  # a newer removal moves to the back
            closed[stream_id] = (pair, now_ms)
            while closed:
                _, removed_at = next(iter(closed.values()))
                if now_ms - removed_at < self._closed_ttl and len(closed) <= self._closed_capacity:
                    break
                closed.popitem(last=False)
        return True

    def route_closed(self, stream_id: int, sender_uri: str, now_ms: int) -> str | None:
        """Where to forward a STREAM_CHECKPOINT for a pair removed less than
        ``CLOSED_PAIR_TTL_MS`` ago (ours, ``orp.CAP_CLOSE_ACK``); ``None`` as :meth:`route`."""
        entry = self._closed.get(stream_id)
        if entry is None:
            return None
        pair, removed_at = entry
        if now_ms - removed_at >= self._closed_ttl:
            del self._closed[stream_id]
            return None
        return _other(pair, sender_uri)

    def get(self, stream_id: int) -> StreamPair | None:
        """The pair recorded for ``stream_id``, if any (used by MIGRATE_TO_P2P, spec 02 §7.3)."""
        return self._pairs.get(stream_id)

    def route(self, stream_id: int, sender_uri: str) -> str | None:
        """Where to forward a STREAM_CHECKPOINT or CANDIDATE_* from ``sender_uri`` (spec 02 §5
        step 2).

        Returns:
            The provider's URI if the sender is the consumer, the consumer's if it is the
            provider, and ``None`` (drop silently) if there is no entry or the sender is neither.
        """
        pair = self._pairs.get(stream_id)
        return None if pair is None else _other(pair, sender_uri)

    def __len__(self) -> int:
        return len(self._pairs)


def _other(pair: StreamPair, sender_uri: str) -> str | None:
    """The member of ``pair`` that is not ``sender_uri`` (``None``: the sender is neither)."""
    if sender_uri == pair.consumer_uri:
        return pair.provider_uri
    if sender_uri == pair.provider_uri:
        return pair.consumer_uri
    return None


@dataclass(frozen=True, slots=True)
class MigratedStream:
    """One noted MIGRATE_TO_P2P (spec 02 §7.3)."""

    stream_id: int
    """The migrated stream's id."""
    consumer_uri: str
    """From the pair table, or the sender when the id had no pair."""
    provider_uri: str
    """From the pair table, or ``""`` when the id had no pair."""
    migrated_at_ms: int
    """When the latest MIGRATE_TO_P2P for this id arrived (the caller's clock, in ms)."""


class MigratedCache:
    """Recent MIGRATE_TO_P2P notes, by stream id (spec 02 §7.3).

    * :meth:`note` overwrites an entry and refreshes its time (repeats from either side).
    * An entry is absent once ``now_ms - migrated_at_ms >= ttl_ms``: purged on each
      :meth:`note`, removed lazily by :meth:`lookup`.
    * [REC] At most ``capacity`` entries; a note beyond it drops the oldest note (see
      :data:`MIGRATED_CAPACITY`). The reference has no cap.

    Entries are kept in note order. With every entry living the same TTL and a non-decreasing
    ``now_ms``, the expired ones are a prefix, so purging stops at the first live entry instead
    of scanning the whole map as the reference does. (If the clock ever steps back, an expired
    entry may wait behind a live one; :meth:`lookup` still treats it as absent.)

    Args:
        ttl_ms: Entry lifetime in ms.
        capacity: The most entries held.
    """

    __slots__ = ("_capacity", "_entries", "_ttl")

    def __init__(
        self, *, ttl_ms: int = MIGRATION_TTL_MS, capacity: int = MIGRATED_CAPACITY
    ) -> None:
        if ttl_ms <= 0 or capacity <= 0:
            raise ValueError("ttl_ms and capacity must be positive")
        self._ttl = ttl_ms
        self._capacity = capacity
        self._entries: OrderedDict[int, MigratedStream] = OrderedDict()

    def note(self, stream_id: int, consumer_uri: str, provider_uri: str, now_ms: int) -> None:
        """Record (or refresh) the migration of ``stream_id`` at ``now_ms``."""
        entries = self._entries
        entries.pop(stream_id, None)  # a refreshed note moves to the back
        entries[stream_id] = MigratedStream(stream_id, consumer_uri, provider_uri, now_ms)
        while entries:
            oldest = next(iter(entries.values()))
            if now_ms - oldest.migrated_at_ms < self._ttl and len(entries) <= self._capacity:
                break
            entries.popitem(last=False)

    def lookup(self, stream_id: int, now_ms: int) -> MigratedStream | None:
        """The note for ``stream_id`` if it is younger than the TTL at ``now_ms``, else ``None``
        (an expired note is deleted)."""
        entry = self._entries.get(stream_id)
        if entry is None:
            return None
        if now_ms - entry.migrated_at_ms >= self._ttl:
            del self._entries[stream_id]
            return None
        return entry

    def discard(self, stream_id: int) -> None:
        """Forget ``stream_id`` (after a MIGRATE_TO_RELAY match, spec 02 §7.4)."""
        self._entries.pop(stream_id, None)

    def __len__(self) -> int:
        """Entries held, including expired ones not purged yet."""
        return len(self._entries)


class Member(NamedTuple):
    """One end of a stream: an agent URI and its process (HELLO ``outrelay_instance``)."""

    uri: str
    instance: str
    """"" for an agent that does not say (the reference agent)."""


ENDED_PAIR_TTL_MS: Final = 35_000
"""How long the ends of a broken splice are remembered: the resume window (30 s, spec 02
§7.4) plus the agents' slack, so a half parked up to its last moment still finds them."""
ENDED_PAIR_CAPACITY: Final = 65_536
"""Cap, like :data:`MIGRATED_CAPACITY`: beyond it the oldest record goes, and a half whose
peer restarted then waits out its window as in the reference."""


class EndedPairs:
    """Who was at each end of a splice that broke (ours, beyond spec 02 §7.4).

    A resume half names only its own agent. When its peer restarts as a new process
    (:class:`AgentInstances`), the half can never be matched; this record lets the relay
    tell at once instead of parking it for the whole window. Sans-IO, ``now_ms`` an
    argument; records expire after ``ttl_ms`` and at most ``capacity`` are held.
    """

    __slots__ = ("_capacity", "_entries", "_ttl")

    def __init__(
        self, *, ttl_ms: int = ENDED_PAIR_TTL_MS, capacity: int = ENDED_PAIR_CAPACITY
    ) -> None:
        self._ttl = ttl_ms
        self._capacity = capacity
        self._entries: OrderedDict[int, tuple[Member, Member, int]] = OrderedDict()

    def note(self, stream_id: int, a: Member, b: Member, now_ms: int) -> None:
        """The splice of ``stream_id`` between ``a`` and ``b`` broke at ``now_ms``."""
        if stream_id == 0:
            return
        entries = self._entries
        entries.pop(stream_id, None)
        entries[stream_id] = (a, b, now_ms)
        while entries:
            _, _, at = next(iter(entries.values()))
            if now_ms - at < self._ttl and len(entries) <= self._capacity:
                break
            entries.popitem(last=False)

    def members(self, stream_id: int, now_ms: int) -> tuple[Member, Member] | None:
        """Both ends of ``stream_id``, if a broken splice of it is remembered."""
        entry = self._entries.get(stream_id)
        if entry is None:
            return None
        a, b, at = entry
        if now_ms - at >= self._ttl:
            del self._entries[stream_id]
            return None
        return a, b

    def peer_of(self, stream_id: int, uri: str, now_ms: int) -> Member | None:
        """The other end of ``stream_id`` as seen from the agent ``uri``, if recorded."""
        members = self.members(stream_id, now_ms)
        if members is None:
            return None
        a, b = members
        if uri == a.uri:
            return b
        if uri == b.uri:
            return a
        return None

    def __len__(self) -> int:
        return len(self._entries)


AGENT_INSTANCES_CAPACITY: Final = 65_536
"""How many agent URIs' latest instance is remembered (least recently seen go first)."""


class AgentInstances:
    """The latest process of each agent URI, and whether it said goodbye.

    An instance is *gone* when a newer one of the same URI said HELLO, or when it closed
    its connection with ``AGENT_GONE`` (a clean shutdown). A gone instance's streams can
    never be resumed. An empty instance (a reference agent) is never known to be gone.
    """

    __slots__ = ("_capacity", "_latest")

    def __init__(self, capacity: int = AGENT_INSTANCES_CAPACITY) -> None:
        self._capacity = capacity
        self._latest: OrderedDict[str, tuple[str, bool]] = OrderedDict()

    def hello(self, uri: str, instance: str) -> str:
        """``uri`` connected as ``instance``.

        Returns:
            The previous instance of ``uri`` if it differs (it is gone now), else "".
        """
        previous = self._latest.pop(uri, None)
        self._latest[uri] = (instance, False)
        if len(self._latest) > self._capacity:
            self._latest.popitem(last=False)
        if previous is None or not previous[0] or not instance or previous[0] == instance:
            return ""
        return previous[0]

    def departed(self, member: Member) -> None:
        """``member`` shut down cleanly: its streams are over."""
        if member.instance and self._latest.get(member.uri, ("", False))[0] == member.instance:
            self._latest[member.uri] = (member.instance, True)

    def is_gone(self, member: Member) -> bool:
        if not member.instance:
            return False
        latest = self._latest.get(member.uri)
        if latest is None:
            return False
        instance, left = latest
        return instance != member.instance or left
