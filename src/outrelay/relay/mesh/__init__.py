"""The relay mesh: a shared registry of relays, service bindings and resume halves (issue 18).

``--registry memory`` (the default) keeps the embedded in-memory registry
(:mod:`outrelay.relay.registry`) and no mesh (``RelayState.mesh is None``).
``--registry etcd://host:port[,...]`` shares relays, bindings, halves and policy rules
through etcd (:mod:`.etcd`, the only module that speaks to etcd). :mod:`.records` holds the
records and the :class:`Mesh` protocol the relay's flows use; :mod:`.memory` an in-process
implementation several relays of one process share (tests).
"""

from outrelay.relay.mesh.memory import MemoryMesh, MemoryMeshHub
from outrelay.relay.mesh.records import HalfRecord, Mesh, ProviderRecord, RelayRecord, best_first

__all__ = [
    "HalfRecord",
    "MemoryMesh",
    "MemoryMeshHub",
    "Mesh",
    "ProviderRecord",
    "RelayRecord",
    "best_first",
]
