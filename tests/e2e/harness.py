"""End-to-end harness: real ``outrelay-relay``/``outrelay-agent`` processes on 127.0.0.1.

Everything here is synchronous and uses real sockets:

* :class:`Proc` wraps one child process. Its stdout and stderr go to a log file;
  JSON log lines (``--log-format json``) are parsed incrementally so tests can
  :meth:`Proc.wait_for` a message with a deadline instead of sleeping.
* :class:`Cluster` starts relays and agents, remembers every process it started
  and stops them all (SIGTERM, 5 s, SIGKILL) in :meth:`Cluster.stop_all`.
* Backends are small threaded TCP/HTTP servers bound to ``127.0.0.1:0``:
  echo, reply-after-EOF, close-first, blaster (writes N bytes as fast as it
  can), ticker (a line every interval). A "down" backend is a free port with
  nothing listening.
* Client helpers read until EOF or reset with a deadline and say which it was.

No helper waits without a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devpki import DevPki, Identity

__all__ = [
    "AGENT_CMD",
    "LOG_LEVEL",
    "OUTRELAY_CMD",
    "RELAY_CMD",
    "Agent",
    "Backends",
    "Blaster",
    "Cluster",
    "HttpBackend",
    "Proc",
    "Relay",
    "RssSampler",
    "TcpBackend",
    "Transfer",
    "agent_argv",
    "child_env",
    "cli_agent_argv",
    "cli_relay_argv",
    "connect",
    "contains",
    "free_tcp_port",
    "free_udp_port",
    "http_get",
    "read_until_closed",
    "relay_argv",
    "relay_identity",
    "run_cli",
    "write_policy",
]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WAIT = 15.0
"""Default deadline for a log line to appear (start-up, registration)."""
POLL_INTERVAL = 0.05
STOP_GRACE = 5.0
"""SIGTERM, then this long, then SIGKILL."""
LOG_LEVEL = "debug"
AGENT_SHUTDOWN_GRACE = "2"
"""``--shutdown-grace`` for agents unless a test passes its own: a provider whose
relay stream was cut waits for a resume (up to 30 s) and, on SIGTERM, for the
grace (default 10 s); teardown should not have to SIGKILL it."""


# --------------------------------------------------------------------------- commands


def _command(script: str, module: str) -> list[str]:
    """The venv console script next to this interpreter, else on PATH, else ``-m``."""
    beside = Path(sys.executable).parent / script
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(script)
    if found:
        return [found]
    return [sys.executable, "-m", module]


RELAY_CMD = _command("outrelay-relay", "outrelay.relay.cli")
AGENT_CMD = _command("outrelay-agent", "outrelay.agent.cli")
OUTRELAY_CMD = _command("outrelay", "outrelay.cli")


def child_env() -> dict[str, str]:
    """Environment for children: unbuffered, and ``src`` importable for ``-m`` fallbacks."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --------------------------------------------------------------------------- ports


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port on ``host`` (default 127.0.0.1) that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` (default 127.0.0.1) with nothing listening (a "down" backend)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- command lines


def run_cli(argv: Sequence[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (``timeout`` bounds it); output captured as text."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=child_env(), check=False
    )


def cli_agent_argv(pki: DevPki, *extra: str, cert: Path | None = None) -> list[str]:
    """``outrelay-agent`` with valid identity flags (agent-a) and a relay nobody listens on.

    For command-line checks that end before (or without) any network traffic.
    """
    a = pki.agent(0)
    return [
        *AGENT_CMD,
        "--relay", f"127.0.0.1:{free_udp_port()}",
        "--uri", a.uri,
        "--cert", str(cert or a.cert),
        "--key", str(a.key),
        "--ca", str(pki.ca_cert),
        *extra,
    ]  # fmt: skip


def cli_relay_argv(pki: DevPki, *, cert: Path | None = None, with_cert: bool = True) -> list[str]:
    """``outrelay-relay`` on a free loopback port with the dev PKI's flags (for CLI checks)."""
    argv = [*RELAY_CMD, "--listen", f"127.0.0.1:{free_udp_port()}"]
    if with_cert:
        argv += ["--cert", str(cert or pki.relay_cert)]
    return [*argv, "--key", str(pki.relay_key), "--ca", str(pki.ca_cert)]


def agent_argv(pki: DevPki, identity: Identity, relay: str, *extra: str) -> list[str]:
    """``outrelay-agent`` as ``identity`` dialling ``relay``, JSON logs, 2 s shutdown grace.

    For agents a test starts itself (inside a network namespace, say) rather than
    through :meth:`Cluster.start_agent`.
    """
    return [
        *AGENT_CMD,
        "--relay", relay,
        "--uri", identity.uri,
        "--cert", str(identity.cert),
        "--key", str(identity.key),
        "--ca", str(pki.ca_cert),
        "--log-format", "json",
        "--log-level", LOG_LEVEL,
        "--shutdown-grace", AGENT_SHUTDOWN_GRACE,
        *extra,
    ]  # fmt: skip


def relay_argv(pki: DevPki, listen: str, *extra: str) -> list[str]:
    """``outrelay-relay`` on ``listen`` with the dev PKI's relay certificate, JSON logs."""
    return [
        *RELAY_CMD,
        "--listen", listen,
        "--cert", str(pki.relay_cert),
        "--key", str(pki.relay_key),
        "--ca", str(pki.ca_cert),
        "--log-format", "json",
        "--log-level", LOG_LEVEL,
        *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- relay identities


def relay_identity(pki: DevPki, relay_id: str, region: str) -> tuple[Path, Path]:
    """A relay-role certificate ``outrelay://<region>/relay/<relay_id>`` and its key.

    Issued with ``outrelay pki relay`` from the dev CA (a mesh's relays need distinct ids,
    and a relay's certificate is also its client certificate towards its peers).
    """
    out = pki.dir / "relays" / relay_id
    done = run_cli(
        [
            *OUTRELAY_CMD, "pki", "relay", "--ca-dir", str(pki.dir), "--out", str(out),
            "--region", region, "--id", relay_id, "--force",
        ]
    )  # fmt: skip
    assert done.returncode == 0, f"outrelay pki relay failed: {done.stderr or done.stdout}"
    return out / "relay.crt", out / "relay.key"


# --------------------------------------------------------------------------- policy


def write_policy(path: Path, rules: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text(json.dumps({"rules": list(rules)}, indent=2))
    return path


# --------------------------------------------------------------------------- processes

Matcher = Callable[[Any], bool]


def _matches(record: Mapping[str, Any], msg: str | None, attrs: Mapping[str, Any]) -> bool:
    if msg is not None and record.get("msg") != msg:
        return False
    for key, want in attrs.items():
        if key not in record:
            return False
        got = record[key]
        if callable(want):
            if not want(got):
                return False
        elif str(got) != str(want):
            return False
    return True


def contains(fragment: str) -> Matcher:
    """Attribute matcher: the value's text contains ``fragment`` (case-insensitive)."""
    return lambda value: fragment.lower() in str(value).lower()


_LIVE: weakref.WeakSet[Proc] = weakref.WeakSet()
"""Every process started here; a safety net kills leftovers when Python exits
(e.g. after Ctrl-C skipped the fixtures' finalizers)."""


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.running:
            with contextlib.suppress(OSError):
                proc.popen.kill()


class Proc:
    """One child process whose stdout+stderr go to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._offset = 0
        self._partial = b""
        self._records: list[dict[str, Any]] = []
        self._mark = 0
        self.killed = False
        """True if :meth:`stop` had to SIGKILL the process."""
        self.signalled = False
        """True once this harness sent the process a signal."""
        self.started_at = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(),
            start_new_session=True,  # a terminal Ctrl-C must not reach the children
        )
        _LIVE.add(self)

    # -- state ----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def rss_kib(self) -> int | None:
        """VmRSS of the process from ``/proc/<pid>/status``, in KiB."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    # -- logs -----------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        if not chunk:
            return
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and "msg" in obj:
                    self._records.append(obj)

    def records(self) -> list[dict[str, Any]]:
        self._refresh()
        return list(self._records)

    def count(self) -> int:
        """Number of parsed records so far: pass as ``since`` to ignore older lines."""
        self._refresh()
        return len(self._records)

    def find(self, msg: str | None = None, *, since: int = 0, **attrs: Any) -> list[dict[str, Any]]:
        self._refresh()
        return [r for r in self._records[since:] if _matches(r, msg, attrs)]

    def wait_for(
        self,
        msg: str | None = None,
        *,
        timeout: float = DEFAULT_WAIT,
        since: int = 0,
        **attrs: Any,
    ) -> dict[str, Any]:
        """The first record with ``msg`` and ``attrs`` (from record ``since`` on).

        Raises:
            AssertionError: not seen within ``timeout``, or the process exited
                without logging it; the message carries the log tail.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(msg, since=since, **attrs)
            if found:
                return found[0]
            if not self.running:
                found = self.find(msg, since=since, **attrs)  # lines written just before exit
                if found:
                    return found[0]
                raise AssertionError(
                    f"{self.name} {self.exit_note()} without logging "
                    f"{msg!r} {attrs}\n--- {self.name} log tail ---\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name}: no {msg!r} {attrs} within {timeout:g}s\n"
                    f"--- {self.name} log tail ---\n{self.tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def mark(self) -> None:
        """Remember the log size; :meth:`tail` with ``since_mark`` starts here."""
        with contextlib.suppress(OSError):
            self._mark = self.log_path.stat().st_size

    def tail(self, lines: int = 60, *, since_mark: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as f:
                if since_mark:
                    f.seek(self._mark)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        kept = text.splitlines()[-lines:]
        return "\n".join(kept) if kept else "(empty)"

    # -- lifecycle ------------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        if self.running:
            self.signalled = True
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL now (a crash: no CONNECTION_CLOSE reaches the peer)."""
        if self.running:
            self.signalled = True
            self.popen.kill()

    def exit_note(self) -> str:
        """How the process ended, flagging a signal this harness did not send."""
        code = self.returncode
        if code is None:
            return "running"
        if code < 0 and not self.signalled:
            return (
                f"killed by signal {-code}, which this harness did not send "
                "(another process on this machine?)"
            )
        return f"exited {code}"

    def wait_exit(self, timeout: float) -> int:
        """Exit code; raises AssertionError (with the log tail) if still running."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:g}s\n"
                f"--- {self.name} log tail ---\n{self.tail()}"
            ) from None

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM, wait ``grace``, then SIGKILL. Idempotent."""
        if self.running:
            self.signalled = True
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=5.0)
        with contextlib.suppress(OSError):
            self._log.close()
        return self.popen.poll()


class Relay(Proc):
    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, port: int, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(name, argv, log_path)
        self.port = port
        self.host = host

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


class Agent(Proc):
    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, identity: Identity, uri: str
    ) -> None:
        super().__init__(name, argv, log_path)
        self.identity = identity
        self.uri = uri
        self.ports: dict[str, int] = {}
        """Consumed service -> the local port its explicit listener bound."""

    def port(self, service: str) -> int:
        return self.ports[service]

    def read_bound_ports(self) -> None:
        for rec in self.find("intercept: explicit listener bound"):
            self.ports[str(rec["svc"])] = int(str(rec["bind"]).rsplit(":", 1)[1])


class Cluster:
    """Starts relays and agents for one test (or module) and stops them all."""

    CONNECT_SETTLE = 0.3
    """A pure consumer logs nothing when HELLO_ACK arrives; after the relay's
    ``agent connected`` we give the ACK this long to land."""

    def __init__(self, workdir: Path, pki: DevPki, quic_backend: str | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.quic_backend = quic_backend
        """``--quic-backend`` for every agent (None: the agent's default)."""
        self.procs: list[Proc] = []
        self._names: dict[str, int] = {}

    def _log_path(self, name: str) -> tuple[str, Path]:
        n = self._names.get(name, 0)
        self._names[name] = n + 1
        unique = name if n == 0 else f"{name}-{n}"
        return unique, self.workdir / f"{unique}.log"

    # -- relay ----------------------------------------------------------------------

    def start_relay(
        self,
        *,
        port: int | None = None,
        policy: Path | None = None,
        audit: Path | None = None,
        args: Sequence[str] = (),
        name: str = "relay",
        wait: bool = True,
        host: str = "127.0.0.1",
        cert: Path | None = None,
        key: Path | None = None,
    ) -> Relay:
        """Start ``outrelay-relay`` on ``host``:``port`` (a free UDP port if None); wait until
        listening.

        ``cert``/``key``: another relay certificate than the dev PKI's ``relay.crt`` (each
        relay of a mesh has its own id, :func:`relay_identity`).
        """
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            chosen = port if port is not None else free_udp_port(host)
            argv = [
                *RELAY_CMD,
                "--listen",
                f"{host}:{chosen}",
                "--cert",
                str(cert or self.pki.relay_cert),
                "--key",
                str(key or self.pki.relay_key),
                "--ca",
                str(self.pki.ca_cert),
                "--log-format",
                "json",
                "--log-level",
                LOG_LEVEL,
            ]
            if policy is not None:
                argv += ["--policy", str(policy)]
            if audit is not None:
                argv += ["--audit", str(audit)]
            argv += list(args)
            unique, log_path = self._log_path(name)
            relay = Relay(unique, argv, log_path, chosen, host)
            self.procs.append(relay)
            if not wait:
                return relay
            try:
                relay.wait_for("relay listening", addr=f"{host}:{chosen}")
                return relay
            except AssertionError:
                # A port picked by free_udp_port() may have been taken meanwhile.
                if relay.running or attempt == attempts - 1 or not relay.find("listen"):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- agents ---------------------------------------------------------------------

    def start_agent(
        self,
        identity: Identity,
        relay: Relay | str,
        *,
        expose: Mapping[str, str] | None = None,
        consume: Iterable[str] = (),
        uri: str | None = None,
        args: Sequence[str] = (),
        name: str | None = None,
        wait: bool = True,
    ) -> Agent:
        """Start ``outrelay-agent``.

        Args:
            expose: service -> backend ``host:port`` (``--expose svc=host:port``).
            consume: service names; each gets ``--consume svc@127.0.0.1:0`` and
                the bound port is read from the log into ``agent.ports``.
            uri: ``--uri`` (default: the identity's own URI).
            wait: block until the agent is usable: listeners bound and either
                every exposed service registered, or (pure consumer) the relay
                logged ``agent connected`` for it.
        """
        expose = dict(expose or {})
        consume = list(consume)
        relay_addr = relay if isinstance(relay, str) else relay.addr
        agent_uri = uri or identity.uri
        argv = [
            *AGENT_CMD,
            "--relay",
            relay_addr,
            "--uri",
            agent_uri,
            "--cert",
            str(identity.cert),
            "--key",
            str(identity.key),
            "--ca",
            str(self.pki.ca_cert),
            "--log-format",
            "json",
            "--log-level",
            LOG_LEVEL,
        ]
        for svc, target in expose.items():
            argv += ["--expose", f"{svc}={target}"]
        for svc in consume:
            argv += ["--consume", f"{svc}@127.0.0.1:0"]
        if "--shutdown-grace" not in args:
            argv += ["--shutdown-grace", AGENT_SHUTDOWN_GRACE]
        if self.quic_backend is not None and "--quic-backend" not in args:
            argv += ["--quic-backend", self.quic_backend]
        argv += list(args)
        unique, log_path = self._log_path(name or identity.name)
        relay_since = relay.count() if isinstance(relay, Relay) else 0
        agent = Agent(unique, argv, log_path, identity, agent_uri)
        self.procs.append(agent)
        if not wait:
            return agent
        agent.wait_for("agent started")
        agent.read_bound_ports()
        missing = [svc for svc in consume if svc not in agent.ports]
        assert not missing, f"{agent.name}: no listener logged for {missing}\n{agent.tail()}"
        if expose:
            for svc in expose:
                agent.wait_for("service registered", name=svc)
        elif isinstance(relay, Relay):
            relay.wait_for("agent connected", uri=agent_uri, since=relay_since)
            time.sleep(self.CONNECT_SETTLE)
        return agent

    # -- everything -------------------------------------------------------------------

    def mark(self) -> None:
        for proc in self.procs:
            proc.mark()

    def log_tail(self, lines: int = 60, *, since_mark: bool = False) -> str:
        parts = []
        for proc in self.procs:
            state = proc.exit_note()
            parts.append(
                f"----- {proc.name} (pid {proc.pid}, {state}) {proc.log_path} -----\n"
                + proc.tail(lines, since_mark=since_mark)
            )
        return "\n".join(parts)

    def stop_all(self) -> None:
        """Stop every process (agents first, then relays), each SIGTERM -> 5 s -> SIGKILL."""
        agents = [p for p in self.procs if not isinstance(p, Relay)]
        relays = [p for p in self.procs if isinstance(p, Relay)]
        for group in (agents, relays):
            for proc in group:  # signal all, then wait, so stopping stays fast
                proc.send_signal(signal.SIGTERM)
            for proc in group:
                proc.stop()
        killed = [p.name for p in self.procs if p.killed]
        if killed:
            print(f"e2e harness: SIGTERM did not stop {killed} within {STOP_GRACE:g}s; SIGKILLed")


# --------------------------------------------------------------------------- backends

Handler = Callable[[socket.socket], None]


class TcpBackend:
    """A threaded TCP server on 127.0.0.1:0 running ``handler(conn)`` per connection."""

    def __init__(self, handler: Handler, name: str = "backend") -> None:
        self.name = name
        self._handler = handler
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self.errors: list[BaseException] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        """Connections whose handler is still running (the backend's own count)."""
        with self._lock:
            return len(self._conns)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self.connections += 1
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._handler(conn)
        except OSError:
            pass  # the peer went away: normal for resets and slow-consumer tests
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2.0)

    # -- handlers -----------------------------------------------------------------

    @staticmethod
    def echo(conn: socket.socket) -> None:
        """Echo every byte; on EOF, half-close back."""
        while True:
            data = conn.recv(256 * 1024)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    @staticmethod
    def reply_after_eof(conn: socket.socket) -> None:
        """Read until the client's FIN, then answer ``<n> <sha256>\\n`` and close."""
        digest = hashlib.sha256()
        total = 0
        while True:
            data = conn.recv(256 * 1024)
            if not data:
                break
            digest.update(data)
            total += len(data)
        conn.sendall(f"{total} {digest.hexdigest()}\n".encode())
        conn.shutdown(socket.SHUT_WR)

    @staticmethod
    def close_first(greeting: bytes) -> Handler:
        """Send ``greeting`` and close at once, without reading."""

        def handler(conn: socket.socket) -> None:
            conn.sendall(greeting)
            conn.shutdown(socket.SHUT_WR)

        return handler

    @staticmethod
    def ticker(count: int, interval: float, line: bytes = b"tick") -> Handler:
        """Send ``count`` numbered lines, ``interval`` apart, then close."""

        def handler(conn: socket.socket) -> None:
            for i in range(count):
                conn.sendall(line + b" %d\n" % i)
                time.sleep(interval)
            conn.shutdown(socket.SHUT_WR)

        return handler


def stream_forever(chunk: int = 64 * 1024) -> Handler:
    """Send ``chunk``-sized blocks until the peer goes away (a download that never ends)."""
    block = os.urandom(chunk)

    def handler(conn: socket.socket) -> None:
        while True:
            conn.sendall(block)

    return handler


class Blaster:
    """Handler that writes ``total`` bytes as fast as the socket takes them."""

    def __init__(self, total: int, chunk: int = 1 << 20) -> None:
        self.total = total
        self._chunk = os.urandom(chunk)
        self.sent = 0

    def __call__(self, conn: socket.socket) -> None:
        view = memoryview(self._chunk)
        remaining = self.total
        while remaining > 0:
            n = min(remaining, len(view))
            conn.sendall(view[:n])
            self.sent += n
            remaining -= n
        conn.shutdown(socket.SHUT_WR)


class HttpBackend:
    """``http.server`` on 127.0.0.1:0 serving one fixed body for every GET."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.requests = 0
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                backend.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(backend.body)))
                self.send_header("X-Backend", "outrelay-e2e")
                self.end_headers()
                self.wfile.write(backend.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)


class Backends:
    """Factory for loopback backends; :meth:`close_all` stops every one."""

    def __init__(self) -> None:
        self._open: list[TcpBackend | HttpBackend] = []

    def tcp(self, handler: Handler, name: str = "backend") -> TcpBackend:
        backend = TcpBackend(handler, name)
        self._open.append(backend)
        return backend

    def echo(self) -> TcpBackend:
        return self.tcp(TcpBackend.echo, "echo")

    def reply_after_eof(self) -> TcpBackend:
        return self.tcp(TcpBackend.reply_after_eof, "reply-after-eof")

    def close_first(self, greeting: bytes) -> TcpBackend:
        return self.tcp(TcpBackend.close_first(greeting), "close-first")

    def ticker(self, count: int, interval: float) -> TcpBackend:
        return self.tcp(TcpBackend.ticker(count, interval), "ticker")

    def blaster(self, total: int) -> tuple[TcpBackend, Blaster]:
        blaster = Blaster(total)
        return self.tcp(blaster, "blaster"), blaster

    def http(self, body: bytes) -> HttpBackend:
        backend = HttpBackend(body)
        self._open.append(backend)
        return backend

    def close_all(self) -> None:
        while self._open:
            self._open.pop().close()


# --------------------------------------------------------------------------- clients


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Read until the peer closes; returns (data, how) with how in eof/reset/timeout."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(data), "timeout"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(256 * 1024)
        except TimeoutError:
            return bytes(data), "timeout"
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def http_get(port: int, path: str = "/", timeout: float = 15.0) -> tuple[bytes, bytes]:
    """A raw HTTP/1.0 GET through ``port``; returns (head, body)."""
    with connect(port, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: e2e\r\n\r\n".encode())
        data, how = read_until_closed(sock, timeout)
    assert how == "eof", f"HTTP response ended by {how} after {len(data)} bytes"
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no HTTP header in {data[:200]!r}"
    return head, body


class Transfer:
    """Send ``size`` random bytes through ``port`` while reading the echo back."""

    def __init__(self, port: int, size: int, *, pace: float = 0.0) -> None:
        self.data = os.urandom(size)
        self.received = bytearray()
        self.errors: list[BaseException] = []
        self.longest_gap = 0.0
        self._pace = pace
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self._threads = [
            threading.Thread(target=self._write, daemon=True),
            threading.Thread(target=self._read, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _write(self) -> None:
        try:
            view = memoryview(self.data)
            for i in range(0, len(view), 256 * 1024):
                self._sock.sendall(view[i : i + 256 * 1024])
                if self._pace:
                    time.sleep(self._pace)
            self._sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # surfaced by wait()
            self.errors.append(exc)

    def _read(self) -> None:
        try:
            last = time.monotonic()
            while chunk := self._sock.recv(1 << 20):
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
                self.received += chunk
        except BaseException as exc:
            self.errors.append(exc)

    def wait_received(self, fraction: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        target = int(len(self.data) * fraction)
        while len(self.received) < target:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, (
                f"only {len(self.received)} of {target} bytes after {timeout}s"
            )
            time.sleep(0.02)

    def wait(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), "transfer did not finish"
        self._sock.close()

    def check_exact(self) -> None:
        assert not self.errors, f"the application saw errors: {self.errors}"
        assert len(self.received) == len(self.data)
        assert hashlib.sha256(self.received).digest() == hashlib.sha256(self.data).digest()


# --------------------------------------------------------------------------- RSS


@dataclass
class RssSampler:
    """Samples VmRSS of some processes every ``interval`` seconds in a thread."""

    procs: Sequence[Proc]
    interval: float = 0.5
    baseline: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        for proc in self.procs:
            rss = proc.rss_kib() or 0
            self.baseline[proc.name] = rss
            self.peak[proc.name] = rss
            self.samples[proc.name] = [rss]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for proc in self.procs:
            rss = proc.rss_kib()
            if rss is None:
                continue
            self.samples[proc.name].append(rss)
            self.peak[proc.name] = max(self.peak[proc.name], rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.sample()

    def growth_kib(self, name: str) -> int:
        return self.peak[name] - self.baseline[name]
