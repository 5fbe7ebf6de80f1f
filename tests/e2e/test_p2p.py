"""P2P promotion on 127.0.0.1 (issue 7, partial: no NAT namespaces yet).

Both agents run with ``--p2p-listen`` (experimental, off by default). An echo
transfer starts through the relay, is promoted to a direct QUIC connection
between the agents, and completes with the relay frozen (SIGSTOP): the bytes
no longer go through it. sha256 over everything proves nothing was lost or
duplicated across the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from outrelay.orp import FrameType, StreamResume, encode_message
from outrelay.transport import TransportError, connect_quic

from .harness import (
    Agent,
    Backends,
    Cluster,
    Relay,
    Transfer,
    cli_agent_argv,
    free_udp_port,
    run_cli,
    write_policy,
)

pytestmark = [pytest.mark.e2e]

MiB = 1 << 20


def _p2p_args() -> list[str]:
    port = free_udp_port()
    return ["--p2p-listen", f"127.0.0.1:{port}", "--p2p-advertise", f"127.0.0.1:{port}"]


@dataclass
class P2PPair:
    relay: Relay
    provider: Agent
    consumer: Agent
    provider_port: int
    """The provider's shared UDP port (its relay connection and direct listener)."""
    consumer_port: int


def _p2p_pair(
    cluster: Cluster,
    backends: Backends,
    *,
    policy: Path | None = None,
    provider_extra: Sequence[str] = (),
    consumer_extra: Sequence[str] = (),
) -> P2PPair:
    """A relay, and a provider (echo backend) and consumer, both with ``--p2p-listen``."""
    relay = cluster.start_relay(policy=policy)
    echo = backends.echo()
    provider_args, consumer_args = _p2p_args(), _p2p_args()
    provider = cluster.start_agent(
        cluster.pki.agent(0),
        relay,
        expose={"echo": echo.addr},
        args=[*provider_args, *provider_extra],
    )
    consumer = cluster.start_agent(
        cluster.pki.agent(1), relay, consume=["echo"], args=[*consumer_args, *consumer_extra]
    )
    ports = [int(args[1].rpartition(":")[2]) for args in (provider_args, consumer_args)]
    return P2PPair(relay, provider, consumer, ports[0], ports[1])


@pytest.mark.timeout(180)
def test_promoted_stream_survives_a_frozen_relay(cluster: Cluster, backends: Backends) -> None:
    pair = _p2p_pair(cluster, backends)
    relay, provider, consumer = pair.relay, pair.provider, pair.consumer
    transfer = Transfer(consumer.port("echo"), 24 * MiB, pace=0.02)
    try:
        rec = consumer.wait_for("p2p: migrated to direct", timeout=15)
        provider.wait_for("p2p: migrated to direct", timeout=5)
        assert rec["role"] == "initiator"
        relay.wait_for("stream migrated to p2p", timeout=5)
        relay.send_signal(signal.SIGSTOP)
        transfer.wait(120)
    finally:
        relay.send_signal(signal.SIGCONT)
    transfer.check_exact()
    assert not consumer.find("session: stream resumed")
    # Checkpoints travel on the direct connection once the relay forgot the pair,
    # so rings drain and no writer waits out ACK_WAIT for an acknowledgement.
    assert not consumer.find("peer stopped acknowledging; evicting")
    assert not provider.find("peer stopped acknowledging; evicting")
    print(f"longest stall seen by the application: {transfer.longest_gap:.2f}s")


@pytest.mark.timeout(60)
def test_without_flag_nothing_is_promoted(cluster: Cluster, backends: Backends) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    cluster.start_agent(cluster.pki.agent(0), relay, expose={"echo": echo.addr})
    consumer = cluster.start_agent(cluster.pki.agent(1), relay, consume=["echo"])
    transfer = Transfer(consumer.port("echo"), 2 * MiB, pace=0.05)
    transfer.wait(60)
    transfer.check_exact()
    time.sleep(0.2)
    assert not consumer.find("p2p: migrated to direct")
    assert not relay.find("stream migrated to p2p")


@contextlib.contextmanager
def _drop_udp_between(port_a: int, port_b: int) -> Iterator[None]:
    """Cut the direct path: drop UDP between the two agents' shared sockets on lo.

    Each socket also carries its agent's relay connection, which stays up.
    """
    if shutil.which("iptables") is None or os.geteuid() != 0:
        pytest.skip("iptables (as root) is needed to cut the direct path")
    rules = [
        ["INPUT", "-i", "lo", "-p", "udp", "--sport", str(a), "--dport", str(b), "-j", "DROP"]
        for a, b in ((port_a, port_b), (port_b, port_a))
    ]
    added = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-I", *rule], check=True, timeout=10)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-D", *rule], check=False, timeout=10)


@pytest.mark.timeout(180)
def test_cut_direct_path_demotes_to_the_relay(cluster: Cluster, backends: Backends) -> None:
    pair = _p2p_pair(cluster, backends)
    provider, consumer = pair.provider, pair.consumer
    p2p_port, consumer_port = pair.provider_port, pair.consumer_port
    transfer = Transfer(consumer.port("echo"), 16 * MiB, pace=0.05)
    consumer.wait_for("p2p: migrated to direct", timeout=15)
    with _drop_udp_between(p2p_port, consumer_port):
        transfer.wait(120)
    transfer.check_exact()
    # Both sides noticed the dead direct path and resumed through the relay.
    consumer.wait_for("session: stream resumed", timeout=5)
    provider.wait_for("session: stream resumed", timeout=5)
    consumer.wait_for("p2p: demoted to relay", timeout=5)


@pytest.mark.timeout(120)
def test_third_agent_cannot_take_over_a_promoted_stream(
    cluster: Cluster, backends: Backends
) -> None:
    pair = _p2p_pair(cluster, backends)
    provider, consumer, p2p_port = pair.provider, pair.consumer, pair.provider_port
    transfer = Transfer(consumer.port("echo"), 8 * MiB, pace=0.05)
    sid = consumer.wait_for("p2p: migrated to direct", timeout=15)["id"]
    # A third agent of the same tenant, with a perfectly valid certificate from the same CA.
    tls = cluster.pki.tls(cluster.pki.issue_agent("intruder", out=cluster.workdir))

    async def hijack() -> bytes:
        conn = await connect_quic("127.0.0.1", p2p_port, tls)
        try:
            stream = await conn.open_stream()
            await stream.send_all(
                encode_message(
                    FrameType.STREAM_RESUME,
                    StreamResume(stream_id=sid, my_position=0, peer_ack_position=0),
                )
            )
            got = b""
            with contextlib.suppress(TransportError):
                async with asyncio.timeout(5):
                    while chunk := await stream.receive_some():
                        got += chunk
            return got
        finally:
            conn.close(0, "")

    assert asyncio.run(hijack()) == b""  # no echo, no data: the stream is refused
    provider.wait_for("p2p: direct stream refused: not the stream's peer", timeout=5)
    transfer.wait(60)
    transfer.check_exact()


def _policy(tmp_path: Path, p2p_mode: str) -> Path:
    return write_policy(
        tmp_path / f"policy-{p2p_mode}.json",
        [
            {
                "id": f"p2p-{p2p_mode}",
                "caller": "outrelay://acme/*",
                "target": "*",
                "decision": "allow",
                "p2p_mode": p2p_mode,
            },
            {"id": "callee", "caller": "*", "target": "outrelay://acme/*", "decision": "allow"},
        ],
    )


@pytest.mark.timeout(120)
def test_p2p_mode_forbidden_keeps_every_byte_on_the_relay(
    cluster: Cluster, backends: Backends, tmp_path: Path
) -> None:
    pair = _p2p_pair(cluster, backends, policy=_policy(tmp_path, "forbidden"))
    relay, provider, consumer = pair.relay, pair.provider, pair.consumer
    transfer = Transfer(consumer.port("echo"), 8 * MiB, pace=0.1)
    rec = consumer.wait_for("p2p: not promoting", timeout=15)
    assert "forbidden" in rec["reason"]
    transfer.wait(60)
    transfer.check_exact()
    for agent in (consumer, provider):
        assert not agent.find("p2p: migrated to direct")
    assert not relay.find("stream migrated to p2p")


@pytest.mark.timeout(120)
def test_p2p_mode_required_promotes_before_the_relay_gives_up(
    cluster: Cluster, backends: Backends, tmp_path: Path
) -> None:
    pair = _p2p_pair(cluster, backends, policy=_policy(tmp_path, "required"))
    relay, consumer = pair.relay, pair.consumer
    # Longer than the relay's 10 s REQUIRED window (spec 02 §7.5).
    transfer = Transfer(consumer.port("echo"), 12 * MiB, pace=0.25)
    rec = consumer.wait_for("p2p: migrated to direct", timeout=10)
    assert int(rec["took_ms"]) < 5000
    transfer.wait(90)
    transfer.check_exact()
    assert not relay.find("required p2p promotion timeout — closing splice")


@pytest.mark.timeout(120)
def test_forbidden_is_enforced_by_our_relay_for_an_agent_that_ignores_it(
    cluster: Cluster, backends: Backends, tmp_path: Path
) -> None:
    """A consumer that does not know p2p modes (the reference's wire) still stays on the relay."""
    pair = _p2p_pair(
        cluster,
        backends,
        policy=_policy(tmp_path, "forbidden"),
        consumer_extra=["--p2p-reference-wire"],
    )
    relay, consumer = pair.relay, pair.consumer
    transfer = Transfer(consumer.port("echo"), 8 * MiB, pace=0.1)
    relay.wait_for("p2p offer refused (p2p_mode forbidden)", timeout=15)
    rec = consumer.wait_for("p2p: stayed on relay", timeout=10)
    assert "no candidates" in rec["reason"]
    transfer.wait(60)
    transfer.check_exact()
    assert not consumer.find("p2p: migrated to direct")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("reference_side", ["provider", "consumer"])
def test_reference_wire_peer_gets_the_asymmetric_swap(
    cluster: Cluster, backends: Backends, reference_side: str
) -> None:
    """Against a peer without the capability the swap is the reference's, and still exact."""
    flag = ["--p2p-reference-wire"]
    pair = _p2p_pair(
        cluster,
        backends,
        provider_extra=flag if reference_side == "provider" else (),
        consumer_extra=flag if reference_side == "consumer" else (),
    )
    relay, provider, consumer = pair.relay, pair.provider, pair.consumer
    transfer = Transfer(consumer.port("echo"), 16 * MiB, pace=0.05)
    try:
        rec = consumer.wait_for("p2p: migrated to direct", timeout=15)
        assert rec["swap"] == "reference"
        assert provider.wait_for("p2p: migrated to direct", timeout=5)["swap"] == "reference"
        relay.send_signal(signal.SIGSTOP)  # the rest goes direct
        transfer.wait(90)
    finally:
        relay.send_signal(signal.SIGCONT)
    transfer.check_exact()


@pytest.mark.timeout(60)
def test_bad_p2p_flags_are_refused_before_the_network(cluster: Cluster) -> None:
    """Usage errors exit 2 with the reason; an address that cannot be bound exits 1."""
    pki = cluster.pki
    lone = run_cli(cli_agent_argv(pki, "--p2p-reference-wire"))
    assert lone.returncode == 2, lone.stderr
    assert "need --p2p-listen" in lone.stderr
    nonsense = run_cli(cli_agent_argv(pki, "--p2p-listen", "nonsense"))
    assert nonsense.returncode == 2, nonsense.stderr
    assert "--p2p-listen" in nonsense.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        busy = run_cli(
            cli_agent_argv(
                pki, "--consume", "echo@127.0.0.1:0", "--p2p-listen", f"127.0.0.1:{port}"
            )
        )
    assert busy.returncode == 1, busy.stderr
    assert "cannot listen for --p2p-listen" in busy.stderr
    assert "Traceback" not in busy.stderr + lone.stderr + nonsense.stderr
