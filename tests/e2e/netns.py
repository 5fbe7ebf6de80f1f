"""Linux network namespaces for the end-to-end tests, always removed afterwards.

One module for every test that needs a network of its own (transparent capture,
the TCP fallback with UDP dropped, two NATs and an "internet"):

* :func:`network` builds one with a callback and yields what it returned. It skips
  the test (with the reason) where namespaces cannot be made (not Linux, not root,
  a tool missing, iptables unusable), and removes everything in its ``finally``,
  also when the body or the build failed half-way: processes still running inside
  are killed, namespaces deleted (which deletes their veths, addresses, routes and
  iptables rules), host ends of veths deleted, ``/etc/netns/<name>`` removed.
* :class:`Network` creates namespaces, veth pairs, addresses, routes and
  ``resolv.conf`` files and remembers each for the teardown.
* :class:`Namespace` runs commands inside one (``ip netns exec``);
  :class:`LinkedNamespace` is one joined to the host by a veth.
* :func:`sweep` removes what a killed test run left behind: every namespace named
  with :data:`PREFIX` whose creating process is gone. :func:`network` sweeps first.

Everything is named ``ort-<kind>-<pid>-<tag>[-<role>]``, so parallel runs never
collide, and addresses come from :func:`free_block`, which looks at the host and at
every namespace. Tests only ever address loopback or the namespaces they made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

__all__ = [
    "CMD_TIMEOUT",
    "NETNS_DIR",
    "PREFIX",
    "LinkedNamespace",
    "Namespace",
    "Network",
    "Unusable",
    "addresses_in_use",
    "free_block",
    "network",
    "run",
    "skip_reason",
    "sweep",
]

CMD_TIMEOUT = 20.0
"""Every command (ip, iptables, and what tests run inside) is killed after this long."""
PREFIX = "ort-"
"""Every namespace made here is named ``ort-<kind>-<pid>-<tag>[-<role>]``."""
NETNS_DIR = Path("/etc/netns")
"""``ip netns exec NAME`` bind-mounts ``/etc/netns/NAME/*`` over ``/etc/*``."""

T = TypeVar("T")


def run(
    *argv: str, check: bool = True, timeout: float = CMD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no proxy variables in its environment); raise RuntimeError if it fails."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}"
        )
    return proc


class Unusable(Exception):
    """The kernel or tools cannot do what the test needs: skip, don't fail."""


def skip_reason(tools: Sequence[str] = ("ip", "iptables")) -> str | None:
    """Why namespaces with ``tools`` cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, iptables)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs iproute2, iptables, dnsutils, curl)"
    return None


def addresses_in_use() -> str:
    """``ip -4 -o addr`` of the host and of every namespace (a parallel run's too)."""
    used = run("ip", "-4", "-o", "addr", "show", check=False).stdout
    with contextlib.suppress(Exception):
        used += run("ip", "-all", "netns", "exec", "ip", "-4", "-o", "addr", check=False).stdout
    return used


def free_block(fmt: str, choices: Sequence[int]) -> int:
    """A value ``n`` of ``choices`` such that no address starts with ``fmt.format(n)``.

    ``fmt`` ends with a dot (``"10.200.{}."``, ``"10.{}."``). The search starts at a
    pid-derived choice so that two runs at once rarely race for the same block.
    """
    used = addresses_in_use()
    start = os.getpid() % len(choices)
    for i in range(len(choices)):
        n = choices[(start + i) % len(choices)]
        if f"inet {fmt.format(n)}" not in used:
            return n
    raise RuntimeError(f"no free {fmt.format('N')}x block for the test network")


@dataclass(frozen=True)
class Namespace:
    """One network namespace made by a :class:`Network`."""

    name: str

    @property
    def etc_dir(self) -> Path:
        return NETNS_DIR / self.name

    def prefix(self) -> list[str]:
        """argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def exec(
        self, *argv: str, check: bool = True, timeout: float = CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return run(*self.prefix(), *argv, check=check, timeout=timeout)

    def ip(self, *argv: str) -> None:
        """``ip -n NAME ARGV`` (must succeed)."""
        run("ip", "-n", self.name, *argv)

    def iptables(self, *rule: str) -> None:
        """``iptables RULE`` inside; raises :class:`Unusable` if iptables refuses it."""
        got = self.exec("iptables", "-w", "5", *rule, check=False)
        if got.returncode != 0:
            raise Unusable(
                f"iptables {' '.join(rule)} not usable in a namespace here: {got.stderr.strip()}"
            )

    def iptables_rules(self, table: str = "filter") -> str:
        return self.exec("iptables", "-w", "5", "-t", table, "-S").stdout

    def exists(self) -> bool:
        return self.name in run("ip", "netns", "list", check=False).stdout.split()

    def pids(self) -> list[int]:
        out = run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(x) for x in out.split() if x.isdigit()]


@dataclass(frozen=True)
class LinkedNamespace(Namespace):
    """A namespace joined to the host by a veth pair with a subnet on it (.1 host, .2 inside)."""

    host_if: str
    ns_if: str
    subnet: ipaddress.IPv4Network

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ns_ip(self) -> str:
        return str(self.subnet.network_address + 2)


L = TypeVar("L", bound=LinkedNamespace)


@dataclass
class Network:
    """Namespaces, veths and files made for one test; :meth:`teardown` removes them."""

    kind: str
    """Short (<= 4 characters): part of every name, and of host interface names."""
    tag: str = field(default_factory=lambda: secrets.token_hex(3)[:5])
    namespaces: list[Namespace] = field(default_factory=list)
    host_ifs: list[str] = field(default_factory=list)
    etc_dirs: list[Path] = field(default_factory=list)
    made_netns_dir: bool = False

    def name(self, role: str = "") -> str:
        base = f"{PREFIX}{self.kind}-{os.getpid()}-{self.tag}"
        return f"{base}-{role}" if role else base

    # -- building ---------------------------------------------------------------------

    def namespace(self, role: str = "") -> Namespace:
        """A new namespace (its ``lo`` up)."""
        ns = Namespace(self.name(role))
        run("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def veth(self, a: Namespace, a_if: str, b: Namespace, b_if: str) -> None:
        """A veth pair between two of this network's namespaces."""
        run("ip", "-n", a.name, "link", "add", a_if, "type", "veth",
            "peer", "name", b_if, "netns", b.name)  # fmt: skip

    def addr(self, ns: Namespace, ifname: str, cidr: str) -> None:
        """Add ``cidr`` to ``ifname`` in ``ns`` and bring the interface up."""
        ns.ip("addr", "add", cidr, "dev", ifname)
        ns.ip("link", "set", ifname, "up")

    def route(self, ns: Namespace, *spec: str) -> None:
        """``ip route add SPEC`` in ``ns``."""
        ns.ip("route", "add", *spec)

    def linked_namespace(
        self,
        subnet: ipaddress.IPv4Network,
        cls: type[L] = LinkedNamespace,  # type: ignore[assignment]
    ) -> L:
        """A new namespace with a veth to the host: .1 of ``subnet`` outside, .2 inside."""
        ns = self.namespace()
        linked = cls(ns.name, f"ort{self.kind}{self.tag}h", f"ort{self.kind}{self.tag}n", subnet)
        run("ip", "link", "add", linked.host_if, "type", "veth", "peer", "name", linked.ns_if)
        self.host_ifs.append(linked.host_if)
        run("ip", "link", "set", linked.ns_if, "netns", ns.name)
        run("ip", "addr", "add", f"{linked.host_ip}/{subnet.prefixlen}", "dev", linked.host_if)
        run("ip", "link", "set", linked.host_if, "up")
        self.addr(ns, linked.ns_if, f"{linked.ns_ip}/{subnet.prefixlen}")
        return linked

    def resolv_conf(self, ns: Namespace, text: str) -> None:
        """``/etc/resolv.conf`` as commands run by ``ns.exec`` see it."""
        if not NETNS_DIR.exists():
            NETNS_DIR.mkdir(mode=0o755)
            self.made_netns_dir = True
        ns.etc_dir.mkdir(mode=0o755)
        self.etc_dirs.append(ns.etc_dir)
        (ns.etc_dir / "resolv.conf").write_text(text)

    # -- teardown ---------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Kill what still runs inside, delete everything; returns the errors (never raises)."""
        errors: list[str] = []
        for ns in self.namespaces:
            with contextlib.suppress(Exception):
                _kill_all(ns)
        for host_if in self.host_ifs:  # deleting either end deletes the pair
            with contextlib.suppress(Exception):
                run("ip", "link", "del", host_if, check=False)
        for ns in reversed(self.namespaces):
            try:
                got = run("ip", "netns", "del", ns.name, check=False)
                if got.returncode != 0 and ns.exists():
                    errors.append(f"ip netns del {ns.name}: {got.stderr.strip()}")
            except Exception as exc:
                errors.append(f"ip netns del {ns.name}: {exc}")
        for etc in self.etc_dirs:
            try:
                shutil.rmtree(etc)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"rm {etc}: {exc}")
        if self.made_netns_dir:
            with contextlib.suppress(OSError):
                NETNS_DIR.rmdir()  # only if empty: another run may be using it
        with contextlib.suppress(Exception):
            listed = run("ip", "netns", "list", check=False).stdout
            errors += [f"namespace left: {ns.name}" for ns in self.namespaces if ns.name in listed]
        return errors


def _kill_all(ns: Namespace) -> None:
    """SIGKILL every process in ``ns`` (all started by the test, in its own namespace)."""
    for pid in ns.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a frozen process dies on SIGKILL too, but be sure
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Remove namespaces (and ``/etc/netns`` dirs) named ``ort-*`` whose creator is gone.

    Returns the names removed. A namespace whose creating pid still runs is left alone:
    it belongs to a live test run.
    """
    removed: list[str] = []
    listed = run("ip", "netns", "list", check=False).stdout.split()
    for name in listed:
        parts = name.split("-")
        if not name.startswith(PREFIX) or len(parts) < 4 or not parts[2].isdigit():
            continue
        if _alive(int(parts[2])):
            continue
        ns = Namespace(name)
        with contextlib.suppress(Exception):
            _kill_all(ns)
        if run("ip", "netns", "del", name, check=False).returncode == 0:
            removed.append(name)
        shutil.rmtree(ns.etc_dir, ignore_errors=True)
    return removed


@contextlib.contextmanager
def network(
    kind: str, build: Callable[[Network], T], *, tools: Sequence[str] = ("ip", "iptables")
) -> Iterator[T]:
    """A :class:`Network` built by ``build(net)``; yields what ``build`` returned.

    Skips the test where the network cannot be built (:func:`skip_reason`,
    :class:`Unusable`, or the very first namespace failing); removes everything
    afterwards, also when ``build`` or the body fails, and fails the test if
    anything was left.
    """
    reason = skip_reason(tools)
    if reason:
        pytest.skip(reason)
    with contextlib.suppress(Exception):
        sweep()
    net = Network(kind)
    try:
        try:
            built = build(net)
        except Unusable as exc:
            pytest.skip(str(exc))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if not net.namespaces:
                pytest.skip(f"cannot create a network namespace here: {exc}")
            raise
        yield built
    finally:
        errors = net.teardown()
        assert not errors, f"namespace teardown failed: {errors}"
