"""Issue 7, end to end: P2P promotion across two NATs built from network namespaces.

The topology (see :mod:`nat_topology`): the relay on ``pub`` (the internet),
the consumer agent and its application in ``c`` behind ``natc`` (an
endpoint-independent, "full cone" NAT), the provider agent and its echo backend
in ``p`` behind ``natp`` (a port-restricted NAT: MASQUERADE only). Both agents
run with ``--p2p-listen 0.0.0.0:PORT`` and no ``--p2p-advertise``: the only
way through is the server-reflexive (srflx) candidate the relay observed, plus
the provider's warm-up punch that opens its port-restricted NAT.

* ``test_topology_behaves_like_the_two_nat_types``: plain UDP sockets prove the
  NATs are what they claim (needs no agent);
* a 50 MiB echo transfer is promoted to the direct path mid-transfer (the
  consumer's ``path`` is natp's public address) and completes with the relay
  frozen (SIGSTOP): the bytes no longer go through it; sha256 equal both ways;
* demotion: the direct path is cut between the NATs after promotion (right
  after it, and once 90% came back); the transfer completes through the relay,
  nothing lost;
* ``p2p_mode`` FORBIDDEN in the relay's policy: no promotion, the relay's splice
  carries every byte;
* a third agent with a valid certificate from the same CA, on the provider's
  LAN, dials the provider's listener with the promoted stream's id: refused,
  the transfer is unaffected.

Root only (skipped with a reason otherwise). Every namespace, veth, rule and
process is removed by the fixture's finalizer, also when a test fails
(``test_topology_teardown_survives_a_failing_body``).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from devpki import DevPki

from .harness import Agent, Cluster, Proc, Relay, contains, write_policy
from .nat_topology import (
    ECHO_SCRIPT,
    ROLES,
    TRANSFER_SCRIPT,
    UDP_PEER_SCRIPT,
    NatTopology,
    nat_topology,
    progress,
    start_agent,
    start_relay,
    start_script,
)

pytestmark = [pytest.mark.e2e]

MiB = 1 << 20
RELAY_PORT = 7443
CONSUMER_P2P = 40001
PROVIDER_P2P = 40002
ECHO_PORT = 9000
APP_PORT = 15000
"""The consumer agent's explicit listener for "echo", on 127.0.0.1 inside ``c``."""
CHUNK = 256 * 1024
PACE = 0.05
"""Seconds between 256 KiB writes: at most ~5 MiB/s, so 50 MiB takes >= 10 s and
the promotion (1 s delay + checks) lands early in the transfer."""


@contextlib.contextmanager
def _topology(cluster: Cluster) -> Iterator[NatTopology]:
    """The topology; the cluster's processes are stopped before it is removed."""
    with nat_topology(full_cone_ports=(CONSUMER_P2P,)) as t:
        try:
            yield t
        finally:
            for proc in cluster.procs:  # a frozen relay would only die by SIGKILL
                proc.send_signal(signal.SIGCONT)
            cluster.stop_all()


@pytest.fixture
def topo(cluster: Cluster) -> Iterator[NatTopology]:
    with _topology(cluster) as t:
        yield t


@pytest.fixture
def bare(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Cluster, NatTopology]]:
    """The topology and a process list, without the session PKI (the UDP test needs none)."""
    procs = Cluster(tmp_path / "procs", cast(DevPki, None))
    request.node.e2e_log_tail = procs.log_tail
    with _topology(procs) as t:
        yield procs, t


def _ip(addr: object) -> str:
    return str(addr).rpartition(":")[0]


# --------------------------------------------------------------------------- 1. the NATs


def _udp_peer(
    cluster: Cluster, topo: NatTopology, role: str, port: int, seconds: float, *targets: str
) -> Proc:
    # On pub, bind the "internet host" address: a wildcard socket would answer
    # from whichever interface address routing picks.
    bind = f"{topo.relay_ip}:{port}" if role == "pub" else str(port)
    proc = start_script(
        cluster, topo, role, f"udp-{role}-{port}", UDP_PEER_SCRIPT, bind, seconds, *targets
    )
    proc.wait_for("udp peer bound", timeout=10)
    return proc


def _received_from(proc: Proc, src: str) -> list[dict[str, Any]]:
    return proc.find("udp received", src=src)


@pytest.mark.timeout(90)
def test_topology_behaves_like_the_two_nat_types(bare: tuple[Cluster, NatTopology]) -> None:
    cluster, topo = bare
    outside = topo.relay_ip  # an "internet" host on pub

    # Consumer side, endpoint-independent. c maps its port by talking to X ...
    x = _udp_peer(cluster, topo, "pub", 5000, 10)
    c = _udp_peer(cluster, topo, "c", CONSUMER_P2P, 10, f"{outside}:5000")
    hello = x.wait_for("udp received", timeout=5)
    assert hello["src"] == f"{topo.natc_public}:{CONSUMER_P2P}", "MASQUERADE kept the port"
    c.wait_for("udp received", src=f"{outside}:5000", timeout=5)
    # ... then ANY outside source reaches that public port: another port of the
    # same host, and a host behind the other NAT that c never talked to.
    w = _udp_peer(cluster, topo, "pub", 5001, 3, f"{topo.natc_public}:{CONSUMER_P2P}")
    v = _udp_peer(cluster, topo, "p", 40003, 3, f"{topo.natc_public}:{CONSUMER_P2P}")
    c.wait_for("udp received", src=f"{outside}:5001", data="hello 0 from 5001", timeout=5)
    c.wait_for("udp received", src=f"{topo.natp_public}:40003", timeout=5)
    w.wait_for("udp received", src=f"{topo.natc_public}:{CONSUMER_P2P}", timeout=5)
    v.wait_for("udp received", src=f"{topo.natc_public}:{CONSUMER_P2P}", timeout=5)

    # Provider side, port-restricted. p talks to X2 = outside:6000 at once, and
    # to Y = outside:6001 only 3 s later. Y sends at 0.5 s (dropped: p has not
    # talked to Y yet) and at 5.5 s (passes). Z, behind the full-cone NAT, sends
    # at 0.5 s and 5.5 s and never gets through: p never talks to it.
    x2 = _udp_peer(cluster, topo, "pub", 6000, 10)
    p = _udp_peer(cluster, topo, "p", PROVIDER_P2P, 10, f"{outside}:6000", f"{outside}:6001@3")
    target = f"{topo.natp_public}:{PROVIDER_P2P}"
    y = _udp_peer(cluster, topo, "pub", 6001, 9, f"{target}@0.5", f"{target}@5.5")
    z = _udp_peer(cluster, topo, "c", 40004, 9, f"{target}@0.5", f"{target}@5.5")
    hello = x2.wait_for("udp received", timeout=5)
    assert hello["src"] == target, "MASQUERADE kept the port"
    p.wait_for("udp received", src=f"{outside}:6000", timeout=5)  # X2's reply passes
    y.wait_for("udp received", src=target, data="hello 1 from 40002", timeout=8)
    p.wait_for("udp received", src=f"{outside}:6001", data="hello 1 from 6001", timeout=8)
    for proc in (p, y, z):
        proc.wait_for("udp peer done", timeout=15)
    assert not p.find("udp received", data="hello 0 from 6001"), p.tail()
    assert not p.find("udp received", src=contains(":40004")), p.tail()
    assert not z.find("udp received"), z.tail()


@pytest.mark.timeout(60)
def test_topology_teardown_survives_a_failing_body() -> None:
    seen: NatTopology | None = None
    orphan: subprocess.Popen[bytes] | None = None
    with pytest.raises(RuntimeError, match="boom"), nat_topology((CONSUMER_P2P,)) as t:
        seen = t
        assert "MASQUERADE" in t.iptables_rules("natp", "nat")
        assert f"--to-destination {t.c_ip}:{CONSUMER_P2P}" in t.iptables_rules("natc", "nat")
        # A process nobody stops: the finalizer must kill it, or the namespace lingers.
        orphan = subprocess.Popen([*t.prefix("p"), "sleep", "60"])
        raise RuntimeError("boom")
    assert seen is not None and orphan is not None
    assert orphan.wait(timeout=5) != 0
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    assert not [role for role in ROLES if seen.ns(role) in listed], listed
    addrs = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    assert f"10.{seen.octet}." not in addrs


# --------------------------------------------------------------------------- 2. the agents


@dataclass
class Setup:
    relay: Relay
    provider: Agent
    consumer: Agent
    echo: Proc


def _start(cluster: Cluster, topo: NatTopology, *, policy: Path | None = None) -> Setup:
    """Relay on pub; echo backend + provider in p; consumer in c; both with --p2p-listen."""
    relay = start_relay(cluster, topo, RELAY_PORT, policy=policy)
    echo = start_script(cluster, topo, "p", "echo", ECHO_SCRIPT, ECHO_PORT)
    echo.wait_for("echo listening", timeout=10)
    provider = start_agent(
        cluster, topo, "p", cluster.pki.agent(0), relay,
        "--expose", f"echo=127.0.0.1:{ECHO_PORT}",
        "--p2p-listen", f"0.0.0.0:{PROVIDER_P2P}",
        name="provider",
    )  # fmt: skip
    provider.wait_for("service registered", name="echo", timeout=20)
    since = relay.count()
    consumer = start_agent(
        cluster, topo, "c", cluster.pki.agent(1), relay,
        "--consume", f"echo@127.0.0.1:{APP_PORT}",
        "--p2p-listen", f"0.0.0.0:{CONSUMER_P2P}",
        name="consumer",
    )  # fmt: skip
    assert consumer.ports.get("echo") == APP_PORT, consumer.tail(20)
    relay.wait_for("agent connected", uri=consumer.uri, since=since, timeout=20)
    time.sleep(Cluster.CONNECT_SETTLE)
    return Setup(relay, provider, consumer, echo)


def _transfer(cluster: Cluster, topo: NatTopology, size: int, pace: float = PACE) -> Proc:
    """The application, in c: ``size`` random bytes through the consumer's listener."""
    proc = start_script(
        cluster, topo, "c", "transfer", TRANSFER_SCRIPT, APP_PORT, size, CHUNK, pace
    )
    proc.wait_for("transfer started", timeout=20)
    return proc


def _check_exact(transfer: Proc, echo: Proc, size: int, timeout: float) -> dict[str, Any]:
    """sha256 equal both ways: what the backend got (c -> p) and what the app got back."""
    done = transfer.wait_for("transfer done", timeout=timeout)
    assert done["error"] is None, done
    assert done["how"] == "eof", done
    assert done["sent"] == size, done
    assert done["received"] == size, done
    assert done["received_sha256"] == done["sent_sha256"], "provider -> consumer bytes differ"
    backend = echo.wait_for("echo done", timeout=10)
    assert backend["received"] == size, backend
    assert backend["sha256"] == done["sent_sha256"], "consumer -> provider bytes differ"
    print(f"transfer: {done}")
    return done


@pytest.mark.timeout(120)
def test_promoted_through_both_nats_survives_a_frozen_relay(
    cluster: Cluster, topo: NatTopology
) -> None:
    size = 50 * MiB
    s = _start(cluster, topo)
    transfer = _transfer(cluster, topo, size)
    rec = s.consumer.wait_for("p2p: migrated to direct", timeout=20)
    assert rec["role"] == "initiator", rec
    # srflx traversal: the direct path goes to natp's public address (the
    # provider's mapping as the relay saw it), not to a private host candidate.
    assert _ip(rec["path"]) == topo.natp_public, rec
    answer = s.provider.wait_for("p2p: migrated to direct", id=rec["id"], timeout=10)
    assert answer["role"] == "responder", answer
    assert _ip(answer["path"]) == topo.natc_public, answer
    s.relay.wait_for("stream migrated to p2p", timeout=10)
    try:
        s.relay.send_signal(signal.SIGSTOP)
        frozen_at = progress(transfer)
        assert not transfer.find("transfer done"), "finished before the relay was frozen"
        done = _check_exact(transfer, s.echo, size, timeout=90)
    finally:
        s.relay.send_signal(signal.SIGCONT)
    print(f"relay frozen after {frozen_at} of {size} bytes came back; took {done['seconds']}s")
    assert frozen_at < size
    assert not s.consumer.find("session: stream resumed")
    assert not s.consumer.find("p2p: demoted to relay")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("when", ["early", "late"])
def test_cut_direct_path_between_the_nats_demotes_to_the_relay(
    cluster: Cluster, topo: NatTopology, when: str
) -> None:
    """``early``: right after the promotion; ``late``: once 90% came back over the
    direct path (long after the relay stopped carrying the stream)."""
    size = 50 * MiB
    s = _start(cluster, topo)
    transfer = _transfer(cluster, topo, size)
    rec = s.consumer.wait_for("p2p: migrated to direct", timeout=20)
    assert _ip(rec["path"]) == topo.natp_public, rec
    if when == "late":
        transfer.wait_for("progress", received=lambda n: int(n) >= size * 9 // 10, timeout=60)
    with topo.direct_path_cut():
        cut_at = progress(transfer)
        assert not transfer.find("transfer done"), "finished before the direct path was cut"
        _check_exact(transfer, s.echo, size, timeout=110)
        dropped = topo.dropped_between_nats()
    print(f"direct path cut after {cut_at} bytes; {dropped} packets dropped between the NATs")
    assert dropped > 0
    demoted = s.consumer.find("p2p: demoted to relay") + s.provider.find("p2p: demoted to relay")
    assert demoted, cluster.log_tail(30)
    resumed = s.consumer.find("session: stream resumed") + s.provider.find(
        "session: stream resumed"
    )
    assert resumed, cluster.log_tail(30)
    s.relay.wait_for("stream resumed", stream_id=rec["id"], timeout=5)


@pytest.mark.timeout(120)
def test_p2p_forbidden_by_policy_keeps_every_byte_on_the_relay(
    cluster: Cluster, topo: NatTopology, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path / "policy.json",
        [
            {
                "id": "echo-relay-only",
                "caller": "outrelay://*",
                "target": "echo",
                "decision": "allow",
                "p2p_mode": "forbidden",
            },
            {
                "id": "providers-answer",
                "caller": "*",
                "target": "outrelay://*",
                "decision": "allow",
            },
        ],
    )
    size = 24 * MiB  # >= 4.8 s at the pace: well past the 1 s promotion delay
    s = _start(cluster, topo, policy=policy)
    transfer = _transfer(cluster, topo, size)
    rec = s.consumer.wait_for("p2p: not promoting", timeout=20)
    assert "forbidden" in str(rec.get("reason", "")).lower(), rec
    _check_exact(transfer, s.echo, size, timeout=90)
    # The relay's splice carried every byte, both ways.
    spliced = s.relay.wait_for("splice ended", timeout=10)
    assert int(spliced["c_to_p"]) == size, spliced
    assert int(spliced["p_to_c"]) == size, spliced
    for agent in (s.consumer, s.provider):
        assert not agent.find("p2p: migrated to direct"), agent.tail(30)
    assert not s.relay.find("stream migrated to p2p")


INTRUDER_SCRIPT = r"""
import asyncio, contextlib, json, sys
from outrelay.orp import FrameType, StreamResume, encode_message
from outrelay.transport import QuicTlsConfig, TransportError, connect_quic

host, port, sid, crt, key, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7]

async def hijack():
    tls = QuicTlsConfig(crt, key, ca)
    try:
        conn = await asyncio.wait_for(connect_quic(host, port, tls), 10)
    except Exception as exc:
        return {"connected": False, "error": repr(exc), "got": 0}
    try:
        stream = await conn.open_stream()
        await stream.send_all(encode_message(
            FrameType.STREAM_RESUME,
            StreamResume(stream_id=sid, my_position=0, peer_ack_position=0),
        ))
        got, how = b"", "eof"
        try:
            async with asyncio.timeout(5):
                while chunk := await stream.receive_some():
                    got += chunk
        except TransportError as exc:
            how = "reset: %s" % (exc,)
        except TimeoutError:
            how = "timeout"
        return {"connected": True, "got": len(got), "how": how}
    finally:
        conn.close(0, "")

print(json.dumps({"msg": "intruder done", **asyncio.run(hijack())}), flush=True)
"""
"""argv: HOST PORT STREAM_ID CERT KEY CA. Dials HOST:PORT with that certificate
and sends STREAM_RESUME for STREAM_ID on a new stream; logs what came back."""


@pytest.mark.timeout(120)
def test_third_agent_on_the_provider_lan_cannot_take_over_a_promoted_stream(
    cluster: Cluster, topo: NatTopology
) -> None:
    size = 50 * MiB
    s = _start(cluster, topo)
    transfer = _transfer(cluster, topo, size)
    rec = s.consumer.wait_for("p2p: migrated to direct", timeout=20)
    sid = rec["id"]
    s.provider.wait_for("p2p: migrated to direct", id=sid, timeout=10)
    # A third agent of the same tenant with a valid certificate from the same CA,
    # on the provider's LAN (the NAT box), dials the provider's private address.
    ident = cluster.pki.issue_agent("intruder", out=cluster.workdir)
    intruder = start_script(
        cluster, topo, "natp", "intruder", INTRUDER_SCRIPT,
        topo.p_ip, PROVIDER_P2P, sid, ident.cert, ident.key, cluster.pki.ca_cert,
    )  # fmt: skip
    result = intruder.wait_for("intruder done", timeout=30)
    assert not transfer.find("transfer done"), "finished before the intruder dialled"
    assert result["got"] == 0, result  # no echo, no data: the stream is refused
    s.provider.wait_for("p2p: direct stream refused: not the stream's peer", timeout=5)
    _check_exact(transfer, s.echo, size, timeout=90)
    for agent in (s.consumer, s.provider):
        assert not agent.find("p2p: demoted to relay"), agent.tail(30)
        assert len(agent.find("p2p: migrated to direct")) == 1, agent.tail(30)
