"""Several in-process relays sharing one :class:`MemoryMeshHub` (issue 18 tests).

Each relay gets its own relay-role certificate (``outrelay://local/relay/<id>``, the id
also its ``--relay-id``: a peer relay is known by its certificate's id) and a view of one
hub; its advertised endpoint is a free loopback UDP port picked before it binds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from outrelay.pki import issue_relay
from outrelay.relay import Relay, RelayConfig
from outrelay.relay.mesh import MemoryMesh, MemoryMeshHub
from outrelay.relay.mesh.cache import RegistryOptions
from outrelay.relay.policy import PolicyService
from outrelay.relay.policy.file import load_policy_file
from outrelay.transport import QuicTlsConfig

from .rawagent import Pki, RawAgent

__all__ = ["MeshRelays", "free_udp_port", "mesh_relays", "until"]


async def until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``condition`` (relay tables have no event to wait on) for ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {limit:g}s"
        await asyncio.sleep(0.02)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class MeshRelays:
    pki: Pki
    hub: MemoryMeshHub
    etcd: tuple[tuple[str, int], ...] = ()
    """etcd client endpoints: the relays join a real etcd mesh instead of the hub."""
    relays: dict[str, Relay] = field(default_factory=dict)
    views: dict[str, MemoryMesh] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    agents: list[RawAgent] = field(default_factory=list)

    async def start(
        self,
        relay_id: str,
        rules: list[dict] | None = None,
        *,
        peer_dial_timeout: float = 5.0,
        port: int | None = None,
        cert: tuple[Path, Path] | None = None,
    ) -> Relay:
        cert, key = cert or self.pki.dev.write(
            f"relay-{relay_id}-{uuid.uuid4().hex[:6]}",
            issue_relay(self.pki.dev.ca, relay_id=relay_id),
        )
        port = port or free_udp_port()
        view = None if self.etcd else self.hub.view(relay_id, "local", f"127.0.0.1:{port}")
        registry = (
            RegistryOptions(self.etcd, advertise=f"127.0.0.1:{port}", lease_ttl=2)
            if self.etcd
            else None
        )
        policy = None
        if rules is not None:
            path = self.pki.dev.dir / f"policy-{uuid.uuid4().hex}.json"
            path.write_text(json.dumps({"rules": rules}))
            policy = PolicyService()
            policy.load_rules(load_policy_file(str(path)))
        relay = Relay(
            RelayConfig(
                str(cert),
                str(key),
                str(self.pki.dev.ca_cert),
                listen_port=port,
                relay_id=relay_id,
                mesh=view,
                registry=registry,
                policy=policy,
                peer_dial_timeout=peer_dial_timeout,
            )
        )
        await relay.start()
        self.relays[relay_id] = relay
        if view is not None:
            self.views[relay_id] = view
        self.ports[relay_id] = port
        return relay

    async def stop(self, relay_id: str) -> None:
        """Stop a relay; its registry rows vanish (as its lease would expire)."""
        relay = self.relays.pop(relay_id)
        view = self.views.pop(relay_id, None)
        if view is not None:
            view.close()
        await relay.stop()

    def sees(self, relay_id: str, service: str, tenant: str = "acme") -> bool:
        """Does another relay's registry show ``service`` provided on ``relay_id``?"""
        return any(
            record.relay_id == relay_id
            for other_id, other in self.relays.items()
            if other_id != relay_id and other.state.mesh is not None
            for record in other.state.mesh.remote_providers(tenant, service)
        )

    async def agent(
        self,
        relay_id: str,
        capabilities: tuple[str, ...] = (),
        *,
        identity: tuple[QuicTlsConfig, str] | None = None,
    ) -> RawAgent:
        tls, uri = identity or self.pki.agent()
        agent = await RawAgent.connect("127.0.0.1", self.ports[relay_id], tls, uri, capabilities)
        self.agents.append(agent)
        return agent


@contextlib.asynccontextmanager
async def mesh_relays(
    pki: Pki, *relay_ids: str, etcd: tuple[tuple[str, int], ...] = ()
) -> AsyncIterator[MeshRelays]:
    mesh = MeshRelays(pki, MemoryMeshHub(), etcd)
    try:
        for relay_id in relay_ids:
            await mesh.start(relay_id)
        yield mesh
    finally:
        for agent in mesh.agents:
            await agent.close()
        for relay_id in list(mesh.relays):
            await mesh.stop(relay_id)
