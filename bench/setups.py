"""Start the things a scenario measures: PKI, backend, relay and agents, peers.

Each ``start_*`` function starts processes through a :class:`~bench.common.Procs`
(so they are always stopped), waits for readiness with a timeout, and returns
a small record with the ports and the processes. Readiness never relies on
info-level log lines, so the agents and the relay can run with
``--log-level warn``: the relay is ready when its UDP port is bound, a
consumer/provider pair when a 1-byte echo makes it through.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.clients import echo_once
from bench.common import (
    LOOPBACK,
    BenchError,
    Proc,
    Procs,
    free_port,
    udp_port_bound,
    venv_script,
    wait_tcp,
)

__all__ = [
    "Outrelay",
    "Pki",
    "Server",
    "build_goquic",
    "make_pki",
    "start_backend",
    "start_outrelay",
    "start_ssh_tunnel",
    "start_stunnel_pair",
    "wait_path",
    "wait_udp",
]

READY_TIMEOUT = 30.0
GOQUIC_DIR = Path(__file__).resolve().parent / "goquic"
GOPATH = Path("/usr/share/gocode")


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: str
    relay_cert: str
    relay_key: str
    agents: tuple[tuple[str, str, str], ...]
    """(uri, cert, key) per agent identity."""


def make_pki(out: Path) -> Pki:
    """``outrelay pki dev --out DIR`` and its identities.json."""
    subprocess.run(
        [venv_script("outrelay"), "pki", "dev", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    ids = json.loads((out / "identities.json").read_text())
    agents = tuple((a["uri"], a["cert"], a["key"]) for a in ids["agents"])
    return Pki(
        dir=out,
        ca=str(out / "ca.crt"),
        relay_cert=str(out / "relay.crt"),
        relay_key=str(out / "relay.key"),
        agents=agents,
    )


@dataclass
class Server:
    """A started server process and the port clients use."""

    proc: Proc
    port: int


def start_backend(procs: Procs, name: str = "backend") -> Server:
    port = free_port()
    proc = procs.start(name, [sys.executable, "-m", "bench.tcpserver", "--port", str(port)])
    proc.wait_log(r"^ready", READY_TIMEOUT)
    return Server(proc, port)


def start_python_server(procs: Procs, name: str, module: str, pki: Pki) -> Server:
    """``bench.quicraw`` or ``bench.rawquic`` server on a free UDP port."""
    port = free_port(socket.SOCK_DGRAM)
    argv = [sys.executable, "-m", module, "server", "--port", str(port)]
    argv += ["--cert", pki.relay_cert, "--key", pki.relay_key, "--ca", pki.ca]
    proc = procs.start(name, argv)
    proc.wait_log(r"ready", READY_TIMEOUT)
    return Server(proc, port)


# -- outrelay ------------------------------------------------------------------------------


@dataclass
class Outrelay:
    """A relay, a provider agent in front of the backend and a consumer agent."""

    relay: Proc
    provider: Proc
    consumer: Proc
    relay_port: int
    local_port: int
    """Where applications connect (the consumer's explicit listener)."""
    relay_argv: list[str] = field(default_factory=list)

    @property
    def procs(self) -> dict[str, Proc]:
        return {"consumer": self.consumer, "relay": self.relay, "provider": self.provider}


def wait_udp(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not udp_port_bound(port):
        if not proc.alive:
            raise BenchError(f"{proc.name} exited before binding udp {port}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{proc.name}: udp {port} not bound after {timeout:g}s")
        time.sleep(0.05)


def wait_path(port: int, timeout: float, procs: list[Proc]) -> None:
    """Retry a 1-byte echo through a path until it works."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive:
                raise BenchError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            echo_once(port, timeout=3.0)
            return
        except (OSError, BenchError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise BenchError(f"no echo through 127.0.0.1:{port} after {timeout:g}s ({last})")


def start_relay(
    procs: Procs,
    pki: Pki,
    port: int,
    *,
    log_level: str,
    wrap: list[str] | None = None,
    extra: list[str] | None = None,
) -> tuple[Proc, list[str]]:
    argv = [*(wrap or [venv_script("outrelay-relay")])]
    argv += ["--listen", f"{LOOPBACK}:{port}", "--cert", pki.relay_cert, "--key", pki.relay_key]
    argv += ["--ca", pki.ca, "--log-level", log_level, *(extra or [])]
    relay = procs.start("relay", argv)
    wait_udp(relay, port, READY_TIMEOUT)
    return relay, argv


def start_outrelay(
    procs: Procs,
    pki: Pki,
    backend_port: int,
    *,
    log_level: str = "warn",
    wrap: dict[str, list[str]] | None = None,
    env: dict[str, str] | None = None,
    transport: str = "quic",
    agent_args: list[str] | None = None,
    extra_relay_args: list[str] | None = None,
) -> Outrelay:
    """Relay, then provider (``--expose svc``), then consumer (``--consume svc@...``).

    ``wrap`` maps "relay"/"provider"/"consumer" to a command that replaces the
    console script (profiling and patch experiments use it). ``transport``
    "tcp" adds ``--listen-tcp`` to the relay and makes both agents use the
    TLS+yamux fallback only (``--transport tcp --relay-tcp``). ``agent_args``
    go to both agents (e.g. ``--quic-backend qh3``), ``extra_relay_args`` to
    the relay (e.g. a relay-side backend choice, once the relay has one).
    """
    wrap = wrap or {}
    relay_port = free_port(socket.SOCK_DGRAM)
    local_port = free_port()
    extra_relay: list[str] = []
    common = ["--relay", f"{LOOPBACK}:{relay_port}", "--ca", pki.ca, "--log-level", log_level]
    if transport == "tcp":
        tcp_port = free_port()
        extra_relay = ["--listen-tcp", f"{LOOPBACK}:{tcp_port}"]
        common += ["--transport", "tcp", "--relay-tcp", f"{LOOPBACK}:{tcp_port}"]
    common += agent_args or []
    relay, relay_argv = start_relay(
        procs,
        pki,
        relay_port,
        log_level=log_level,
        wrap=wrap.get("relay"),
        extra=[*extra_relay, *(extra_relay_args or [])],
    )
    if transport == "tcp":
        wait_tcp(tcp_port, READY_TIMEOUT, relay)
    (uri_a, cert_a, key_a), (uri_b, cert_b, key_b) = pki.agents[:2]
    agent = venv_script("outrelay-agent")
    provider = procs.start(
        "provider",
        [
            *(wrap.get("provider") or [agent]),
            *common,
            "--uri",
            uri_a,
            "--cert",
            cert_a,
            "--key",
            key_a,
            "--expose",
            f"bench={LOOPBACK}:{backend_port}",
        ],
        env=env,
    )
    consumer = procs.start(
        "consumer",
        [
            *(wrap.get("consumer") or [agent]),
            *common,
            "--uri",
            uri_b,
            "--cert",
            cert_b,
            "--key",
            key_b,
            "--consume",
            f"bench@{LOOPBACK}:{local_port}",
        ],
        env=env,
    )
    wait_tcp(local_port, READY_TIMEOUT, consumer)
    wait_path(local_port, READY_TIMEOUT, [relay, provider, consumer])
    return Outrelay(relay, provider, consumer, relay_port, local_port, relay_argv)


# -- ssh -L ----------------------------------------------------------------------------------


@dataclass
class SshTunnel:
    sshd: Proc
    ssh: Proc
    local_port: int
    cipher: str


def start_ssh_tunnel(procs: Procs, workdir: Path, backend_port: int) -> SshTunnel:
    """A throwaway sshd on 127.0.0.1 and ``ssh -N -L`` through it to the backend."""
    sshd_bin, ssh_bin, keygen = (shutil.which(n) for n in ("sshd", "ssh", "ssh-keygen"))
    sshd_bin = sshd_bin or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if not (sshd_bin and ssh_bin and keygen):
        raise BenchError("openssh-server/openssh-client not installed")
    d = workdir / "ssh"
    d.mkdir(mode=0o700, exist_ok=True)
    for key in ("host_key", "id_key"):
        if not (d / key).exists():
            subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                check=True,
                timeout=30,
            )
    (d / "authorized_keys").write_text((d / "id_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress {LOOPBACK}\nHostKey {d / 'host_key'}\nPidFile none\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\n"
        "StrictModes no\nAllowTcpForwarding yes\nPermitRootLogin prohibit-password\n"
        "LogLevel ERROR\n"
    )
    # sshd refuses to start without its privilege-separation directory.
    if os.geteuid() == 0 and not Path("/run/sshd").exists():
        Path("/run/sshd").mkdir(mode=0o755, parents=True)
    sshd = procs.start("sshd", [sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")])
    wait_tcp(port, READY_TIMEOUT, sshd)
    local = free_port()
    options = ["-F", "/dev/null", "-p", str(port), "-i", str(d / "id_key")]
    options += ["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no"]
    options += ["-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null"]
    options += ["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]
    target = f"{getpass.getuser()}@{LOOPBACK}"
    ssh = procs.start(
        "ssh",
        [
            ssh_bin,
            *options,
            "-o",
            "LogLevel=ERROR",
            "-N",
            "-L",
            f"{LOOPBACK}:{local}:{LOOPBACK}:{backend_port}",
            target,
        ],
    )
    wait_tcp(local, READY_TIMEOUT, ssh)
    wait_path(local, READY_TIMEOUT, [sshd, ssh])
    # The negotiated cipher, from a separate one-shot verbose login (the tunnel runs quiet).
    probe = subprocess.run(
        [ssh_bin, *options, "-v", target, "true"], capture_output=True, text=True, timeout=30
    )
    match = re.search(r"kex: server->client cipher: (\S+)", probe.stderr)
    return SshTunnel(sshd, ssh, local, match.group(1) if match else "?")


# -- stunnel -----------------------------------------------------------------------------------


@dataclass
class StunnelPair:
    client: Proc
    server: Proc
    local_port: int


def start_stunnel_pair(procs: Procs, workdir: Path, pki: Pki, backend_port: int) -> StunnelPair:
    """stunnel client (agent-b cert) -> stunnel server (relay cert, client certs required)."""
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if not binary:
        raise BenchError("stunnel4 not installed")
    d = workdir / "stunnel"
    d.mkdir(exist_ok=True)
    server_port, local = free_port(), free_port()
    _, cert_b, key_b = pki.agents[1]
    (d / "server.conf").write_text(
        "foreground = yes\npid =\ndebug = err\n[srv]\n"
        f"accept = {LOOPBACK}:{server_port}\nconnect = {LOOPBACK}:{backend_port}\n"
        f"cert = {pki.relay_cert}\nkey = {pki.relay_key}\nCAfile = {pki.ca}\n"
        "verifyChain = yes\nrequireCert = yes\n"
    )
    (d / "client.conf").write_text(
        "foreground = yes\npid =\ndebug = err\n[cli]\nclient = yes\n"
        f"accept = {LOOPBACK}:{local}\nconnect = {LOOPBACK}:{server_port}\n"
        f"cert = {cert_b}\nkey = {key_b}\nCAfile = {pki.ca}\n"
        "verifyChain = yes\ncheckHost = localhost\n"
    )
    server = procs.start("stunnel-server", [binary, str(d / "server.conf")])
    wait_tcp(server_port, READY_TIMEOUT, server)
    client = procs.start("stunnel-client", [binary, str(d / "client.conf")])
    wait_tcp(local, READY_TIMEOUT, client)
    wait_path(local, READY_TIMEOUT, [server, client])
    return StunnelPair(client, server, local)


# -- quic-go ---------------------------------------------------------------------------------------


def build_goquic(out_dir: Path) -> tuple[Path | None, str]:
    """Build bench/goquic in GOPATH mode against Debian's quic-go; never a module proxy.

    Returns:
        (binary, note): the binary, or None and why it was skipped.
    """
    go = shutil.which("go")
    if go is None:
        return None, "skipped: no Go toolchain (apt-get install golang-go)"
    if not (GOPATH / "src/github.com/lucas-clemente/quic-go").is_dir():
        return None, (
            "skipped: quic-go source not in /usr/share/gocode "
            "(apt-get install golang-github-lucas-clemente-quic-go-dev)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "goquic"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOCACHE": str(out_dir / "gocache"),
    }
    try:
        proc = subprocess.run(
            [go, "build", "-o", str(binary), "."],
            cwd=GOQUIC_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return None, "skipped: go build timed out"
    if proc.returncode != 0:
        return None, "skipped: go build failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    version = subprocess.run([go, "version"], capture_output=True, text=True, timeout=30).stdout
    return binary, version.strip()


def start_goquic(procs: Procs, binary: Path, pki: Pki) -> Server:
    port = free_port(socket.SOCK_DGRAM)
    proc = procs.start(
        "goquic-server",
        [
            str(binary),
            "server",
            "-listen",
            f"{LOOPBACK}:{port}",
            "-cert",
            pki.relay_cert,
            "-key",
            pki.relay_key,
            "-ca",
            pki.ca,
        ],
    )
    proc.wait_log(r"ready", READY_TIMEOUT)
    return Server(proc, port)
