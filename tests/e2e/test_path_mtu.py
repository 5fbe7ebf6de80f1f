"""Large datagrams where the path allows them, and a path that silently drops them.

Topology (root only; skipped with the reason otherwise)::

    host                                          |  namespace NS (made here)
    http backend 127.0.0.1 <- provider agent      |
    relay 10.202.N.1:P  <-------------------------+---- consumer agent <- curl
          veth ortpmXXXXXh 10.202.N.1/30 MTU 9000 +---- veth ortpmXXXXXn 10.202.N.2/30 MTU 9000
                                                  |     iptables: UDP of 1,500+ bytes coming
                                                  |     in on the veth DROPped (no ICMP back)

The route between relay and consumer says 9,000 bytes, so after the handshake
the relay sends the consumer 8,972-byte datagrams; the namespace drops every one
of them without a word, as a router with a smaller MTU and filtered ICMP would.
The relay must notice (large packets lost, none acknowledged), go back to 1,350
bytes and deliver the download whole. Without that, the download would stall
forever: small packets (PINGs, ACKs) still pass, so the connection looks alive.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections.abc import Iterator

import pytest

from .harness import Agent, Backends, Cluster, agent_argv, contains
from .netns import CMD_TIMEOUT, LinkedNamespace, Network, free_block, network, run

pytestmark = [pytest.mark.e2e]

JUMBO_MTU = 9000
WAIT = 20.0
BODY = b"".join(b"path mtu e2e line %07d\n" % i for i in range(262144))  # 6 MiB


def _build(net: Network) -> LinkedNamespace:
    third = free_block("10.202.{}.", range(256))
    ns = net.linked_namespace(ipaddress.IPv4Network(f"10.202.{third}.0/30"))
    run("ip", "link", "set", ns.host_if, "mtu", str(JUMBO_MTU))
    ns.ip("link", "set", ns.ns_if, "mtu", str(JUMBO_MTU))
    ns.iptables(
        "-A", "INPUT", "-i", ns.ns_if, "-p", "udp",
        "-m", "length", "--length", "1500:65535", "-j", "DROP",
    )  # fmt: skip
    return ns


@pytest.fixture
def black_hole_ns(cluster: Cluster) -> Iterator[LinkedNamespace]:
    with network("pm", _build, tools=("ip", "iptables", "curl")) as ns:
        try:
            yield ns
        finally:
            cluster.stop_all()


def _large_drops(ns: LinkedNamespace) -> int:
    """Packets the namespace's length rule dropped so far."""
    out = ns.exec("iptables", "-L", "INPUT", "-v", "-n", "-x").stdout
    return sum(
        int(cols[0])
        for cols in (line.split() for line in out.splitlines())
        if len(cols) >= 3 and cols[2] == "DROP"
    )


@pytest.mark.timeout(120)
def test_a_path_that_drops_large_datagrams_falls_back_and_loses_nothing(
    cluster: Cluster, backends: Backends, black_hole_ns: LinkedNamespace
) -> None:
    ns = black_hole_ns
    pki = cluster.pki
    web = backends.http(BODY)
    relay = cluster.start_relay(host=ns.host_ip)
    cluster.start_agent(pki.agent(0), relay, expose={"web": web.addr})
    consumer = Agent(
        "consumer",
        [
            "ip", "netns", "exec", ns.name,
            *agent_argv(pki, pki.agent(1), relay.addr, "--consume", "web@127.0.0.1:0"),
        ],
        cluster.workdir / "consumer.log",
        pki.agent(1),
        pki.agent(1).uri,
    )  # fmt: skip
    cluster.procs.append(consumer)
    consumer.wait_for("agent started", timeout=WAIT)
    relay.wait_for("agent connected", uri=pki.agent(1).uri, remote=contains(ns.ns_ip), timeout=WAIT)
    consumer.read_bound_ports()

    started = time.monotonic()
    curl = ns.exec(
        "curl", "-sS", "--noproxy", "*", "--connect-timeout", "10", "--max-time", "60",
        "-o", "-", f"http://127.0.0.1:{consumer.port('web')}/",
        timeout=CMD_TIMEOUT + 60,
    )  # fmt: skip
    took = time.monotonic() - started
    got = curl.stdout.encode()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(BODY).hexdigest(), (
        len(got),
        relay.tail(20),
    )
    # The path really dropped large datagrams, and the relay said what it did.
    assert _large_drops(ns) > 0
    line = relay.wait_for("QUIC path drops large datagrams; back to the start size", timeout=5)
    assert line["peer"] == ns.ns_ip and line["size"] > 1350 and line["to"] == 1350
    print(f"6 MiB through the black hole in {took:.1f}s, {_large_drops(ns)} large drops")
