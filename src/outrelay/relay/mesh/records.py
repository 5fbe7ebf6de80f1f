"""The seam between the shared registry and the relay's flows: records and the Mesh protocol.

A relay in a mesh (issue 18) resolves services, peer relays and parked resume halves from a
local cache of the shared registry (etcd, :mod:`.etcd`; in-process, :mod:`.memory`), never
with one registry round trip per open. This module holds what every implementation and
every user shares:

* :class:`RelayRecord`: one live relay (id, region, the endpoint peers dial; spec 02 §1
  ``--advertise``).
* :class:`ProviderRecord`: one service binding (spec 02 §4, §10.3) of an agent connected to
  some relay, with the reference controller's fields plus the relay's region and the time it
  was registered (newest wins, as the embedded registry's stacks, :mod:`..registry`).
* :class:`HalfRecord`: a resume half (spec 02 §7.4) parked on a relay waiting for its peer,
  which may reconnect to another relay (ours); ``revision`` orders the halves of a stream.
* :class:`Mesh`: what the open and resume flows call. Reads come from the cache (no I/O);
  ``publish_*``/``withdraw_*`` never block and never raise: they update the relay's
  authoritative local set, and the implementation writes it to the registry behind the
  caller's back (and again after the relay's lease was lost). ``ready`` is False while the
  registry is unreachable or the cache not yet synced: the relay keeps serving from the
  cache (fail-static) and reports not ready on ``/readyz``.

Resolution order of :meth:`Mesh.remote_providers` (ours, region-aware): providers on relays
of this relay's region first, then the newest ``registered_ms``; ties by relay id and agent
URI so that every relay picks the same one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["HalfRecord", "Mesh", "ProviderRecord", "RelayRecord", "best_first"]


@dataclass(frozen=True, slots=True)
class RelayRecord:
    """A live relay of the mesh."""

    relay_id: str
    region: str
    endpoint: str
    """``host:port`` peer relays dial (``--advertise``, default the listen address)."""


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """One agent providing one service through one relay (spec 02 §4, §10.3)."""

    tenant: str
    service_name: str
    agent_uri: str
    relay_id: str
    region: str
    """The region of the provider's relay."""
    local_addr: str
    registered_ms: int
    """Unix ms of the (last) REGISTER: the newest provider serves."""


@dataclass(frozen=True, slots=True)
class HalfRecord:
    """A STREAM_RESUME half parked on ``relay_id`` waiting for its peer (spec 02 §7.4, ours)."""

    stream_id: int
    relay_id: str
    agent_uri: str
    expected_peer: str
    revision: int
    """The registry revision of the put: the later half of two has the higher one."""


def best_first(records: Iterable[ProviderRecord], region: str) -> list[ProviderRecord]:
    """``records`` in resolution order: ``region`` first, then newest, then by relay, agent."""
    return sorted(
        records,
        key=lambda r: (r.region != region, -r.registered_ms, r.relay_id, r.agent_uri),
    )


class Mesh(Protocol):
    """What the relay's flows use of the shared registry; ``RelayState.mesh`` (None = memory)."""

    relay_id: str
    region: str

    def remote_providers(self, tenant: str, service_name: str) -> list[ProviderRecord]:
        """Providers on OTHER live relays (cache, no I/O), best first: provider relay's
        region == self.region first, then newest registered_ms."""
        ...

    def relay(self, relay_id: str) -> RelayRecord | None:
        """A live relay's record (cache, no I/O), None if unknown or gone."""
        ...

    def publish_binding(
        self, tenant: str, service_name: str, agent_uri: str, local_addr: str
    ) -> None:
        """This relay's agent provides the service (REGISTER accepted). Never blocks or raises."""
        ...

    def withdraw_agent(self, tenant: str, agent_uri: str) -> None:
        """Every binding of this agent on this relay goes away. Never blocks or raises."""
        ...

    def publish_half(self, stream_id: int, agent_uri: str, expected_peer: str) -> None:
        """A resume half is parked here for ``stream_id``. Never blocks or raises."""
        ...

    def withdraw_half(self, stream_id: int) -> None:
        """This relay's half for ``stream_id`` is gone (matched or expired)."""
        ...

    def halves(self, stream_id: int) -> list[HalfRecord]:
        """Every relay's half for ``stream_id``, this relay's included, by revision.

        A half appears once the registry holds it (so its revision is known and the same
        on every relay): on etcd, this relay's own half shows up with the watch event that
        also fires :meth:`on_half`, and disappears at once on :meth:`withdraw_half`."""
        ...

    def on_half(self, callback: Callable[[HalfRecord], None]) -> None:
        """callback(record) on the event loop whenever a half record (own or other) is put."""
        ...

    @property
    def ready(self) -> bool:
        """The registry is reachable and the cache synced; False = fail-static."""
        ...

    def not_ready_reasons(self) -> list[str]:
        """Why not ready, each starting with ``"registry: "``; empty when ready."""
        ...
