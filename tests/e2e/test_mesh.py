"""Many relays, one mesh (issue 18): real etcd, relay and agent processes on 127.0.0.1.

A 3-member etcd cluster and three relays (``--registry etcd://...``, each its own relay
certificate). The consumer's agent is on r1, the provider's on r3: the stream is forwarded
r1 -> r3 (spec 02 §10 with our extensions). Here the consumer's relay r1 dies (the
provider's relay dying is in ``test_many_relays``): the consumer fails over to r2, its
resume half meets the provider's (still on r3) through etcd, and the application sees every
byte exactly once (sha256).
"""

from __future__ import annotations

import pytest
from devpki import DevPki
from etcd_cluster import EtcdCluster

from outrelay.pki import issue_relay

from .harness import Backends, Cluster, Relay, Transfer, free_udp_port

pytestmark = [pytest.mark.e2e]

MiB = 1 << 20


def _mesh_relay(
    cluster: Cluster, pki: DevPki, etcd: EtcdCluster, relay_id: str, port: int | None = None
) -> Relay:
    cert, key = pki.write(f"relay-{relay_id}", issue_relay(pki.ca, relay_id=relay_id))
    return cluster.start_relay(
        port=port,
        name=relay_id,
        args=[
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--relay-id",
            relay_id,
            "--registry",
            etcd.endpoints,
            "--registry-lease",
            "2",
        ],
    )


@pytest.mark.timeout(240)
def test_forwarded_stream_survives_the_consumer_relays_death(
    cluster: Cluster, backends: Backends, pki: DevPki, etcd_cluster: EtcdCluster
) -> None:
    """The other way round: r1 (the consumer's relay, which dialled r3) is SIGKILLed; the
    consumer fails over to r2; r3 resets the provider's stream (its peer stream broke, or
    it saw the consumer's half in etcd first), and the halves meet through etcd."""
    r1 = _mesh_relay(cluster, pki, etcd_cluster, "r1")
    r3 = _mesh_relay(cluster, pki, etcd_cluster, "r3")
    r2_port = free_udp_port()
    echo = backends.echo()
    provider = cluster.start_agent(pki.agent(0), r3, expose={"echo": echo.addr})
    consumer = cluster.start_agent(pki.agent(1), f"{r1.addr},127.0.0.1:{r2_port}", consume=["echo"])
    r2 = _mesh_relay(cluster, pki, etcd_cluster, "r2", port=r2_port)
    transfer = Transfer(consumer.port("echo"), 30 * MiB)
    transfer.wait_received(0.3, timeout=120)
    r1.kill()
    transfer.wait(timeout=180)
    transfer.check_exact()
    assert r2.find("stream resumed across relays") or r3.find("stream resumed across relays")
    resumed = [agent.find("session: stream resumed") for agent in (provider, consumer)]
    assert all(resumed), cluster.log_tail(30)
    print(f"longest stall seen by the application: {transfer.longest_gap:.1f}s")
