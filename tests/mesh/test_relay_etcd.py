"""Relays with ``--registry etcd://`` on a real 3-member etcd (issue 18, registry side).

In-process :class:`~outrelay.relay.Relay` objects are read directly (their
``state.mesh`` caches and ``state.policy``); relay processes (tests/e2e/harness.py) give the
real ``/readyz``, SIGKILL and exit codes. Agents are raw ORP agents (tests/relay/rawagent.py)
or ``outrelay-agent`` processes. Every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from devpki import DevPki
from e2e.harness import OUTRELAY_CMD, RELAY_CMD, Cluster, child_env, free_tcp_port
from etcd_cluster import EtcdCluster
from relay.rawagent import Pki, RawAgent

from mesh.support import wait_until
from outrelay.relay import Relay, RelayConfig
from outrelay.relay.mesh.cache import RegistryOptions, parse_registry_url
from outrelay.relay.mesh.policy import NO_TENANT_POLICY, TenantPolicy
from outrelay.relay.policy import NO_MATCHING_RULE

TTL = 3

pytestmark = pytest.mark.e2e


class Relays:
    def __init__(self, pki: DevPki, cluster: EtcdCluster, prefix: str) -> None:
        self.pki = pki
        self.cluster = cluster
        self.prefix = prefix
        self.started: list[Relay] = []
        self.agents: list[RawAgent] = []

    async def start(self, relay_id: str, region: str = "eu") -> Relay:
        tls = self.pki.relay_tls()
        config = RelayConfig(
            tls.cert_file,
            tls.key_file,
            tls.ca_file,
            listen_port=0,
            relay_id=relay_id,
            region=region,
            policy=TenantPolicy(),
            registry=RegistryOptions(
                tuple(parse_registry_url(self.cluster.endpoints)), self.prefix, TTL
            ),
        )
        relay = Relay(config)
        await relay.start()
        self.started.append(relay)
        return relay

    async def agent(self, relay: Relay, tenant: str = "acme") -> RawAgent:
        tls, uri = Pki(self.pki).agent(tenant)
        server = relay._server
        assert server is not None
        agent = await RawAgent.connect("127.0.0.1", server.address[1], tls, uri)
        self.agents.append(agent)
        return agent


_n = 0


@pytest.fixture
async def relays(dev_pki: DevPki, etcd_cluster: EtcdCluster) -> AsyncIterator[Relays]:
    global _n
    _n += 1
    r = Relays(dev_pki, etcd_cluster, f"/relays{_n}/")
    try:
        yield r
    finally:
        for agent in r.agents:
            await agent.close()
        for relay in r.started:
            await relay.stop()


async def outrelay_policy(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *OUTRELAY_CMD,
        "policy",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_relays_share_relays_and_services_within_1s(relays: Relays) -> None:
    r1 = await relays.start("relay-1", "eu")
    r2 = await relays.start("relay-2", "us")
    m1, m2 = r1.state.mesh, r2.state.mesh
    assert m1 is not None and m2 is not None
    await wait_until(lambda: m2.relay("relay-1") is not None, 1.0, "relay-2 sees relay-1")
    await wait_until(lambda: m1.relay("relay-2") is not None, 1.0, "relay-1 sees relay-2")
    assert m1.relay("relay-2").region == "us"  # type: ignore[union-attr]
    endpoint = m1.relay("relay-2").endpoint  # type: ignore[union-attr]
    assert r2._server is not None and endpoint.endswith(f":{r2._server.address[1]}")

    agent = await relays.agent(r1)
    await agent.register("echo")
    took = await wait_until(lambda: bool(m2.remote_providers("acme", "echo")), 1.0, "binding")
    got = m2.remote_providers("acme", "echo")[0]
    assert (got.agent_uri, got.relay_id, got.region) == (agent.uri, "relay-1", "eu")
    assert m1.remote_providers("acme", "echo") == []  # its own
    assert r1.state.registry.resolve("acme", "echo") is not None  # embedded registry as ever
    print(f"binding seen by the other relay after {took * 1000:.0f} ms")

    relays.agents.remove(agent)
    await agent.close()  # teardown withdraws the agent's bindings
    await wait_until(lambda: not m2.remote_providers("acme", "echo"), 1.0, "withdrawn")


async def test_policy_add_reaches_every_relay_within_1s(relays: Relays) -> None:
    r1 = await relays.start("relay-1")
    r2 = await relays.start("relay-2")
    p1, p2 = r1.state.policy, r2.state.policy
    assert isinstance(p1, TenantPolicy) and isinstance(p2, TenantPolicy)
    caller = "outrelay://acme/agent/x"
    assert p1.decide(caller, "web", "", 0).reason == NO_TENANT_POLICY  # not enforced yet
    reg = ["--registry", relays.cluster.endpoints, "--registry-prefix", relays.prefix]
    code, out, err = await outrelay_policy(
        "add", *reg, "--tenant", "acme", "--id", "allow-web",
        "--caller", "outrelay://acme/*", "--target", "web", "--decision", "allow",
    )  # fmt: skip
    assert (code, out) == (0, "allow-web\n"), err
    await wait_until(lambda: "acme" in p1.tenants and "acme" in p2.tenants, 1.0, "rules arrive")
    for policy in (p1, p2):
        assert policy.decide(caller, "web", "", 0).reason == "allow-web"
        denied = policy.decide(caller, "db", "", 0)
        assert not denied.allowed and denied.reason == NO_MATCHING_RULE  # tenant enforced
        assert policy.decide("outrelay://beta/agent/y", "db", "", 0).allowed  # beta: no rules
    code, _, err = await outrelay_policy("remove", *reg, "--tenant", "acme", "allow-web")
    assert code == 0, err
    await wait_until(lambda: not p1.tenants and not p2.tenants, 1.0, "removal arrives")
    assert p2.decide(caller, "db", "", 0).reason == NO_TENANT_POLICY


async def test_relay_started_after_rules_enforces_them(relays: Relays) -> None:
    reg = ["--registry", relays.cluster.endpoints, "--registry-prefix", relays.prefix]
    code, _, err = await outrelay_policy(
        "add", *reg, "--tenant", "acme", "--id", "only-ab",
        "--provider", "outrelay://acme/agent/ab*", "--service", "echo", "--decision", "allow",
    )  # fmt: skip
    assert code == 0, err
    r1 = await relays.start("relay-1")
    policy = r1.state.policy
    assert isinstance(policy, TenantPolicy) and policy.tenants == {"acme"}
    agent = await relays.agent(r1)  # not outrelay://acme/agent/ab...
    assert not policy.may_provide(agent.uri, "acme", "echo").allowed
    assert policy.may_provide(agent.uri, "acme", "other").allowed  # not covered


# -- relay processes ------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def wait_http(port: int, path: str, status: int, within: float) -> str:
    start = time.monotonic()
    while True:
        got, body = await asyncio.to_thread(http_get, port, path)
        if got == status:
            return body
        if time.monotonic() - start > within:
            pytest.fail(f"{path} not {status} within {within} s (last {got} {body!r})")
        await asyncio.sleep(0.1)


def registry_args(cluster: EtcdCluster, relay_id: str, *extra: str) -> list[str]:
    return [
        "--registry", cluster.endpoints, "--relay-id", relay_id,
        "--registry-lease", str(TTL), *extra,
    ]  # fmt: skip


@pytest.fixture
def procs(tmp_path: Path, dev_pki: DevPki, request: pytest.FixtureRequest) -> Cluster:
    c = Cluster(tmp_path / "procs", dev_pki)
    request.node.e2e_log_tail = c.log_tail
    request.addfinalizer(c.stop_all)
    return c


async def test_etcd_outages_fail_static_and_crash_cleanup(
    etcd3: EtcdCluster, dev_pki: DevPki, procs: Cluster
) -> None:
    admin = free_tcp_port()
    relay_a = await asyncio.to_thread(
        procs.start_relay,
        args=registry_args(etcd3, "relay-a", "--admin-listen", f"127.0.0.1:{admin}"),
        name="relay-a",
    )
    await wait_http(admin, "/readyz", 200, 5)
    tls = dev_pki.relay_tls()
    b = Relay(
        RelayConfig(
            tls.cert_file, tls.key_file, tls.ca_file, listen_port=0, relay_id="relay-b",
            policy=TenantPolicy(),
            registry=RegistryOptions(tuple(parse_registry_url(etcd3.endpoints)), lease_ttl=TTL),
        )
    )  # fmt: skip
    await b.start()
    try:
        mesh = b.state.mesh
        assert mesh is not None
        await wait_until(lambda: mesh.relay("relay-a") is not None, 1.0, "b sees relay-a")

        # One etcd member killed: no disruption, writes continue.
        etcd3.kill(0)
        await asyncio.to_thread(
            procs.start_agent, dev_pki.agent(0), relay_a, expose={"svc1": "127.0.0.1:9"}
        )
        await wait_until(lambda: bool(mesh.remote_providers("acme", "svc1")), 10, "svc1 published")
        await wait_http(admin, "/readyz", 200, 10)

        # Every member stopped for 10 s: caches serve, /readyz 503 "registry: ...".
        etcd3.stop_all()
        outage_end = time.monotonic() + 10
        body = await wait_http(admin, "/readyz", 503, 10)
        assert "registry: " in body, body
        await wait_until(lambda: not mesh.ready, 10, "b not ready")
        await asyncio.to_thread(
            procs.start_agent, dev_pki.agent(1), relay_a, expose={"svc2": "127.0.0.1:9"}
        )  # registered on relay-a meanwhile: local registration works without etcd
        while time.monotonic() < outage_end:
            assert mesh.remote_providers("acme", "svc1"), "cache dropped svc1 during the outage"
            assert mesh.relay("relay-a") is not None
            await asyncio.sleep(0.5)
        etcd3.start_all()
        await wait_http(admin, "/readyz", 200, 20)
        await wait_until(lambda: mesh.ready, 20, "b ready again")
        await wait_until(lambda: bool(mesh.remote_providers("acme", "svc2")), 5, "caught up")
        assert mesh.remote_providers("acme", "svc1")

        # relay-a SIGKILLed: its record and bindings vanish within the lease TTL + 2 s.
        relay_a.kill()
        await wait_until(lambda: mesh.relay("relay-a") is None, TTL + 2, "relay-a gone")
        assert not mesh.remote_providers("acme", "svc1")
        assert not mesh.remote_providers("acme", "svc2")
    finally:
        await b.stop()


def test_duplicate_relay_id_and_policy_flag_exit_codes(
    etcd_cluster: EtcdCluster, procs: Cluster
) -> None:
    first = procs.start_relay(args=registry_args(etcd_cluster, "dup-id"), name="first")
    second = procs.start_relay(
        args=registry_args(etcd_cluster, "dup-id"), name="second", wait=False
    )
    assert second.wait_exit(TTL + 15) == 1
    assert second.find("registry", err=lambda e: "held by a live relay" in e)
    assert first.running
    key = "/outrelay/v1/relays/dup-id"
    assert etcd_cluster.etcdctl("get", key, "--print-value-only").strip()
    assert first.stop() == 0  # SIGTERM: a clean stop revokes the lease, the rows go at once
    assert etcd_cluster.etcdctl("get", key, "--print-value-only").strip() == ""
    policy = Path(procs.workdir) / "p.json"
    policy.write_text(json.dumps({"rules": []}))
    third = procs.start_relay(
        args=[*registry_args(etcd_cluster, "other"), "--policy", str(policy)], wait=False
    )
    assert third.wait_exit(15) == 2
    bad = procs.start_relay(args=["--registry", "etcd://nohostport"], wait=False, name="bad")
    assert bad.wait_exit(15) == 2
    assert RELAY_CMD  # the harness's relay command is what started them
