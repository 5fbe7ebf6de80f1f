"""Two NATs and an "internet", made of Linux network namespaces, for the P2P tests.

Topology (``N`` is a free second octet in 10.210-249; names carry pid + random)::

                     namespace "pub" (the internet, ip_forward=1)
                     relay 10.N.0.1 (on lo), routes 10.N.1/24 and 10.N.2/24
                      wan-c 10.N.1.1/24            wan-p 10.N.2.1/24
                          |                              |
      natc: wan 10.N.1.2/24 (public)        natp: wan 10.N.2.2/24 (public)
            endpoint-independent NAT              port-restricted NAT
            lan 10.N.11.1/24                      lan 10.N.12.1/24
                          |                              |
      c:    lan 10.N.11.2/24, default via .1    p:  lan 10.N.12.2/24, default via .1
            consumer agent, app (transfer)          provider agent, echo backend (127.0.0.1)

No namespace is linked to the host's: every process that takes part runs in one
of them (``ip netns exec``), so fixed ports are safe. ``pub`` has no route to
the private /24s, so a private (host) candidate is unreachable from the other
side, as behind real NATs.

NAT rules (iptables, in the NAT namespaces):

* both: ``nat POSTROUTING -o wan -j MASQUERADE``. Linux keeps the source port
  when it is free, so one inner socket gets one public ip:port whatever the
  destination (endpoint-independent *mapping*);
* both: ``filter INPUT -i wan -p udp -j DROP``: unsolicited UDP to the router
  itself is dropped silently (no ICMP port unreachable), as a NAT box does;
* natc only, for each port in ``full_cone_ports``: ``nat PREROUTING -i wan -p
  udp --dport P -j DNAT --to-destination 10.N.11.2:P``: anything reaching the
  public port P from ANY source goes to the consumer (endpoint-independent
  *filtering*, "full cone"). Plain iptables cannot make this conditional on the
  mapping existing (no nft/ipset here), so the port is open from the start: a
  superset of endpoint-independent filtering;
* natp: nothing else, so inbound passes only as a reply to what ``p`` sent
  first, per conntrack: to exactly that outside ip:port (port-restricted).

:func:`nat_topology` builds it and always removes it (processes in the
namespaces killed, namespaces deleted, which deletes veths and rules).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devpki import Identity

from .harness import Agent, Cluster, Proc, Relay, agent_argv, relay_argv
from .netns import CMD_TIMEOUT, Namespace, Network, free_block, network

__all__ = [
    "ECHO_SCRIPT",
    "ROLES",
    "TRANSFER_SCRIPT",
    "UDP_PEER_SCRIPT",
    "NatTopology",
    "nat_topology",
    "progress",
    "start_agent",
    "start_proc",
    "start_relay",
    "start_script",
]

WAIT = 20.0
"""Deadline for a start-up log line."""
ROLES = ("pub", "natc", "natp", "c", "p")


@dataclass
class NatTopology:
    net: Network
    octet: int
    full_cone_ports: tuple[int, ...]
    cut_rules: list[list[str]] = field(default_factory=list)

    # -- names and addresses ------------------------------------------------------------

    def ns(self, role: str) -> str:
        assert role in ROLES, role
        return self.net.name(role)

    def space(self, role: str) -> Namespace:
        return Namespace(self.ns(role))

    def _ip(self, third: int, fourth: int) -> str:
        return f"10.{self.octet}.{third}.{fourth}"

    @property
    def relay_ip(self) -> str:
        return self._ip(0, 1)

    @property
    def natc_public(self) -> str:
        return self._ip(1, 2)

    @property
    def natp_public(self) -> str:
        return self._ip(2, 2)

    @property
    def natc_lan(self) -> str:
        return self._ip(11, 1)

    @property
    def natp_lan(self) -> str:
        return self._ip(12, 1)

    @property
    def c_ip(self) -> str:
        return self._ip(11, 2)

    @property
    def p_ip(self) -> str:
        return self._ip(12, 2)

    # -- commands -----------------------------------------------------------------------

    def prefix(self, role: str) -> list[str]:
        """argv prefix that runs a command inside the namespace of ``role``."""
        return self.space(role).prefix()

    def exec(
        self, role: str, *argv: str, check: bool = True, timeout: float = CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return self.space(role).exec(*argv, check=check, timeout=timeout)

    def iptables(self, role: str, *rule: str) -> None:
        self.space(role).iptables(*rule)

    def iptables_rules(self, role: str, table: str = "filter") -> str:
        return self.space(role).iptables_rules(table)

    # -- set-up ---------------------------------------------------------------------------

    def setup(self) -> None:
        net = self.net
        spaces = {role: net.namespace(role) for role in ROLES}
        pub, natc, natp, c, p = (spaces[role] for role in ROLES)
        o = self.octet
        net.veth(pub, "wan-c", natc, "wan")
        net.veth(pub, "wan-p", natp, "wan")
        net.veth(natc, "lan", c, "lan")
        net.veth(natp, "lan", p, "lan")
        net.addr(pub, "lo", f"{self.relay_ip}/32")
        net.addr(pub, "wan-c", f"10.{o}.1.1/24")
        net.addr(pub, "wan-p", f"10.{o}.2.1/24")
        net.addr(natc, "wan", f"{self.natc_public}/24")
        net.addr(natc, "lan", f"{self.natc_lan}/24")
        net.addr(natp, "wan", f"{self.natp_public}/24")
        net.addr(natp, "lan", f"{self.natp_lan}/24")
        net.addr(c, "lan", f"{self.c_ip}/24")
        net.addr(p, "lan", f"{self.p_ip}/24")
        net.route(natc, "default", "via", f"10.{o}.1.1")
        net.route(natp, "default", "via", f"10.{o}.2.1")
        net.route(c, "default", "via", self.natc_lan)
        net.route(p, "default", "via", self.natp_lan)
        for role in ("pub", "natc", "natp"):
            self.exec(role, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for role in ("natc", "natp"):
            self.iptables(role, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
            self.iptables(role, "-A", "INPUT", "-i", "wan", "-p", "udp", "-j", "DROP")
        for port in self.full_cone_ports:
            self.iptables(
                "natc", "-t", "nat", "-A", "PREROUTING", "-i", "wan", "-p", "udp",
                "--dport", str(port), "-j", "DNAT", "--to-destination", f"{self.c_ip}:{port}",
            )  # fmt: skip

    # -- the direct path --------------------------------------------------------------------

    @contextlib.contextmanager
    def direct_path_cut(self) -> Iterator[None]:
        """DROP forwarded traffic between the two NATs' public addresses, in ``pub``.

        The relay lives on ``pub`` itself (INPUT/OUTPUT), so relay traffic is untouched.
        """
        rules = [
            ["FORWARD", "-s", self.natc_public, "-d", self.natp_public, "-j", "DROP"],
            ["FORWARD", "-s", self.natp_public, "-d", self.natc_public, "-j", "DROP"],
        ]
        try:
            for rule in rules:
                self.iptables("pub", "-I", *rule)
                self.cut_rules.append(rule)
            yield
        finally:
            while self.cut_rules:
                rule = self.cut_rules.pop()
                with contextlib.suppress(Exception):
                    self.exec("pub", "iptables", "-w", "5", "-D", *rule, check=False)

    def dropped_between_nats(self) -> int:
        """Packets the :meth:`direct_path_cut` rules dropped so far."""
        out = self.exec("pub", "iptables", "-w", "5", "-L", "FORWARD", "-v", "-n", "-x").stdout
        total = 0
        for line in out.splitlines():
            cols = line.split()
            if len(cols) >= 3 and cols[2] == "DROP":
                total += int(cols[0])
        return total


@contextlib.contextmanager
def nat_topology(full_cone_ports: Sequence[int] = ()) -> Iterator[NatTopology]:
    """Build the topology; skip (with the reason) where it cannot be built; always remove it."""

    def build(net: Network) -> NatTopology:
        octet = free_block("10.{}.", range(210, 250))
        topo = NatTopology(net, octet, tuple(full_cone_ports))
        topo.setup()
        return topo

    with network("nat", build) as topo:
        yield topo


# --------------------------------------------------------------------------- processes


def _log_path(cluster: Cluster, name: str) -> tuple[str, Path]:
    unique, n = name, 1
    while (cluster.workdir / f"{unique}.log").exists():
        unique = f"{name}-{n}"
        n += 1
    return unique, cluster.workdir / f"{unique}.log"


def start_proc(cluster: Cluster, topo: NatTopology, role: str, name: str, argv: list[str]) -> Proc:
    """Any process inside ``role``'s namespace; stopped with the cluster."""
    unique, path = _log_path(cluster, name)
    proc = Proc(unique, [*topo.prefix(role), *argv], path)
    cluster.procs.append(proc)
    return proc


def start_script(
    cluster: Cluster, topo: NatTopology, role: str, name: str, script: str, *args: object
) -> Proc:
    """``python -c script args`` inside ``role``'s namespace (the venv's interpreter)."""
    return start_proc(cluster, topo, role, name, [sys.executable, "-c", script, *map(str, args)])


def start_relay(
    cluster: Cluster, topo: NatTopology, port: int, *, policy: Path | None = None
) -> Relay:
    argv = [*topo.prefix("pub"), *relay_argv(cluster.pki, f"{topo.relay_ip}:{port}")]
    if policy is not None:
        argv += ["--policy", str(policy)]
    unique, path = _log_path(cluster, "relay")
    relay = Relay(unique, argv, path, port)
    cluster.procs.append(relay)
    relay.wait_for("relay listening", addr=f"{topo.relay_ip}:{port}", timeout=WAIT)
    return relay


def start_agent(
    cluster: Cluster,
    topo: NatTopology,
    role: str,
    ident: Identity,
    relay: Relay,
    *extra: str,
    name: str,
) -> Agent:
    """``outrelay-agent`` inside ``role``'s namespace, dialling the relay on ``pub``."""
    relay_addr = f"{topo.relay_ip}:{relay.port}"
    argv = [*topo.prefix(role), *agent_argv(cluster.pki, ident, relay_addr, *extra)]
    unique, path = _log_path(cluster, name)
    agent = Agent(unique, argv, path, ident, ident.uri)
    cluster.procs.append(agent)
    agent.wait_for("agent started", timeout=WAIT)
    agent.read_bound_ports()
    return agent


# --------------------------------------------------------------------------- scripts
#
# Small programs run with the venv's python inside a namespace. They print JSON
# lines with a "msg" key, so Proc.wait_for() can wait on them.

UDP_PEER_SCRIPT = r"""
import json, socket, sys, time
host, _, port = sys.argv[1].rpartition(":")
port, seconds = int(port), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host or "0.0.0.0", port))
def out(**kw):
    print(json.dumps(kw), flush=True)
plan = []
for n, target in enumerate(sys.argv[3:]):
    addr, _, delay = target.partition("@")
    ip, _, p = addr.rpartition(":")
    plan.append((float(delay or 0), n, ip, int(p)))
plan.sort()
start = time.monotonic()
out(msg="udp peer bound", port=port)
deadline = start + seconds
while (now := time.monotonic()) < deadline:
    while plan and plan[0][0] <= now - start:
        _, n, ip, p = plan.pop(0)
        s.sendto(b"hello %d from %d" % (n, port), (ip, p))
        out(msg="udp sent", to="%s:%d" % (ip, p), n=n)
    wake = min(deadline, start + plan[0][0]) if plan else deadline
    s.settimeout(max(wake - time.monotonic(), 0.001))
    try:
        data, addr = s.recvfrom(2048)
    except (TimeoutError, socket.timeout):
        continue
    out(msg="udp received", data=data.decode(errors="replace"), src="%s:%d" % addr)
    if not data.startswith(b"reply"):
        s.sendto(b"reply to " + data, addr)
out(msg="udp peer done")
"""
"""argv: [IP:]PORT SECONDS [IP:PORT[@DELAY] ...]: bind IP:PORT (default IP
0.0.0.0); send ``hello <n>
from PORT`` to the n-th target DELAY seconds (default 0) after binding; for
SECONDS log every datagram received (``udp received`` with ``data`` and ``src``)
and answer each one that is not a reply with ``reply to <data>``."""

ECHO_SCRIPT = r"""
import hashlib, json, socket, sys, threading
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=64)
print(json.dumps({"msg": "echo listening", "port": int(sys.argv[1])}), flush=True)
def serve(conn):
    digest, total = hashlib.sha256(), 0
    try:
        while data := conn.recv(256 * 1024):
            digest.update(data)
            total += len(data)
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        how = "eof"
    except OSError as exc:
        how = repr(exc)
    finally:
        conn.close()
    print(json.dumps({"msg": "echo done", "received": total,
                      "sha256": digest.hexdigest(), "how": how}), flush=True)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
"""argv: PORT. A TCP echo server on 127.0.0.1:PORT; per connection it logs
``echo done`` with the byte count and sha256 of everything it received."""

TRANSFER_SCRIPT = r"""
import hashlib, json, os, socket, sys, threading, time
port, size, chunk, pace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def out(**kw):
    print(json.dumps(kw), flush=True)
data = os.urandom(size)
sock = socket.create_connection(("127.0.0.1", port), timeout=30)
sock.settimeout(90)
state = {"sent": 0, "error": None}
def write():
    try:
        view = memoryview(data)
        for i in range(0, size, chunk):
            sock.sendall(view[i:i + chunk])
            state["sent"] += len(view[i:i + chunk])
            if pace:
                time.sleep(pace)
        sock.shutdown(socket.SHUT_WR)
    except BaseException as exc:
        state["error"] = "write: %r" % (exc,)
started = time.monotonic()
out(msg="transfer started", size=size)
writer = threading.Thread(target=write, daemon=True)
writer.start()
received, reported, gap, last = hashlib.sha256(), 0, 0.0, time.monotonic()
count = 0
try:
    while block := sock.recv(1 << 20):
        now = time.monotonic()
        gap, last = max(gap, now - last), now
        received.update(block)
        count += len(block)
        if count - reported >= 1 << 20:
            reported = count
            out(msg="progress", received=count, sent=state["sent"],
                t=round(now - started, 2))
    how = "eof"
except BaseException as exc:
    how = "read: %r" % (exc,)
writer.join(60)
out(msg="transfer done", size=size, sent=state["sent"], received=count, how=how,
    sent_sha256=hashlib.sha256(data).hexdigest(), received_sha256=received.hexdigest(),
    seconds=round(time.monotonic() - started, 2), longest_gap=round(gap, 2),
    eof_after_last_byte=round(time.monotonic() - last, 2),
    error=state["error"])
"""
"""argv: PORT SIZE CHUNK PACE. Sends SIZE random bytes to 127.0.0.1:PORT in
CHUNK-byte writes, sleeping PACE seconds after each, while reading the echo;
logs ``progress`` per MiB and finally ``transfer done`` with both sha256s."""


def progress(proc: Proc) -> int:
    """Bytes the transfer script had received at its last ``progress`` line."""
    recs = proc.find("progress")
    return int(recs[-1]["received"]) if recs else 0
