"""Process, port and /proc helpers shared by every scenario.

Every process the suite starts goes through :class:`Procs`: its own session
(process group), its output in a log file of the run directory, and a stop
that escalates SIGTERM -> SIGKILL with timeouts. ``Procs`` is a context
manager, so an error anywhere still stops everything. Only the ids we
started are ever signalled (the group we created, and descendants found by
walking ``/proc`` from our own child), never a process found by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOOPBACK",
    "REPO",
    "BenchError",
    "Proc",
    "Procs",
    "free_port",
    "median",
    "percentile",
    "udp_port_bound",
    "venv_script",
    "wait_tcp",
]

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
"""Children run from the repository root, so ``python -m bench.<module>`` resolves."""
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
STOP_TIMEOUT = 5.0


class BenchError(Exception):
    """A benchmark step failed (the message says which and why)."""


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A currently free 127.0.0.1 port of the given socket type."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def venv_script(name: str) -> str:
    """A console script of the running interpreter's environment (``outrelay-agent``...)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise BenchError(f"{name} not found next to {sys.executable}; install the project first")


def wait_tcp(port: int, timeout: float, proc: Proc | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            return
        if proc is not None and not proc.alive:
            raise BenchError(f"{proc.name} exited before listening on {port}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listens on tcp {port} after {timeout:g}s")
        time.sleep(0.05)


def udp_port_bound(port: int) -> bool:
    """True if a UDP socket is bound to ``port`` (read from /proc/net/udp)."""
    want = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if len(fields) > 2 and fields[1].endswith(want):
                    return True
    return False


def median(values: Iterable[float]) -> float:
    data = [v for v in values if v == v]
    return statistics.median(data) if data else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100)."""
    data = sorted(values)
    if not data:
        return float("nan")
    rank = max(1, min(len(data), round(pct / 100 * len(data) + 0.5)))
    return data[rank - 1]


# -- /proc ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    # "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
    return text[text.rfind(")") + 2 :].split()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    kids = _children()
    out, todo = [], [pid]
    while todo and len(out) < 10_000:
        current = todo.pop()
        out.append(current)
        todo.extend(kids.get(current, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, seconds (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0


# -- processes -------------------------------------------------------------------------


@dataclass(eq=False)
class Proc:
    """One started process (a session leader) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for a regex to appear in the process's output."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text())
            if match:
                return match
            if not self.alive:
                raise BenchError(f"{self.name} exited (rc={self.popen.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {pattern!r} after {timeout:g}s:\n{self.tail()}")
            time.sleep(0.05)

    def cpu(self) -> float:
        """CPU seconds of the process and its live descendants (sshd forks per session)."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.pid))

    def rss(self) -> int:
        return rss_bytes(self.pid)


class Procs:
    """Starts processes and guarantees they are stopped (context manager)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[Proc] = []
        self._names: dict[str, int] = {}

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        count = self._names.get(name, 0)
        self._names[name] = count + 1
        label = name if count == 0 else f"{name}-{count + 1}"
        log_path = self.logdir / f"{label}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd or REPO,
            )
        proc = Proc(label, popen, log_path)
        self._procs.append(proc)
        return proc

    def kill(self, proc: Proc) -> None:
        """SIGKILL the process (its group and descendants) at once."""
        self._signal(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(STOP_TIMEOUT)

    def stop(self, proc: Proc, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
        if proc.alive:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(STOP_TIMEOUT)
        else:
            # The leader is gone; make sure nothing it forked into its group lingers.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)

    @staticmethod
    def _signal(proc: Proc, sig: int) -> None:
        pids = process_tree(proc.pid) if proc.alive else []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in pids[1:]:  # descendants that left the group (sshd's per-session child)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
