"""deployments/compose/compose.yaml's topology, run as network namespaces.

No container runtime is needed: the compose file is parsed, every group of
services sharing one network namespace (``network_mode: service:X``) becomes
one namespace, all joined by a bridge like compose's default network, service
names resolve through ``/etc/netns/<ns>/hosts``, and the ``localhost/outrelay``
services run with exactly the compose file's arguments (``/etc/outrelay`` mapped
to a fresh ``outrelay pki dev`` directory, ``${VAR...}`` interpolated as compose
does). The non-outrelay images (the echo backend, the app) are replaced by
equivalents run in the same namespace: a Python echo server on the backend's
address, and the test itself as the app. An echo through the consumer's
listener proves the topology: loopback listeners reachable from the sharing
service, the relay reachable by service name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.scripts import ECHO_CLIENT, ECHO_SERVER
from tests.e2e.harness import child_env
from tests.e2e.netns import Namespace, Network, free_block, network

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deployments" / "compose" / "compose.yaml"
IMAGE_PREFIX = "localhost/outrelay:"
ENTRYPOINTS = {"outrelay-agent": "outrelay.agent.cli", "outrelay-relay": "outrelay.relay.cli"}

pytestmark = pytest.mark.timeout(120)


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:?msg}`` and ``${VAR:-default}`` forms."""

    def sub(m: re.Match[str]) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":-":
            return rest or ""
        raise AssertionError(f"compose variable {name} unset: {rest}")

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:[?-])([^}]*))?\}", sub, text)


def _groups(services: dict[str, Any]) -> dict[str, list[str]]:
    """Owner service -> the services sharing its network namespace."""
    groups: dict[str, list[str]] = {}
    for name, svc in services.items():
        mode = svc.get("network_mode", "")
        owner = mode.removeprefix("service:") if mode.startswith("service:") else name
        groups.setdefault(owner, []).append(name)
    return groups


def _argv(svc: dict[str, Any], pki_dir: Path) -> list[str]:
    entry = svc.get("entrypoint", ["outrelay-agent"])
    assert len(entry) == 1 and entry[0] in ENTRYPOINTS, entry
    mounts = [v.split(":") for v in svc.get("volumes", [])]
    assert [m[1] for m in mounts] == ["/etc/outrelay"], mounts
    args = [a.replace("/etc/outrelay", str(pki_dir)) for a in svc["command"]]
    return [sys.executable, "-m", ENTRYPOINTS[entry[0]], *args]


@contextlib.contextmanager
def _started(argvs: list[tuple[Namespace, list[str]]], logs: Path) -> Iterator[None]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, (ns, argv) in enumerate(argvs):
            out = (logs / f"{i}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [*ns.prefix(), *argv], stdout=out, stderr=subprocess.STDOUT, env=child_env()
                )
            )
            out.close()
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def test_compose_topology_echoes(tmp_path: Path) -> None:
    pki_dir = tmp_path / "identity"
    subprocess.run(
        [sys.executable, "-m", "outrelay.cli", "pki", "dev", "--out", str(pki_dir)],
        check=True, capture_output=True, timeout=30, env=child_env(),
    )  # fmt: skip
    ids = json.loads((pki_dir / "identities.json").read_text())
    agents = {a["name"]: a["uri"] for a in ids["agents"]}
    env = {"OUTRELAY_PROVIDER_URI": agents["agent-a"], "OUTRELAY_CONSUMER_URI": agents["agent-b"]}
    services: dict[str, Any] = yaml.safe_load(_interpolate(COMPOSE.read_text(), env))["services"]
    assert all("ports" not in s for s in services.values())
    groups = _groups(services)

    def build(net: Network) -> tuple[dict[str, Namespace], dict[str, str]]:
        block = free_block("10.{}.", list(range(201, 240)))
        subnet = ipaddress.ip_network(f"10.{block}.7.0/24")
        hub = net.namespace("hub")
        hub.ip("link", "add", "br0", "type", "bridge")
        hub.ip("link", "set", "br0", "up")
        spaces: dict[str, Namespace] = {}
        addrs: dict[str, str] = {}
        for i, owner in enumerate(groups, start=2):
            ns = net.namespace(f"g{i}")
            net.veth(ns, "eth0", hub, f"v{i}")
            hub.ip("link", "set", f"v{i}", "master", "br0")
            hub.ip("link", "set", f"v{i}", "up")
            ip = str(subnet.network_address + i)
            net.addr(ns, "eth0", f"{ip}/{subnet.prefixlen}")
            spaces[owner] = ns
            for member in groups[owner]:
                addrs[member] = ip
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in addrs.items())
        for ns in spaces.values():
            net.resolv_conf(ns, "nameserver 127.0.0.1\n")
            (ns.etc_dir / "hosts").write_text(hosts)
        return spaces, addrs

    with network("cmp", build, tools=("ip",)) as (spaces, _addrs):
        starts: list[tuple[Namespace, list[str]]] = []
        consumer_port: int | None = None
        for owner, members in groups.items():
            for name in members:
                svc = services[name]
                ns = spaces[owner]
                if svc["image"].startswith(IMAGE_PREFIX):
                    starts.append((ns, _argv(svc, pki_dir)))
                    for arg in svc["command"]:
                        if arg.startswith("--consume="):
                            consumer_port = int(arg.rsplit(":", 1)[1])
                elif "TCP-LISTEN" in " ".join(svc.get("command", [])):
                    # The socat echo backend: the same address, a Python echo server.
                    spec = next(a for a in svc["command"] if a.startswith("TCP-LISTEN"))
                    port = re.search(r"TCP-LISTEN:(\d+)", spec)
                    bind = re.search(r"bind=([0-9.]+)", spec)
                    assert port and bind, spec
                    starts.insert(0, (ns, [sys.executable, "-c", ECHO_SERVER,
                                           bind.group(1), port.group(1)]))  # fmt: skip
        assert consumer_port is not None
        consumer_ns = spaces[next(o for o, m in groups.items() if "app" in m)]
        logs = tmp_path / "logs"
        logs.mkdir()
        with _started(starts, logs):
            got = consumer_ns.exec(
                sys.executable, "-c", ECHO_CLIENT, str(consumer_port), "30", timeout=60, check=False
            )
            detail = "\n".join(p.read_text()[-2000:] for p in sorted(logs.glob("*.log")))
            assert got.returncode == 0, f"{got.stderr}\n{detail}"
            assert got.stdout.split() == [str(256 * 4096), "True"], detail
