"""Issue 5, end to end: transparent capture in a network namespace made by the test.

Topology (root only; skipped with a reason otherwise)::

    host                                   |  namespace NS (made here)
    backend 127.0.0.1:B  <-tcp- provider --+
    relay   10.200.N.1:R (UDP, QUIC)  <----+---- consumer agent --intercept tproxy
           veth orttpXXXXXh 10.200.N.1/30 --+--  veth orttpXXXXXn 10.200.N.2/30
                                           |   lo: DNS 127.0.0.1:53, tproxy 127.0.0.1:15001
                                           |   iptables -t nat OUTPUT 100.64.0.0/10 REDIRECT 15001
                                           |   route 100.64.0.0/10 dev lo src 127.0.0.1
                                           |   /etc/netns/NS/resolv.conf: nameserver 127.0.0.1

The relay's certificate names ``localhost`` (and 127.0.0.1, ::1), and agents
check it against ``--server-name`` (default ``localhost``), so dialling
10.200.N.1 works unchanged. The route for 100.64.0.0/10 goes to ``lo``: a VIP is
routable inside the namespace (a pod has a default route for this) while no
packet for it can leave. All traffic stays on 127.0.0.1 or the test's veth.

The namespace, its veth, the iptables rule (it lives in the namespace) and
/etc/netns/NS are removed by the fixture's finalizer, also when a test fails;
``test_namespace_teardown_survives_a_failing_body`` proves it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from devpki import DevPki

from .harness import HttpBackend, Proc, agent_argv, free_udp_port, relay_argv
from .netns import CMD_TIMEOUT, LinkedNamespace, Network, free_block, network, run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

WAIT = 20.0
"""Deadline for a log line (start-up, registration)."""
TPROXY_PORT = 15001
BODY = b"".join(b"tproxy e2e line %05d\n" % i for i in range(2000))  # ~44 KiB


def _build(net: Network) -> LinkedNamespace:
    """The namespace, its veth, the REDIRECT rule, the VIP route and resolv.conf."""
    third = free_block("10.200.{}.", range(256))
    ns = net.linked_namespace(ipaddress.IPv4Network(f"10.200.{third}.0/30"))
    ns.ip("route", "add", "100.64.0.0/10", "dev", "lo", "src", "127.0.0.1")
    ns.iptables(
        "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "100.64.0.0/10",
        "-j", "REDIRECT", "--to-port", str(TPROXY_PORT),
    )  # fmt: skip
    # `ip netns exec` bind-mounts this over /etc/resolv.conf for commands it runs.
    net.resolv_conf(ns, "nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    return ns


@contextlib.contextmanager
def network_namespace() -> Iterator[LinkedNamespace]:
    """A fresh namespace + veth + REDIRECT rule + resolv.conf, always removed."""
    with network("tp", _build, tools=("ip", "iptables", "dig", "curl")) as ns:
        yield ns


# --------------------------------------------------------------------------- processes


@dataclass
class Env:
    ns: LinkedNamespace
    relay: Proc
    provider: Proc
    consumer: Proc
    backend: HttpBackend
    procs: list[Proc]

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for proc in self.procs:
            state = "running" if proc.running else f"exited {proc.returncode}"
            parts.append(f"----- {proc.name} ({state}) {proc.log_path} -----\n{proc.tail(lines)}")
        return "\n".join(parts)


def _stop(procs: list[Proc]) -> None:
    for proc in reversed(procs):  # consumer, provider, relay
        with contextlib.suppress(Exception):
            proc.stop()


@pytest.fixture(scope="module")
def env(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    logs = tmp_path_factory.mktemp("tproxy-e2e")
    procs: list[Proc] = []
    backend = HttpBackend(BODY)
    try:
        with network_namespace() as ns:
            try:
                relay_addr = f"{ns.host_ip}:{free_udp_port(ns.host_ip)}"
                relay = Proc("relay", relay_argv(pki, relay_addr), logs / "relay.log")
                procs.append(relay)
                relay.wait_for("relay listening", addr=relay_addr, timeout=WAIT)

                provider = Proc(
                    "provider",
                    agent_argv(
                        pki, pki.agent(0), relay_addr, "--expose", f"svc-web={backend.addr}"
                    ),
                    logs / "provider.log",
                )
                procs.append(provider)
                provider.wait_for("service registered", name="svc-web", timeout=WAIT)

                consumer = Proc(
                    "consumer",
                    [
                        "ip", "netns", "exec", ns.name,
                        *agent_argv(
                            pki, pki.agent(1), relay_addr,
                            "--intercept", "tproxy",
                            "--consume", "svc-web",
                            "--tproxy-listen", f"127.0.0.1:{TPROXY_PORT}",
                            "--dns-listen", "127.0.0.1:53",
                        ),
                    ],
                    logs / "consumer.log",
                )  # fmt: skip
                procs.append(consumer)
                consumer.wait_for("vip allocated", svc="svc-web", vip="100.64.0.1", timeout=WAIT)
                consumer.wait_for("intercept: tproxy listener bound", timeout=WAIT)
                consumer.wait_for(
                    "intercept: dns server running", addr="127.0.0.1:53", timeout=WAIT
                )
                relay.wait_for("agent connected", uri=pki.agent(1).uri, timeout=WAIT)
                yield Env(ns, relay, provider, consumer, backend, procs)
            finally:
                _stop(procs)
    finally:
        backend.close()


@pytest.fixture(autouse=True)
def _attach_logs(request: pytest.FixtureRequest) -> None:
    if "env" in request.fixturenames:
        e: Env = request.getfixturevalue("env")
        request.node.e2e_log_tail = e.log_tail


# --------------------------------------------------------------------------- helpers


def dig(e: Env, *args: str) -> tuple[str, list[str]]:
    """(status, answer lines) of ``dig @127.0.0.1 ARGS`` run inside the namespace."""
    out = e.ns.exec(
        "dig", "@127.0.0.1", *args, "+time=2", "+tries=2", "+noall", "+comments", "+answer"
    ).stdout
    match = re.search(r"status: (\w+)", out)
    assert match, f"no status in dig output:\n{out}"
    answers = [line for line in out.splitlines() if line and not line.startswith(";")]
    return match.group(1), answers


def curl(e: Env, url: str) -> bytes:
    proc = subprocess.run(
        ["ip", "netns", "exec", e.ns.name, "curl", "-sS", "--noproxy", "*",
         "--connect-timeout", "10", "--max-time", "30", url],
        capture_output=True,
        timeout=CMD_TIMEOUT + 20,
        check=False,
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    )  # fmt: skip
    assert proc.returncode == 0, f"curl {url} failed ({proc.returncode}): {proc.stderr!r}"
    return proc.stdout


PROBE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.settimeout(10)
try:
    data = s.recv(65536)
    print("eof" if data == b"" else "data:%d" % len(data))
except ConnectionResetError:
    print("reset")
except TimeoutError:
    print("timeout")
"""


def probe(e: Env, host: str, port: int) -> str:
    """Connect from inside the namespace and report how the server ended it."""
    return e.ns.exec(sys.executable, "-c", PROBE, host, str(port)).stdout.strip()


# --------------------------------------------------------------------------- tests


def test_dig_resolves_the_service_to_a_vip(env: Env) -> None:
    out = env.ns.exec("dig", "@127.0.0.1", "svc-web.outrelay", "+short", "+time=2", "+tries=2")
    address = out.stdout.strip()
    assert re.fullmatch(r"100\.(6[4-9]|[7-9]\d|1[01]\d|12[0-7])\.\d+\.\d+", address), out.stdout
    assert address == "100.64.0.1"
    status, answers = dig(env, "SVC-WEB.OutRelay")
    assert status == "NOERROR" and len(answers) == 1 and "\t60\tIN\tA\t100.64.0.1" in answers[0]


def test_dns_answers_for_aaaa_unknown_and_outside_names(env: Env) -> None:
    assert dig(env, "svc-web.outrelay", "AAAA") == ("NOERROR", [])  # NODATA, not NXDOMAIN
    assert dig(env, "svc-nope.outrelay") == ("NXDOMAIN", [])
    # resolv.conf in the namespace lists only the agent: nothing to forward to
    assert dig(env, "example.com") == ("REFUSED", [])


def test_curl_by_name_reaches_the_provider_backend(env: Env) -> None:
    since = env.consumer.count()
    requests = env.backend.requests
    assert curl(env, "http://svc-web.outrelay:8080/") == BODY
    assert env.backend.requests == requests + 1
    accepted = env.consumer.wait_for(
        "intercept: new conn accepted", since=since, svc="svc-web", timeout=5
    )
    assert accepted["orig_dst"] == "100.64.0.1:8080"
    # the name was resolved by the agent's DNS server, through the namespace's resolv.conf
    env.consumer.wait_for("intercept: dns answer", since=since, name="svc-web.outrelay.", timeout=5)


def test_any_port_on_the_vip_reaches_the_same_service(env: Env) -> None:
    since = env.consumer.count()
    assert curl(env, "http://svc-web.outrelay:443/") == BODY
    assert curl(env, "http://100.64.0.1:1/") == BODY
    dsts = {r["orig_dst"] for r in env.consumer.find("intercept: new conn accepted", since=since)}
    assert dsts == {"100.64.0.1:443", "100.64.0.1:1"}


def test_unallocated_vip_is_closed_cleanly_and_logged(env: Env) -> None:
    since = env.consumer.count()
    assert probe(env, "100.64.99.99", 80) == "eof"
    miss = env.consumer.wait_for("intercept: VIP lookup miss", since=since, timeout=5)
    assert miss["dst"] == "100.64.99.99:80"
    assert str(miss["peer"]).startswith("127.0.0.1:")
    # and the agent keeps intercepting
    assert env.consumer.running
    assert curl(env, "http://svc-web.outrelay:8080/") == BODY


def test_namespace_teardown_survives_a_failing_body() -> None:
    seen: LinkedNamespace | None = None
    with pytest.raises(RuntimeError, match="boom"), network_namespace() as ns:
        seen = ns
        assert ns.exists()
        assert (ns.etc_dir / "resolv.conf").is_file()
        raise RuntimeError("boom")
    assert seen is not None
    assert not seen.exists()
    assert not seen.etc_dir.exists()
    deadline = time.monotonic() + 5
    while run("ip", "link", "show", seen.host_if, check=False).returncode == 0:
        assert time.monotonic() < deadline, f"veth {seen.host_if} still exists"
        time.sleep(0.1)
    assert seen.host_ip not in run("ip", "-4", "-o", "addr", "show", check=False).stdout
