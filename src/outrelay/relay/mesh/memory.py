"""An in-process :class:`~.records.Mesh`: several relays of one process share one hub.

Tests (and anyone embedding several :class:`~outrelay.relay.cli` relays in one process) use
it instead of etcd: :class:`MemoryMeshHub` is the shared "registry", and each relay gets its
own :class:`MemoryMesh` view with its relay id, region and endpoint
(``hub.view(relay_id, region, endpoint)``). Semantics are those of the etcd implementation:

* a view made with ``endpoint=""`` gets the relay's bound address from
  :meth:`outrelay.relay.Relay.start` (:meth:`MemoryMesh.advertise`);
* the view's relay record exists from :meth:`MemoryMeshHub.view` until :meth:`MemoryMesh.close`
  (the memory analogue of the relay's lease expiring), and closing drops its bindings and
  halves, as the lease's keys vanish;
* a binding is keyed by (tenant, service, relay, agent): publishing it again refreshes
  ``registered_ms`` and ``local_addr`` (upsert, spec 02 §4);
* every half put gets the hub's next revision; :meth:`MemoryMesh.on_half` callbacks of every
  view run on the event loop (``call_soon``) as the etcd watch delivers them, or at once when
  no loop runs;
* :meth:`MemoryMeshHub.set_outage` makes every view not ready (the registry "unreachable")
  while the data stays served, which is fail-static.

No I/O; the clock (Unix ms) is an argument so tests pass numbers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from outrelay.relay.mesh.records import HalfRecord, ProviderRecord, RelayRecord, best_first

__all__ = ["MemoryMesh", "MemoryMeshHub"]

log = logging.getLogger("outrelay.relay.mesh")


def _wall_ms() -> int:
    return int(time.time() * 1000)


class MemoryMeshHub:
    """The shared backing object of in-process :class:`MemoryMesh` views."""

    def __init__(self, clock: Callable[[], int] = _wall_ms) -> None:
        self.clock = clock
        self.relays: dict[str, RelayRecord] = {}
        self.bindings: dict[tuple[str, str, str, str], ProviderRecord] = {}
        """(tenant, service_name, relay_id, agent_uri) -> record."""
        self.halves: dict[tuple[int, str], HalfRecord] = {}
        """(stream_id, relay_id) -> record."""
        self.revision = 0
        self.outage: str | None = None
        self._views: list[MemoryMesh] = []

    def view(self, relay_id: str, region: str, endpoint: str) -> MemoryMesh:
        """A relay joins: its record is published; raises ValueError if the id is live."""
        if relay_id in self.relays:
            raise ValueError(f"relay id {relay_id!r} is already live in this mesh")
        self.relays[relay_id] = RelayRecord(relay_id, region, endpoint)
        mesh = MemoryMesh(self, relay_id, region, endpoint)
        self._views.append(mesh)
        return mesh

    def set_outage(self, reason: str | None) -> None:
        """Simulate the registry unreachable (``reason``) or back (None)."""
        self.outage = reason

    def _next_revision(self) -> int:
        self.revision += 1
        return self.revision

    def _leave(self, mesh: MemoryMesh) -> None:
        if mesh in self._views:
            self._views.remove(mesh)
        self.relays.pop(mesh.relay_id, None)
        for key in [k for k in self.bindings if k[2] == mesh.relay_id]:
            del self.bindings[key]
        for hkey in [k for k in self.halves if k[1] == mesh.relay_id]:
            del self.halves[hkey]

    def _deliver_half(self, record: HalfRecord) -> None:
        callbacks = [cb for view in self._views for cb in view._half_callbacks]
        if not callbacks:
            return
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for callback in callbacks:
            if loop is not None:
                loop.call_soon(_run_callback, callback, record)
            else:
                _run_callback(callback, record)


def _run_callback(callback: Callable[[HalfRecord], None], record: HalfRecord) -> None:
    try:
        callback(record)
    except Exception:  # a subscriber's bug must not break the registry
        log.exception("on_half callback failed")


class MemoryMesh:
    """One relay's view of a :class:`MemoryMeshHub` (implements :class:`~.records.Mesh`)."""

    def __init__(self, hub: MemoryMeshHub, relay_id: str, region: str, endpoint: str) -> None:
        self.hub = hub
        self.relay_id = relay_id
        self.region = region
        self.endpoint = endpoint
        self._half_callbacks: list[Callable[[HalfRecord], None]] = []
        self.closed = False

    def advertise(self, endpoint: str) -> None:
        """Set this relay's endpoint (``view(..., endpoint="")`` before the port is bound;
        :meth:`outrelay.relay.Relay.start` calls it with the bound address then)."""
        self.endpoint = endpoint
        if not self.closed:
            self.hub.relays[self.relay_id] = RelayRecord(self.relay_id, self.region, endpoint)

    # Reads (cache) ---------------------------------------------------------------------

    def remote_providers(self, tenant: str, service_name: str) -> list[ProviderRecord]:
        found = [
            record
            for (t, s, relay_id, _agent), record in self.hub.bindings.items()
            if t == tenant
            and s == service_name
            and relay_id != self.relay_id
            and relay_id in self.hub.relays
        ]
        return best_first(found, self.region)

    def relay(self, relay_id: str) -> RelayRecord | None:
        return self.hub.relays.get(relay_id)

    def halves(self, stream_id: int) -> list[HalfRecord]:
        found = [r for (sid, _relay), r in self.hub.halves.items() if sid == stream_id]
        return sorted(found, key=lambda r: r.revision)

    # Writes (never block, never raise) ---------------------------------------------------

    def publish_binding(
        self, tenant: str, service_name: str, agent_uri: str, local_addr: str
    ) -> None:
        if self.closed:
            return
        self.hub.bindings[(tenant, service_name, self.relay_id, agent_uri)] = ProviderRecord(
            tenant=tenant,
            service_name=service_name,
            agent_uri=agent_uri,
            relay_id=self.relay_id,
            region=self.region,
            local_addr=local_addr,
            registered_ms=self.hub.clock(),
        )

    def withdraw_agent(self, tenant: str, agent_uri: str) -> None:
        for key in [
            k
            for k in self.hub.bindings
            if k[0] == tenant and k[2] == self.relay_id and k[3] == agent_uri
        ]:
            del self.hub.bindings[key]

    def publish_half(self, stream_id: int, agent_uri: str, expected_peer: str) -> None:
        if self.closed:
            return
        record = HalfRecord(
            stream_id, self.relay_id, agent_uri, expected_peer, self.hub._next_revision()
        )
        self.hub.halves[(stream_id, self.relay_id)] = record
        self.hub._deliver_half(record)

    def withdraw_half(self, stream_id: int) -> None:
        self.hub.halves.pop((stream_id, self.relay_id), None)

    def on_half(self, callback: Callable[[HalfRecord], None]) -> None:
        self._half_callbacks.append(callback)

    # Readiness and lifecycle -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.hub.outage is None and not self.closed

    def not_ready_reasons(self) -> list[str]:
        if self.closed:
            return ["registry: closed"]
        if self.hub.outage is not None:
            return [f"registry: {self.hub.outage}"]
        return []

    def close(self) -> None:
        """The relay leaves: its record, bindings and halves vanish (as its lease expiring)."""
        self.closed = True
        self._half_callbacks.clear()
        self.hub._leave(self)

    async def aclose(self) -> None:
        """Same as :meth:`close` (the etcd implementation's shape)."""
        self.close()
