"""MemoryMesh: the in-process Mesh several relays of one process share (issue 18)."""

from __future__ import annotations

import asyncio

import pytest

from outrelay.relay.mesh import (
    HalfRecord,
    MemoryMesh,
    MemoryMeshHub,
    Mesh,
    ProviderRecord,
    RelayRecord,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        self.now += 1
        return self.now


def three() -> tuple[MemoryMeshHub, MemoryMesh, MemoryMesh, MemoryMesh]:
    hub = MemoryMeshHub(clock=Clock())
    return (
        hub,
        hub.view("r1", "eu", "127.0.0.1:1001"),
        hub.view("r2", "eu", "127.0.0.1:1002"),
        hub.view("r3", "us", "127.0.0.1:1003"),
    )


def test_is_a_mesh() -> None:
    _, a, _, _ = three()
    mesh: Mesh = a  # mypy checks the structural match
    assert mesh.relay_id == "r1" and mesh.region == "eu"
    assert mesh.ready and mesh.not_ready_reasons() == []


def test_relay_records_and_duplicate_id() -> None:
    hub, a, b, _ = three()
    assert a.relay("r2") == RelayRecord("r2", "eu", "127.0.0.1:1002")
    assert b.relay("nope") is None
    with pytest.raises(ValueError, match="already live"):
        hub.view("r1", "eu", "x:1")


def test_remote_providers_exclude_own_relay_and_order_region_then_newest() -> None:
    _, a, b, c = three()
    a.publish_binding("acme", "echo", "outrelay://acme/agent/a", "127.0.0.1:7")
    c.publish_binding("acme", "echo", "outrelay://acme/agent/c", "127.0.0.1:9")  # newer, us
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "127.0.0.1:8")  # newest, eu
    # From r1 (eu): own binding excluded; r2 (eu) before r3 (us) although both newer than a.
    got = a.remote_providers("acme", "echo")
    assert [p.relay_id for p in got] == ["r2", "r3"]
    assert got[0] == ProviderRecord(
        "acme", "echo", "outrelay://acme/agent/b", "r2", "eu", "127.0.0.1:8", got[0].registered_ms
    )
    # From r3 (us): no us provider elsewhere, so newest first among eu.
    assert [p.relay_id for p in c.remote_providers("acme", "echo")] == ["r2", "r1"]
    assert a.remote_providers("acme", "other") == []
    assert a.remote_providers("other", "echo") == []


def test_republish_refreshes_registered_ms_and_local_addr() -> None:
    _, a, b, c = three()
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "x:1")
    c.publish_binding("acme", "echo", "outrelay://acme/agent/c2", "x:2")
    c.publish_binding("acme", "echo", "outrelay://acme/agent/c", "x:3")
    # Same region as b: r2 first from r1.
    assert a.remote_providers("acme", "echo")[0].relay_id == "r2"
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "x:9")
    got = a.remote_providers("acme", "echo")
    assert len(got) == 3 and got[0].local_addr == "x:9"
    # r3's two bindings ordered newest first.
    assert [p.agent_uri for p in got[1:]] == ["outrelay://acme/agent/c", "outrelay://acme/agent/c2"]


def test_withdraw_agent_removes_only_its_bindings_on_this_relay() -> None:
    _, a, b, c = three()
    uri = "outrelay://acme/agent/x"
    b.publish_binding("acme", "echo", uri, "")
    b.publish_binding("acme", "web", uri, "")
    c.publish_binding("acme", "echo", uri, "")  # same agent URI through another relay
    b.publish_binding("acme", "echo", "outrelay://acme/agent/y", "")
    b.withdraw_agent("acme", uri)
    assert [(p.relay_id, p.agent_uri) for p in a.remote_providers("acme", "echo")] == [
        ("r2", "outrelay://acme/agent/y"),
        ("r3", uri),
    ]
    assert a.remote_providers("acme", "web") == []
    b.withdraw_agent("other", "outrelay://acme/agent/y")  # wrong tenant: nothing
    assert len(a.remote_providers("acme", "echo")) == 2


def test_close_is_the_lease_expiring() -> None:
    hub, a, b, _ = three()
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "")
    b.publish_half(7, "outrelay://acme/agent/b", "outrelay://acme/agent/q")
    b.close()
    assert a.relay("r2") is None
    assert a.remote_providers("acme", "echo") == []
    assert a.halves(7) == []
    assert not b.ready and b.not_ready_reasons() == ["registry: closed"]
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "")  # ignored, no raise
    assert a.remote_providers("acme", "echo") == []
    # The id is free again: a restarted relay may take it.
    assert hub.view("r2", "eu", "127.0.0.1:1002").relay("r2") is not None


def test_halves_revision_order_and_withdraw() -> None:
    _, a, b, _ = three()
    b.publish_half(5, "outrelay://acme/agent/b", "outrelay://acme/agent/a")
    a.publish_half(5, "outrelay://acme/agent/a", "outrelay://acme/agent/b")
    a.publish_half(6, "outrelay://acme/agent/z", "")
    got = b.halves(5)
    assert [h.relay_id for h in got] == ["r2", "r1"]
    assert got[0].revision < got[1].revision
    a.withdraw_half(5)
    assert [h.relay_id for h in b.halves(5)] == ["r2"]
    a.withdraw_half(99)  # nothing, no raise
    assert len(a.halves(6)) == 1


async def test_on_half_runs_on_the_loop_for_every_view() -> None:
    _, a, b, _ = three()
    seen: list[tuple[str, HalfRecord]] = []
    a.on_half(lambda r: seen.append(("a", r)))
    b.on_half(lambda r: seen.append(("b", r)))

    def broken(_: HalfRecord) -> None:
        raise RuntimeError("subscriber bug")

    b.on_half(broken)
    b.publish_half(9, "outrelay://acme/agent/b", "outrelay://acme/agent/a")
    assert seen == []  # delivered later, on the loop, as the etcd watch would
    await asyncio.sleep(0)
    assert sorted(who for who, _ in seen) == ["a", "b"]
    assert all(r.stream_id == 9 and r.relay_id == "r2" for _, r in seen)


def test_on_half_without_a_loop_runs_at_once() -> None:
    _, a, b, _ = three()
    seen: list[HalfRecord] = []
    a.on_half(seen.append)
    b.publish_half(1, "u", "")
    assert [r.stream_id for r in seen] == [1]


def test_outage_is_not_ready_but_keeps_serving() -> None:
    hub, a, b, _ = three()
    b.publish_binding("acme", "echo", "outrelay://acme/agent/b", "")
    hub.set_outage("etcd unreachable")
    assert not a.ready
    assert a.not_ready_reasons() == ["registry: etcd unreachable"]
    assert [p.relay_id for p in a.remote_providers("acme", "echo")] == ["r2"]
    hub.set_outage(None)
    assert a.ready


def test_advertise_sets_the_endpoint_later() -> None:
    hub = MemoryMeshHub()
    a = hub.view("r1", "eu", "")
    b = hub.view("r2", "eu", "x:2")
    a.advertise("127.0.0.1:7443")
    assert b.relay("r1") == RelayRecord("r1", "eu", "127.0.0.1:7443")
    a.close()
    a.advertise("127.0.0.1:1")  # closed: no record comes back
    assert b.relay("r1") is None


async def test_relay_start_advertises_its_bound_address(dev_pki: object) -> None:
    from devpki import DevPki

    from outrelay.relay import Relay, RelayConfig

    assert isinstance(dev_pki, DevPki)
    hub = MemoryMeshHub()
    tls = dev_pki.relay_tls()
    mesh = hub.view("r1", "eu", "")
    relay = Relay(RelayConfig(tls.cert_file, tls.key_file, tls.ca_file, listen_port=0, mesh=mesh))
    host, port = await relay.start()
    try:
        assert relay.state.mesh is mesh
        assert hub.relays["r1"].endpoint == f"{host}:{port}"
        assert relay.mesh_ready_reasons == []
        hub.set_outage("down")
        assert relay.mesh_ready_reasons == ["registry: down"]
    finally:
        await relay.stop()


async def test_register_publishes_and_teardown_withdraws(dev_pki: object) -> None:
    from devpki import DevPki
    from relay.rawagent import Pki, RawAgent

    from outrelay.relay import Relay, RelayConfig

    assert isinstance(dev_pki, DevPki)
    hub = MemoryMeshHub()
    other = hub.view("r2", "us", "x:2")
    tls = dev_pki.relay_tls()
    relay = Relay(
        RelayConfig(
            tls.cert_file, tls.key_file, tls.ca_file, listen_port=0, mesh=hub.view("r1", "eu", "")
        )
    )
    _, port = await relay.start()
    agent_tls, uri = Pki(dev_pki).agent("acme")
    agent = await RawAgent.connect("127.0.0.1", port, agent_tls, uri)
    try:
        await agent.register("echo")
        [got] = other.remote_providers("acme", "echo")
        assert (got.agent_uri, got.relay_id, got.region) == (uri, "r1", "eu")
        await agent.close()
        for _ in range(500):  # teardown runs when the relay sees the connection close
            if not other.remote_providers("acme", "echo"):
                break
            await asyncio.sleep(0.01)
        assert other.remote_providers("acme", "echo") == []
    finally:
        await agent.close()
        await relay.stop()
