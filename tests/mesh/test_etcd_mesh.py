"""EtcdMesh against a real 3-member etcd cluster on loopback (tests/etcd_cluster.py).

Every wait polls with a deadline; the deadlines are the contract's (1 s to see another
relay's rows, the lease TTL + 2 s for a dead relay's rows to vanish) or generous bounds for
recovery after etcd outages (elections, reconnect backoff).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from etcd_cluster import EtcdCluster

from mesh.support import wait_until
from outrelay.relay.mesh import HalfRecord
from outrelay.relay.mesh.cache import parse_registry_url
from outrelay.relay.mesh.etcd import DuplicateRelayId, EtcdMesh, EtcdStore, RegistryUnavailable
from outrelay.relay.policy import PolicyDocument

TTL = 3


class Meshes:
    def __init__(self, cluster: EtcdCluster, prefix: str) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.open: list[EtcdMesh] = []

    async def start(self, relay_id: str, region: str = "eu", *, reverse: bool = False) -> EtcdMesh:
        endpoints = parse_registry_url(self.cluster.endpoints)
        mesh = EtcdMesh(
            endpoints[::-1] if reverse else endpoints,
            relay_id=relay_id,
            region=region,
            advertise=f"127.0.0.1:{7000 + len(self.open)}",
            prefix=self.prefix,
            lease_ttl=TTL,
            op_timeout=1.0,
        )
        await mesh.start(15)
        self.open.append(mesh)
        return mesh


_counter = 0


@pytest.fixture
async def meshes(etcd_cluster: EtcdCluster) -> AsyncIterator[Meshes]:
    global _counter
    _counter += 1
    m = Meshes(etcd_cluster, f"/t{_counter}-{time.monotonic_ns()}/")
    try:
        yield m
    finally:
        for mesh in m.open:
            await mesh.aclose()


@pytest.fixture
async def meshes3(etcd3: EtcdCluster) -> AsyncIterator[Meshes]:
    m = Meshes(etcd3, "/outrelay/v1/")
    try:
        yield m
    finally:
        for mesh in m.open:
            await mesh.aclose()


async def test_relays_see_each_others_rows_within_1s(meshes: Meshes) -> None:
    a = await meshes.start("r1", "eu")
    b = await meshes.start("r2", "us", reverse=True)
    await wait_until(lambda: b.relay("r1") is not None, 1.0, "r2 sees r1's record")
    assert a.relay("r2") is not None and a.relay("r2").region == "us"  # type: ignore[union-attr]
    assert a.ready and b.ready and a.not_ready_reasons() == []
    a.publish_binding("acme", "echo", "outrelay://acme/agent/a", "127.0.0.1:9")
    await wait_until(lambda: bool(b.remote_providers("acme", "echo")), 1.0, "binding seen")
    got = b.remote_providers("acme", "echo")[0]
    assert (got.relay_id, got.region, got.local_addr) == ("r1", "eu", "127.0.0.1:9")
    assert a.remote_providers("acme", "echo") == []  # own bindings are not remote
    a.withdraw_agent("acme", "outrelay://acme/agent/a")
    await wait_until(lambda: not b.remote_providers("acme", "echo"), 1.0, "binding withdrawn")


async def test_halves_and_on_half(meshes: Meshes) -> None:
    a = await meshes.start("r1")
    b = await meshes.start("r2")
    seen_a: list[HalfRecord] = []
    a.on_half(seen_a.append)
    b.publish_half(42, "outrelay://acme/agent/b", "outrelay://acme/agent/a")
    await wait_until(lambda: len(seen_a) == 1, 1.0, "a hears b's half")
    a.publish_half(42, "outrelay://acme/agent/a", "outrelay://acme/agent/b")
    await wait_until(lambda: len(a.halves(42)) == 2, 1.0, "both halves in a's cache")
    halves = b.halves(42)
    assert [h.relay_id for h in halves] == ["r2", "r1"]
    assert halves[0].revision < halves[1].revision
    a.withdraw_half(42)
    assert [h.relay_id for h in a.halves(42)] == ["r2"]  # own withdrawn at once
    await wait_until(lambda: len(b.halves(42)) == 1, 1.0, "b sees the withdrawal")


async def test_duplicate_live_relay_id(meshes: Meshes) -> None:
    await meshes.start("dup")
    with pytest.raises(DuplicateRelayId, match="dup"):
        await meshes.start("dup")
    await meshes.open[0].aclose()  # a clean stop revokes the lease: the id is free at once
    meshes.open.clear()
    await meshes.start("dup")


async def test_policy_rules_reach_the_callback(meshes: Meshes) -> None:
    a = await meshes.start("r1")
    docs: list[dict[str, PolicyDocument]] = []
    a.on_policy(docs.append)
    store = EtcdStore(parse_registry_url(meshes.cluster.endpoints), timeout=5)
    rule = {"id": "allow-web", "caller": "outrelay://acme/*", "target": "web", "decision": "allow"}
    await store.put(f"{meshes.prefix}policy/acme/allow-web", json.dumps(rule).encode())
    await wait_until(lambda: bool(docs) and "acme" in docs[-1], 1.0, "policy callback")
    assert [r.id for r in docs[-1]["acme"].rules] == ["allow-web"]
    await store.delete(f"{meshes.prefix}policy/acme/allow-web")
    await wait_until(lambda: "acme" not in docs[-1], 1.0, "policy removal")


async def test_hostile_entries_do_not_break_the_mesh(meshes: Meshes) -> None:
    a = await meshes.start("r1")
    b = await meshes.start("r2")
    store = EtcdStore(parse_registry_url(meshes.cluster.endpoints), timeout=5)
    for key, value in [
        ("relays/evil", b"not json"),
        ("services/acme/echo", b"{}"),
        ("halves/zz/r2", b"{}"),
        ("policy/acme/x", b'{"id":"x"}'),
        ("what/ever", b"\xff"),
    ]:
        await store.put(meshes.prefix + key, value)
    await wait_until(lambda: a.cache.ignored >= 5, 2.0, "hostile entries ignored")
    assert a.ready and b.ready
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "")
    await wait_until(lambda: bool(a.remote_providers("acme", "echo")), 1.0, "still working")


async def test_crashed_relay_rows_vanish_within_ttl(meshes: Meshes) -> None:
    a = await meshes.start("r1")
    b = await meshes.start("r2")
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "")
    b.publish_half(5, "outrelay://acme/agent/b", "")
    await wait_until(lambda: bool(a.remote_providers("acme", "echo")), 1.0, "binding")
    await wait_until(lambda: bool(a.halves(5)), 1.0, "half")
    await b.aclose(revoke=False)  # as a crash: keepalives stop, nothing is revoked
    meshes.open.remove(b)
    await wait_until(lambda: a.relay("r2") is None, TTL + 2, "relay record gone")
    await wait_until(lambda: not a.remote_providers("acme", "echo"), 0.5, "bindings gone")
    assert a.halves(5) == []


async def test_lost_lease_is_replaced_and_everything_republished(meshes: Meshes) -> None:
    a = await meshes.start("r1")
    b = await meshes.start("r2")
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "")
    await wait_until(lambda: bool(a.remote_providers("acme", "echo")), 1.0, "binding")
    lease = b._lease_id
    assert lease is not None
    meshes.cluster.etcdctl("lease", "revoke", f"{lease:x}")  # its rows vanish at once
    await wait_until(lambda: a.relay("r2") is None, 2.0, "rows gone with the lease")
    await wait_until(lambda: a.relay("r2") is not None, TTL + 5, "relay record re-published")
    await wait_until(lambda: bool(a.remote_providers("acme", "echo")), 2.0, "binding too")
    assert b._lease_id != lease


async def test_unreachable_etcd_at_start_is_bounded() -> None:
    from etcd_cluster import free_ports

    port = free_ports(1)[0]
    mesh = EtcdMesh(
        [("127.0.0.1", port)], relay_id="x", region="eu", advertise="x:1", op_timeout=0.5
    )
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="not reachable"):
        await mesh.start(2)
    assert time.monotonic() - start < 5
    assert not mesh.ready and mesh.not_ready_reasons()[0].startswith("registry: ")


async def test_one_member_killed_no_disruption(meshes3: Meshes) -> None:
    a = await meshes3.start("r1")
    b = await meshes3.start("r2", reverse=True)
    b.publish_binding("acme", "before", "outrelay://acme/agent/b", "")
    await wait_until(lambda: bool(a.remote_providers("acme", "before")), 1.0, "before")
    meshes3.cluster.kill(0)  # a's first endpoint (and maybe the leader)
    assert a.remote_providers("acme", "before")  # the cache keeps serving
    b.publish_binding("acme", "after", "outrelay://acme/agent/b", "")
    a.publish_binding("acme", "from-a", "outrelay://acme/agent/a", "")
    await wait_until(lambda: bool(a.remote_providers("acme", "after")), 10.0, "write continues")
    await wait_until(lambda: bool(b.remote_providers("acme", "from-a")), 10.0, "a writes too")
    await wait_until(lambda: a.ready and b.ready, 10.0, "ready on the survivors")


async def test_all_members_stopped_fail_static_then_catch_up(meshes3: Meshes) -> None:
    a = await meshes3.start("r1")
    b = await meshes3.start("r2", reverse=True)
    b.publish_binding("acme", "known", "outrelay://acme/agent/b", "")
    await wait_until(lambda: bool(a.remote_providers("acme", "known")), 1.0, "known")
    meshes3.cluster.stop_all()
    await wait_until(lambda: not a.ready and not b.ready, 10.0, "not ready without etcd")
    assert a.not_ready_reasons()[0].startswith("registry: ")
    b.publish_binding("acme", "meanwhile", "outrelay://acme/agent/b", "")  # queued, no raise
    outage_end = time.monotonic() + 10
    while time.monotonic() < outage_end:  # the 10 s outage: the cache serves throughout
        assert a.remote_providers("acme", "known")
        assert a.relay("r2") is not None
        await asyncio.sleep(0.5)
    meshes3.cluster.start_all()
    await wait_until(lambda: a.ready and b.ready, 20.0, "ready again")
    await wait_until(lambda: bool(a.remote_providers("acme", "meanwhile")), 5.0, "caught up")
    assert a.remote_providers("acme", "known")
