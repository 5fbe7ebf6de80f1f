"""What every part of the relay shares: agent sessions and the relay's tables.

One :class:`AgentSession` per connected agent (spec 02 §2.3); one :class:`RelayState` per
relay, holding the agent map, the embedded registry (§4), the pair table (§5), the migrated
cache (§7.3), our records of broken splices and agent processes, and the audit log (§6.2.7).
The edge (:mod:`.edge`) fills it, control dispatch (:mod:`.control`), the open flow
(:mod:`.open_flow`) and the resume flow (:mod:`.resume_flow`) read and update it. Everything
runs on one event loop, so no locking.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from outrelay.observe import kv
from outrelay.orp import FrameType, StreamEndCode
from outrelay.relay.audit import AuditLog
from outrelay.relay.counters import RelayCounters
from outrelay.relay.mesh import Mesh
from outrelay.relay.outbox import ControlOutbox
from outrelay.relay.pairs import AgentInstances, EndedPairs, Member, MigratedCache, PairTable
from outrelay.relay.plane import ForwardPlane
from outrelay.relay.policy import PolicyService
from outrelay.relay.registry import ServiceRegistry
from outrelay.relay.remote import PeerControls, RemoteSides
from outrelay.transport import Connection, Stream
from outrelay.wire import FrameReader, frame_name

if TYPE_CHECKING:
    from outrelay.relay.mesh import Mesh
    from outrelay.relay.peers import PeerPool

__all__ = ["AgentSession", "MigrationSignals", "RelayState", "RelayStatistics", "log", "now_ms"]

log = logging.getLogger("outrelay.relay")
"""One logger for the whole relay: operators (and the end-to-end tests) read its lines."""


def now_ms() -> int:
    """Unix time in milliseconds: the clock of policy expiry, audit and the pure tables."""
    return int(time.time() * 1000)


@dataclass(eq=False)
class AgentSession:
    """One connected agent: its identity, connection and control channel."""

    uri: str
    tenant: str
    conn: Connection
    ctrl: ControlOutbox
    """Every write to this agent's control stream goes through its bounded queue."""
    reader: FrameReader
    """Reads the control stream; it may already hold bytes after HELLO."""
    capabilities: frozenset[str] = frozenset()
    """HELLO capabilities we act on (``orp.RELAY_CAPABILITIES``); a reference agent sends none."""
    instance: str = ""
    """The agent's process id from HELLO (``orp.CAP_INSTANCE``), "" if it sent none."""
    superseded: bool = False
    """A new process of the same agent said HELLO: this one's streams end for good."""
    registrations: set[str] = field(default_factory=set)
    """Service names this connection registered (bounded by MAX_REGISTRATIONS_PER_AGENT)."""

    @property
    def member(self) -> Member:
        return Member(self.uri, self.instance)

    @property
    def gone(self) -> bool:
        """The agent's process is gone for good (replaced, or said goodbye)."""
        return self.superseded or self.conn.peer_close_code == StreamEndCode.AGENT_GONE


class MigrationSignals:
    """Futures resolved when MIGRATE_TO_P2P arrives for a stream (spec 02 §7.3, §7.5).

    The REQUIRED enforcer waits on one (bounded by its timeout) instead of polling the
    migrated cache. At most one watcher per stream id: ids are unique among live pairs.
    """

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[None]] = {}

    def watch(self, stream_id: int) -> asyncio.Future[None]:
        """A future resolved by the next :meth:`fire` for ``stream_id``; :meth:`unwatch` it."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[stream_id] = waiter
        return waiter

    def unwatch(self, stream_id: int, waiter: asyncio.Future[None]) -> None:
        if self._waiters.get(stream_id) is waiter:
            del self._waiters[stream_id]

    def fire(self, stream_id: int) -> None:
        waiter = self._waiters.get(stream_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __len__(self) -> int:
        return len(self._waiters)


@dataclass(frozen=True, slots=True)
class RelayStatistics:
    """A snapshot of a relay (STYLE §5)."""

    agents: int
    """Connected agents (the agent map)."""
    services: int
    """Registered (tenant, service, provider) bindings."""
    pairs: int
    """Live relay-mediated streams in the pair table (spec 02 §5)."""
    migrated: int
    """Entries of the migrated cache (spec 02 §7.3)."""
    p2p_forbidden: int
    """Live splices whose policy forbids P2P (their offers are answered empty)."""
    parked_halves: int
    """Resume halves waiting for their peer (spec 02 §7.4)."""
    refused_not_owner: int
    """Frames refused because they named a stream of other agents (ours)."""


class RelayState:
    """The relay's shared tables (see the module docstring)."""

    def __init__(self, relay_id: str, policy: PolicyService | None, audit: AuditLog) -> None:
        self.agents: dict[str, AgentSession] = {}
        self.registry = ServiceRegistry(relay_id)
        self.pairs = PairTable()
        self.migrated = MigratedCache()
        self.migrations = MigrationSignals()
        self.p2p_forbidden: set[int] = set()
        """Stream ids of live splices whose policy forbids P2P: their offers are not forwarded."""
        self.ended = EndedPairs()
        self.instances = AgentInstances()
        self.policy = policy
        """None means no enforcement (the reference without ``--tenant``, spec 02 §6.2.1)."""
        self.audit = audit
        self.plane: ForwardPlane | None = None
        """The forward plane (spec 02 §8) once bound; None: forward rules are spliced."""
        self.refused_not_owner = 0
        """Frames naming a stream of other agents (resume, checkpoint, migrate, candidates)."""
        self.counters = RelayCounters()
        """Observability counters (spec 02 §11 snapshot, Prometheus ``/metrics``)."""
        self.mesh: Mesh | None = None
        """The shared registry of a relay mesh (issue 18); None: the embedded registry only."""
        self.peers: PeerPool | None = None
        """Pooled connections to peer relays (spec 02 §10.2), with a mesh."""
        self.remote = RemoteSides()
        """Which member of a recorded pair is on a peer relay (:mod:`.remote`)."""
        self.peer_controls = PeerControls()
        """The PEER_CONTROL channels to peer relays, by relay id."""
        self.split_streams: dict[int, Stream] = {}
        """The local agent's data stream of each live pair split across relays, by stream
        id: reset when the remote agent is seen resuming elsewhere (:mod:`.remote_resume`)."""

    def owners(self, stream_id: int) -> tuple[str, str] | None:
        """The URIs of a stream's two agents, if the relay knows them (live or broken splice)."""
        pair = self.pairs.get(stream_id)
        if pair is not None:
            return pair.consumer_uri, pair.provider_uri
        members = self.ended.members(stream_id, now_ms())
        if members is not None:
            return members[0].uri, members[1].uri
        return None

    def not_owner(self, session: AgentSession, frame_type: FrameType, stream_id: int) -> None:
        """A frame naming a stream that ``session``'s agent is not a party to: log, count, drop."""
        self.refused_not_owner += 1
        log.warning(
            "frame for another agent's stream refused",
            extra=kv(uri=session.uri, type=frame_name(frame_type), stream_id=stream_id),
        )
