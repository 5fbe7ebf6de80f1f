"""The scenarios: bulk (+ CPU per GiB), TTFB, concurrency, resume, QUIC client stacks,
patch experiments and the bulk-path profile.

Every scenario starts what it needs in its own :class:`~bench.common.Procs`
(stopped when it ends, error or not), interleaves its paths within each
repetition so that load from elsewhere on the machine hits them alike, and
stores raw samples in ``ctx.results``; :mod:`bench.report` turns them into
medians, ratios, tables and plots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import clients, setups
from bench.common import LOOPBACK, REPO, BenchError, Proc, Procs, free_port, percentile
from bench.setups import Pki

MIB = 1 << 20
GIB = 1 << 30


@dataclass
class Options:
    size_mib: int
    reps: int
    quick: bool
    ttfb_count: int
    conns: int
    resume_reps: int
    resume_rate_mib: float
    resume_seconds: float
    profile_seconds: int
    aux_size_mib: int
    """Transfer size of the qh3 and experiment scenarios."""
    aux_reps: int
    agent_backends: tuple[str, ...] = ()
    """Extra bulk/TTFB rows: the agents on each of these QUIC backends (``--quic-backend``)."""
    relay_args: tuple[str, ...] = ()
    """Extra flags for the relay of every outrelay path in bulk/TTFB."""


@dataclass
class Ctx:
    opts: Options
    workdir: Path
    pki: Pki
    results: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    goquic: Path | None = None
    goquic_note: str = ""

    def logdir(self, name: str) -> Path:
        path = self.workdir / "logs" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- paths -----------------------------------------------------------------------------------


@dataclass
class TcpPath:
    """Applications speak TCP to ``port``; ``procs`` are the processes in between."""

    name: str
    label: str
    port: int
    procs: dict[str, Proc]

    def bulk(self, size: int) -> tuple[float, dict[str, float]]:
        before = {k: p.cpu() for k, p in self.procs.items()}
        seconds = clients.upload(self.port, size)
        return seconds, {k: p.cpu() - before[k] for k, p in self.procs.items()}

    def ttfb(self, count: int) -> list[float]:
        return [clients.echo_once(self.port) for _ in range(count)]


@dataclass
class ClientPath:
    """A QUIC client process (one per transfer) against a long-running server."""

    name: str
    label: str
    argv: list[str]
    server: Proc
    go_flags: bool = False

    def _run(self, extra: list[str], timeout: float) -> dict[str, Any]:
        proc = subprocess.run(
            self.argv + extra,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
        )
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            raise BenchError(f"{self.name} client failed (rc={proc.returncode}): {detail}")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    def _flags(self, **kw: Any) -> list[str]:
        dash = "-" if self.go_flags else "--"
        return [x for k, v in kw.items() for x in (f"{dash}{k}", str(v))]

    def bulk(self, size: int, mode: str = "upload") -> tuple[float, dict[str, float]]:
        before = self.server.cpu()
        out = self._run(self._flags(mode=mode, size=size), timeout=120 + size / MIB * 2)
        cpu = {"client": float(out["cpu"]), "server": self.server.cpu() - before}
        return float(out["seconds"]), cpu

    def ttfb(self, count: int) -> list[float]:
        out = self._run(self._flags(mode="ttfb", count=count + 1), timeout=60 + count * 5)
        return [float(x) for x in out["samples"]][1:]  # the first one warms the process up


def _record_error(entry: dict[str, Any], exc: Exception) -> None:
    entry.setdefault("errors", []).append(str(exc)[:300])


def _quic_files(pki: Pki, agent: int = 0) -> list[str]:
    _, cert, key = pki.agents[agent]
    return ["--cert", cert, "--key", key, "--ca", pki.ca]


def _start_peer_paths(ctx: Ctx, procs: Procs) -> list[TcpPath | ClientPath]:
    """Backend, outrelay (QUIC and TLS+yamux), raw QUIC servers, Go, ssh -L, stunnel."""
    pki = ctx.pki
    backend = setups.start_backend(procs)
    paths: list[TcpPath | ClientPath] = [TcpPath("tcp", "direct TCP", backend.port, {})]
    relay_args = list(ctx.opts.relay_args)
    say("starting relay + provider + consumer")
    o = setups.start_outrelay(procs, pki, backend.port, extra_relay_args=relay_args)
    label = f"outrelay agents+relay (QUIC; agents as shipped: {shipped_backend()})"
    paths.append(TcpPath("outrelay", label, o.local_port, o.procs))
    for backend_name in ctx.opts.agent_backends:
        name = f"outrelay-{backend_name}"
        try:
            q = setups.start_outrelay(
                procs,
                pki,
                backend.port,
                agent_args=["--quic-backend", backend_name],
                extra_relay_args=relay_args,
            )
        except BenchError as exc:
            ctx.skipped[name] = str(exc).splitlines()[0]
            continue
        label = f"outrelay agents+relay (QUIC; agents on {backend_name})"
        paths.append(TcpPath(name, label, q.local_port, q.procs))
    try:
        t = setups.start_outrelay(
            procs, pki, backend.port, transport="tcp", extra_relay_args=relay_args
        )
        paths.append(
            TcpPath("outrelay-tcp", "outrelay agents+relay (TLS+yamux)", t.local_port, t.procs)
        )
    except BenchError as exc:
        ctx.skipped["outrelay-tcp"] = str(exc).splitlines()[0]
    raw = setups.start_python_server(procs, "quicraw-server", "bench.quicraw", pki)
    paths.append(
        ClientPath(
            "quic-ceiling",
            "raw 1-stream aioquic (outrelay transport)",
            [
                sys.executable,
                "-m",
                "bench.quicraw",
                "client",
                "--port",
                str(raw.port),
                *_quic_files(pki),
            ],
            raw.proc,
        )
    )
    plain = setups.start_python_server(procs, "rawquic-server", "bench.rawquic", pki)
    paths.append(
        ClientPath(
            "aioquic-plain",
            "raw 1-stream aioquic (plain API)",
            [
                sys.executable,
                "-m",
                "bench.rawquic",
                "client",
                "--port",
                str(plain.port),
                *_quic_files(pki),
            ],
            plain.proc,
        )
    )
    if ctx.goquic is not None:
        go = setups.start_goquic(procs, ctx.goquic, pki)
        _, cert, key = pki.agents[0]
        paths.append(
            ClientPath(
                "quic-go",
                "raw 1-stream quic-go (Go)",
                [
                    str(ctx.goquic),
                    "client",
                    "-addr",
                    f"{LOOPBACK}:{go.port}",
                    "-cert",
                    cert,
                    "-key",
                    key,
                    "-ca",
                    pki.ca,
                ],
                go.proc,
                go_flags=True,
            )
        )
    else:
        ctx.skipped["quic-go"] = ctx.goquic_note
    try:
        ssh = setups.start_ssh_tunnel(procs, ctx.workdir, backend.port)
        label = f"ssh -L ({ssh.cipher})"
        paths.append(TcpPath("ssh", label, ssh.local_port, {"ssh": ssh.ssh, "sshd": ssh.sshd}))
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        ctx.skipped["ssh"] = str(exc).splitlines()[0]
    try:
        st = setups.start_stunnel_pair(procs, ctx.workdir, pki, backend.port)
        paths.append(
            TcpPath(
                "stunnel",
                "stunnel mTLS pair",
                st.local_port,
                {"stunnel-client": st.client, "stunnel-server": st.server},
            )
        )
    except (BenchError, OSError) as exc:
        ctx.skipped["stunnel"] = str(exc).splitlines()[0]
    return paths


AGENT_BACKENDS = ("aioquic", "qh3")
"""What the agent's ``--quic-backend`` can name besides ``auto``."""


def shipped_backend() -> str:
    """The QUIC backend the agent's ``--quic-backend auto`` resolves to (read from src)."""
    try:
        from outrelay.transport.quic import backend
    except ImportError:
        return "auto"
    return str(getattr(backend, "AUTO", "auto"))


def default_agent_backends() -> tuple[str, ...]:
    """Extra bulk rows by default: every backend other than the shipped one, if importable."""
    shipped = shipped_backend()
    return tuple(b for b in AGENT_BACKENDS if b != shipped and _importable(b))


def run_bulk_and_ttfb(ctx: Ctx, *, bulk: bool, ttfb: bool) -> None:
    opts = ctx.opts
    size = opts.size_mib * MIB
    with Procs(ctx.logdir("peers")) as procs:
        paths = _start_peer_paths(ctx, procs)
        if bulk:
            say(f"bulk: {len(paths)} paths x {opts.reps} reps x {opts.size_mib} MiB")
            store: dict[str, Any] = {}
            ctx.results["bulk"] = {"size_mib": opts.size_mib, "reps": opts.reps, "paths": store}
            for path in paths:
                store[path.name] = {"label": path.label, "seconds": [], "cpu": {}}
                try:
                    path.bulk(2 * MIB)  # warm-up, not recorded
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    _record_error(store[path.name], exc)
            for rep in range(opts.reps):
                for path in paths:
                    entry = store[path.name]
                    try:
                        seconds, cpu = path.bulk(size)
                    except (BenchError, OSError, subprocess.SubprocessError) as exc:
                        _record_error(entry, exc)
                        continue
                    entry["seconds"].append(seconds)
                    entry.setdefault("rep", []).append(rep)
                    for proc, used in cpu.items():
                        entry["cpu"].setdefault(proc, []).append(used)
                say(
                    f"bulk rep {rep + 1}/{opts.reps}: "
                    + ", ".join(
                        f"{n}={size * 8 / 1e6 / e['seconds'][-1]:.0f}"
                        for n, e in store.items()
                        if e["seconds"]
                    )
                    + " Mbit/s"
                )
        if ttfb:
            say(f"ttfb: {len(paths)} paths x {opts.ttfb_count} fresh connections")
            tstore: dict[str, Any] = {}
            ctx.results["ttfb"] = {"count": opts.ttfb_count, "paths": tstore}
            for path in paths:
                tstore[path.name] = {"label": path.label, "samples": []}
                if isinstance(path, TcpPath):
                    with contextlib.suppress(BenchError, OSError):
                        path.ttfb(1)  # warm-up
            # Interleave in rounds of 5 so that a burst of outside load hits every path.
            rounds = max(1, opts.ttfb_count // 5)
            per_round = max(1, opts.ttfb_count // rounds)
            for _ in range(rounds):
                for path in paths:
                    try:
                        tstore[path.name]["samples"] += path.ttfb(per_round)
                    except (BenchError, OSError, subprocess.SubprocessError) as exc:
                        _record_error(tstore[path.name], exc)
            say(
                "ttfb medians (ms): "
                + ", ".join(
                    f"{n}={sorted(e['samples'])[len(e['samples']) // 2] * 1000:.2f}"
                    for n, e in tstore.items()
                    if e["samples"]
                )
            )


# -- QUIC client stacks (issue item 4: qh3, with and without uvloop) -------------------------


def run_stacks(ctx: Ctx) -> None:
    opts, pki = ctx.opts, ctx.pki
    size = opts.aux_size_mib * MIB
    store: dict[str, Any] = {}
    ctx.results["stacks"] = {"size_mib": opts.aux_size_mib, "reps": opts.aux_reps, "paths": store}
    have_qh3 = _importable("qh3")
    have_uvloop = _importable("uvloop")
    if not have_qh3:
        ctx.skipped["qh3"] = "qh3 not installed (pip install -e '.[bench]')"
    with Procs(ctx.logdir("stacks")) as procs:
        servers: list[tuple[str, str, Proc, int]] = []
        raw = setups.start_python_server(procs, "quicraw-server", "bench.quicraw", pki)
        servers.append(("aioquic", "orp/1", raw.proc, raw.port))
        if ctx.goquic is not None:
            go = setups.start_goquic(procs, ctx.goquic, pki)
            servers.append(("quic-go", "bench", go.proc, go.port))
        paths: list[ClientPath] = []
        for sname, alpn, sproc, port in servers:
            base = ["--port", str(port), *_quic_files(pki)]
            if sname == "aioquic":
                paths.append(
                    ClientPath(
                        f"outrelay->{sname}",
                        f"outrelay transport (aioquic) -> {sname} server",
                        [sys.executable, "-m", "bench.quicraw", "client", *base],
                        sproc,
                    )
                )
            rawquic = [sys.executable, "-m", "bench.rawquic", "client", *base, "--alpn", alpn]
            paths.append(
                ClientPath(
                    f"aioquic->{sname}",
                    f"aioquic plain client -> {sname} server",
                    [*rawquic, "--stack", "aioquic"],
                    sproc,
                )
            )
            if have_qh3:
                paths.append(
                    ClientPath(
                        f"qh3->{sname}",
                        f"qh3 client -> {sname} server",
                        [*rawquic, "--stack", "qh3"],
                        sproc,
                    )
                )
                if have_uvloop:
                    paths.append(
                        ClientPath(
                            f"qh3+uvloop->{sname}",
                            f"qh3 client on uvloop -> {sname} server",
                            [*rawquic, "--stack", "qh3", "--uvloop"],
                            sproc,
                        )
                    )
        say(f"stacks: {len(paths)} client/server pairs x up/down x {opts.aux_reps} reps")
        for path in paths:
            store[path.name] = {"label": path.label, "upload": [], "download": []}
            store[path.name]["cpu_upload"] = []
            store[path.name]["cpu_download"] = []
        for _ in range(opts.aux_reps):
            for path in paths:
                for mode in ("upload", "download"):
                    entry = store[path.name]
                    try:
                        seconds, cpu = path.bulk(size, mode)
                    except (BenchError, OSError, subprocess.SubprocessError) as exc:
                        _record_error(entry, exc)
                        continue
                    entry[mode].append(seconds)
                    entry[f"cpu_{mode}"].append(cpu["client"])


def _importable(name: str) -> bool:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {name}"],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    return proc.returncode == 0


# -- concurrency -------------------------------------------------------------------------------

CONN_TIMEOUT = 30.0
"""Per connection: connect + 1-byte echo (the agent's own open timeout is 10 s)."""


class RssSampler:
    """Peak RSS of some processes, sampled every 50 ms in a thread."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.peak = {k: p.rss() for k, p in procs.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for k, p in self.procs.items():
                self.peak[k] = max(self.peak[k], p.rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def _open_many(
    port: int, n: int, hold: bool, on_settled: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Open ``n`` connections at once; each sends 1 byte and waits for the echo.

    With ``hold`` every connection stays open until all have their echo (or
    failed); ``on_settled`` runs at that moment (RSS with everything open).
    """
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures: collections.Counter[str] = collections.Counter()
    settled = 0
    all_settled = asyncio.Event()
    release = asyncio.Event()

    async def one() -> None:
        nonlocal settled
        start = loop.time()
        writer: asyncio.StreamWriter | None = None
        ok = False
        try:
            async with asyncio.timeout(CONN_TIMEOUT):
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                writer.write(b"E")
                await writer.drain()
                await reader.readexactly(1)
            latencies.append(loop.time() - start)
            ok = True
        except TimeoutError:
            failures["timeout"] += 1
        except asyncio.IncompleteReadError:
            failures["closed/reset before echo"] += 1
        except OSError as exc:
            failures[type(exc).__name__] += 1
        settled += 1
        if settled == n:
            all_settled.set()
        try:
            if hold and ok:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CONN_TIMEOUT * 2):
                        await release.wait()
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(5):
                        await writer.wait_closed()

    start = loop.time()
    tasks = [loop.create_task(one()) for _ in range(n)]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CONN_TIMEOUT + 15):
            await all_settled.wait()
    elapsed = loop.time() - start
    snapshot = on_settled()
    release.set()
    _, pending = await asyncio.wait(tasks, timeout=20)
    for task in pending:
        task.cancel()
    return {
        "n": n,
        "completed": len(latencies),
        "failures": dict(failures),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies, default=float("nan")) * 1000,
        "wall_s": elapsed,
        "latencies_ms": sorted(x * 1000 for x in latencies),
        "at_settled": snapshot,
    }


CONCURRENCY_VARIANTS = {
    "baseline": "",
    "ring4k": "ring4k",
}
"""As shipped (1,024 streams per connection since 6a0fdff); and with resume rings
starting at 4 KiB (bench/patched.py)."""


def run_concurrency(ctx: Ctx) -> None:
    n = ctx.opts.conns
    variants: dict[str, Any] = {}
    ctx.results["concurrency"] = {"n": n, "variants": variants}
    for variant, patch in CONCURRENCY_VARIANTS.items():
        with Procs(ctx.logdir(f"concurrency-{variant}")) as procs:
            backend = setups.start_backend(procs)
            wrap = _wrap(patch) if patch else None
            o = setups.start_outrelay(procs, ctx.pki, backend.port, wrap=wrap)
            for _ in range(5):
                clients.echo_once(o.local_port)
            time.sleep(1.0)
            out: dict[str, Any] = {"rss_before": {k: p.rss() for k, p in o.procs.items()}}
            variants[variant] = out
            for mode in ("hold", "burst"):
                say(f"concurrency {variant}: {n} connections at once ({mode})")

                def snapshot(o: setups.Outrelay = o) -> dict[str, Any]:
                    return {"rss": {k: p.rss() for k, p in o.procs.items()}}

                with RssSampler(o.procs) as sampler:
                    result = asyncio.run(_open_many(o.local_port, n, mode == "hold", snapshot))
                time.sleep(2.0)
                result["rss_peak"] = sampler.peak
                result["rss_after_close"] = {k: p.rss() for k, p in o.procs.items()}
                out[mode] = result
                say(
                    f"concurrency {variant} {mode}: {result['completed']}/{n} completed, "
                    f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                    f"failures {result['failures']}"
                )
                # Let the agents forget the previous round before the next one.
                setups.wait_path(o.local_port, 30.0, list(o.procs.values()))
            out["log_warnings"] = {k: _count_levels(p.text()) for k, p in o.procs.items()}
            out["log_samples"] = {k: _first_warnings(p.text()) for k, p in o.procs.items()}


def _count_levels(text: str) -> dict[str, int]:
    levels = collections.Counter(re.findall(r"level=(WARN|ERROR)", text))
    return dict(levels)


def _first_warnings(text: str, limit: int = 3) -> list[str]:
    seen: dict[str, str] = {}
    for line in text.splitlines():
        match = re.search(r'level=(?:WARN|ERROR) msg="([^"]*)"', line)
        if match and match.group(1) not in seen:
            seen[match.group(1)] = line[:300]
    return list(seen.values())[:limit]


# -- resume --------------------------------------------------------------------------------------

RESUMED = re.compile(r'msg="session: stream resumed".*?retransmitted=(\d+).*?stall_ms=(\d+)')
LOST = re.compile(r'msg="session: lost; reconnecting".*?reason=("[^"]*"|\S+)')


RESUME_VARIANTS = {"baseline": ""}
"""Resume runs as shipped (the ``fastdead`` patch is in src since 6a0fdff)."""


def run_resume(ctx: Ctx) -> None:
    opts = ctx.opts
    rate = int(opts.resume_rate_mib * MIB)
    size = int(rate * opts.resume_seconds)
    kill_at, down_for = 3.0, 2.0
    runs: list[dict[str, Any]] = []
    ctx.results["resume"] = {
        "rate_mib_s": opts.resume_rate_mib,
        "size_mib": size / MIB,
        "kill_at_s": kill_at,
        "down_s": down_for,
        "runs": runs,
    }
    for variant, patch in RESUME_VARIANTS.items():
        with Procs(ctx.logdir(f"resume-{variant}")) as procs:
            backend = setups.start_backend(procs)
            wrap = None
            if patch:
                wrap = {k: v for k, v in _wrap(patch).items() if k != "relay"}
            o = setups.start_outrelay(procs, ctx.pki, backend.port, log_level="info", wrap=wrap)
            for rep in range(opts.resume_reps):
                say(
                    f"resume {variant} rep {rep + 1}/{opts.resume_reps}: {size / MIB:.0f} MiB at "
                    f"{opts.resume_rate_mib:g} MiB/s, SIGKILL relay at {kill_at:g}s, "
                    f"restart {down_for:g}s later"
                )
                run = _resume_once(procs, o, size, rate, kill_at, down_for, opts.resume_seconds)
                run["variant"] = variant
                runs.append(run)
                say(
                    f"resume {variant} rep {rep + 1}: app stall "
                    f"{run.get('max_gap_ms', float('nan')):.0f} ms, intact={run.get('intact')}, "
                    f"agent lines={run['resumed']}"
                )
                if rep + 1 < opts.resume_reps:
                    setups.wait_path(o.local_port, 60.0, list(o.procs.values()))


def _resume_once(
    procs: Procs,
    o: setups.Outrelay,
    size: int,
    rate: int,
    kill_at: float,
    down_for: float,
    duration: float,
) -> dict[str, Any]:
    marks = {k: len(o.procs[k].text()) for k in ("consumer", "provider")}
    holder: list[clients.DownloadResult] = []
    thread = threading.Thread(
        target=lambda: holder.append(clients.download_with_gaps(o.local_port, size, rate, 60)),
        daemon=True,
    )
    start = time.monotonic()
    thread.start()
    time.sleep(kill_at)
    procs.kill(o.relay)
    killed = time.monotonic() - start
    time.sleep(down_for)
    o.relay = procs.start("relay", o.relay_argv)
    setups.wait_udp(o.relay, o.relay_port, 15.0)
    restarted = time.monotonic() - start
    thread.join(timeout=duration + 120)
    run: dict[str, Any] = {"killed_at": killed, "restarted_at": restarted}
    if not holder:
        run["error"] = "download did not finish in time"
    else:
        res = holder[0]
        run.update(
            received=res.received,
            expected=size,
            intact=res.intact and res.received == size,
            max_gap_ms=res.max_gap * 1000,
            gap_at_s=res.gap_at,
            seconds=res.seconds,
            error=res.error,
            timeline=res.timeline,
        )
    resumed = []
    detected = []
    for k in ("consumer", "provider"):
        text = o.procs[k].text()[marks[k] :]
        for m in RESUMED.finditer(text):
            resumed.append(
                {"agent": k, "retransmitted": int(m.group(1)), "stall_ms": int(m.group(2))}
            )
        for m in LOST.finditer(text):
            detected.append({"agent": k, "reason": m.group(1)})
    run["resumed"] = resumed
    run["lost"] = detected
    return run


# -- agent QUIC backends and uvloop, end to end (issue 6 item 4) ---------------------------

BACKEND_VARIANTS: dict[str, tuple[str, list[str], bool]] = {
    # name: (transport, agent flags, agents on uvloop); the relay is always plain.
    "aioquic": ("quic", ["--quic-backend", "aioquic"], False),
    "qh3": ("quic", ["--quic-backend", "qh3"], False),
    "qh3+uvloop": ("quic", ["--quic-backend", "qh3"], True),
    "tcp": ("tcp", [], False),
    "tcp+uvloop": ("tcp", [], True),
}


def _agents_on_uvloop() -> dict[str, list[str]]:
    return {k: v for k, v in _wrap("uvloop").items() if k != "relay"}


def run_backends(ctx: Ctx) -> None:
    """The agents on aioquic vs qh3 vs qh3+uvloop (and TCP vs TCP+uvloop), same run.

    End to end through a relay (always aioquic, plain asyncio): bulk and TTFB
    interleaved per repetition, then the resume scenario once per QUIC variant.
    """
    opts = ctx.opts
    size = opts.aux_size_mib * MIB
    store: dict[str, Any] = {}
    ctx.results["backends"] = {"size_mib": opts.aux_size_mib, "reps": opts.reps, "paths": store}
    variants = dict(BACKEND_VARIANTS)
    if not _importable("qh3"):
        ctx.skipped["backends qh3"] = "qh3 not installed"
        variants = {k: v for k, v in variants.items() if "qh3" not in k}
    if not _importable("uvloop"):
        ctx.skipped["backends uvloop"] = "uvloop not installed"
        variants = {k: v for k, v in variants.items() if "uvloop" not in k}
    with Procs(ctx.logdir("backends")) as procs:
        backend = setups.start_backend(procs)
        paths: list[TcpPath] = []
        for name, (transport, flags, uv) in variants.items():
            say(f"backends: starting relay + agents ({name})")
            try:
                o = setups.start_outrelay(
                    procs,
                    ctx.pki,
                    backend.port,
                    transport=transport,
                    agent_args=flags,
                    wrap=_agents_on_uvloop() if uv else None,
                )
            except BenchError as exc:
                ctx.skipped[f"backends {name}"] = str(exc).splitlines()[0]
                continue
            paths.append(TcpPath(name, f"agents on {name}", o.local_port, o.procs))
            store[name] = {"label": name, "seconds": [], "cpu": {}, "ttfb": []}
        for path in paths:
            with contextlib.suppress(BenchError, OSError):
                path.bulk(2 * MIB)  # warm-up
        for rep in range(opts.reps):
            for path in paths:
                entry = store[path.name]
                try:
                    seconds, cpu = path.bulk(size)
                    entry["ttfb"] += path.ttfb(max(1, opts.ttfb_count // opts.reps))
                except (BenchError, OSError) as exc:
                    _record_error(entry, exc)
                    continue
                entry["seconds"].append(seconds)
                for proc, used in cpu.items():
                    entry["cpu"].setdefault(proc, []).append(used)
            say(
                f"backends rep {rep + 1}/{opts.reps}: "
                + ", ".join(
                    f"{n}={size * 8 / 1e6 / e['seconds'][-1]:.0f}"
                    for n, e in store.items()
                    if e["seconds"]
                )
                + " Mbit/s"
            )
    for entry in store.values():
        secs = sorted(entry["seconds"])
        samples = sorted(entry["ttfb"])
        if secs:
            entry["mbps"] = size * 8 / 1e6 / secs[len(secs) // 2]
        if samples:
            entry["ttfb_ms"] = samples[len(samples) // 2] * 1000
        for proc, used in entry["cpu"].items():
            entry.setdefault("cpu_s_per_gib", {})[proc] = sorted(used)[len(used) // 2] / (
                size / GIB
            )
    _backends_resume(ctx, variants)
    say("backends summary: " + json.dumps({n: _brief(e) for n, e in store.items()}))


def _brief(entry: dict[str, Any]) -> dict[str, Any]:
    out = {k: round(entry[k], 2) for k in ("mbps", "ttfb_ms") if k in entry}
    out["cpu_s_per_gib"] = {k: round(v, 2) for k, v in entry.get("cpu_s_per_gib", {}).items()}
    if entry.get("errors"):
        out["errors"] = entry["errors"][:2]
    return out


def _backends_resume(ctx: Ctx, variants: dict[str, tuple[str, list[str], bool]]) -> None:
    opts = ctx.opts
    rate = int(opts.resume_rate_mib * MIB)
    size = int(rate * opts.resume_seconds)
    runs: list[dict[str, Any]] = []
    ctx.results["backends"]["resume"] = runs
    for name, (transport, flags, uv) in variants.items():
        if transport != "quic":
            continue
        with Procs(ctx.logdir(f"backends-resume-{name}")) as procs:
            backend = setups.start_backend(procs)
            o = setups.start_outrelay(
                procs,
                ctx.pki,
                backend.port,
                log_level="info",
                agent_args=flags,
                wrap=_agents_on_uvloop() if uv else None,
            )
            for rep in range(opts.resume_reps):
                run = _resume_once(procs, o, size, rate, 3.0, 2.0, opts.resume_seconds)
                run["variant"] = name
                run.pop("timeline", None)
                runs.append(run)
                say(
                    f"backends resume {name} rep {rep + 1}: app stall "
                    f"{run.get('max_gap_ms', float('nan')):.0f} ms, intact={run.get('intact')}, "
                    f"received={run.get('received')}/{size}"
                )
                if rep + 1 < opts.resume_reps:
                    setups.wait_path(o.local_port, 60.0, list(o.procs.values()))


# -- experiments: candidate src changes, applied at run time -----------------------------------

VARIANTS = [
    "",
    "nocopy",
    "gso",
    "dgram1350",
    "dgram4096",
    "dgram9000",
]
"""``batchrx`` and ``coalesce`` are in src (c0d973e, 6a0fdff)."""


def _wrap(patch: str, profile_dir: Path | None = None) -> dict[str, list[str]]:
    out = {}
    for role in ("relay", "provider", "consumer"):
        argv = [sys.executable, "-m", "bench.patched", "--patch", patch]
        if profile_dir is not None:
            argv += ["--cprofile", str(profile_dir / f"{role}.prof")]
        out[role] = [*argv, "relay" if role == "relay" else "agent", "--"]
    return out


def run_experiments(ctx: Ctx) -> None:
    opts = ctx.opts
    size = opts.aux_size_mib * MIB
    store: dict[str, Any] = {}
    ctx.results["experiments"] = {
        "size_mib": opts.aux_size_mib,
        "reps": opts.aux_reps,
        "variants": store,
    }
    with Procs(ctx.logdir("experiments")) as procs:
        backend = setups.start_backend(procs)
        paths: list[TcpPath | ClientPath] = []
        for patch in VARIANTS:
            o = setups.start_outrelay(procs, ctx.pki, backend.port, wrap=_wrap(patch))
            paths.append(TcpPath(patch or "baseline", "agent path", o.local_port, o.procs))
        # The ceiling with the shipped transport (batched reads are in src).
        for patch in ("",):
            name = "ceiling" + (f"+{patch}" if patch else "")
            port = free_port(socket.SOCK_DGRAM)
            server = procs.start(
                name,
                [sys.executable, "-m", "bench.quicraw", "server", "--port", str(port)]
                + ["--cert", ctx.pki.relay_cert, "--key", ctx.pki.relay_key, "--ca", ctx.pki.ca]
                + (["--patch", patch] if patch else []),
            )
            server.wait_log("ready", 30)
            argv = [sys.executable, "-m", "bench.quicraw", "client", "--port", str(port)]
            argv += _quic_files(ctx.pki) + (["--patch", patch] if patch else [])
            paths.append(ClientPath(name, "raw 1-stream aioquic", argv, server))
        for path in paths:
            store[path.name] = {"seconds": [], "cpu": {}}
            with contextlib.suppress(BenchError, OSError, subprocess.SubprocessError):
                path.bulk(2 * MIB)
        say(f"experiments: {len(paths)} variants x {opts.aux_reps} reps x {opts.aux_size_mib} MiB")
        for _ in range(opts.aux_reps):
            for path in paths:
                entry = store[path.name]
                try:
                    seconds, cpu = path.bulk(size)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    _record_error(entry, exc)
                    continue
                entry["seconds"].append(seconds)
                for proc, used in cpu.items():
                    entry["cpu"].setdefault(proc, []).append(used)


# -- profile -------------------------------------------------------------------------------------


CATEGORIES = [
    ("crypto: AEAD and header protection", ("aioquic/_crypto", "aioquic/quic/crypto.py")),
    (
        "UDP send/receive system calls",
        ("_SelectorDatagramTransport.sendto", "_SelectorDatagramTransport._read_ready"),
    ),
    ("TCP socket I/O (app/backend side)", ("_SelectorSocketTransport",)),
    ("aioquic: packet building, ACK/loss recovery, frame parsing", ("aioquic/",)),
    ("outrelay code (transport/quic.py, splice, resume ring, ...)", ("outrelay/",)),
    ("asyncio event loop and tasks", ("asyncio/", "selectors.py")),
]
IDLE_LEAF = "EpollSelector.select"


def _category(leaf: str) -> str:
    for name, markers in CATEGORIES:
        if any(m in leaf for m in markers):
            return name
    return "other"


def _collapse(raw: Path) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> shares per function, per category, idle.

    A sample whose leaf frame is the selector's ``select`` is the event loop
    waiting for I/O (idle); shares are of the busy samples.
    """
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        if frames[-1].startswith(IDLE_LEAF):
            idle += n
            continue
        own[frames[-1]] += n
        cats[_category(frames[-1])] += n
        for frame in set(frames):
            incl[frame] += n
    busy = total - idle
    if not busy:
        return {"samples": total, "idle": 1.0, "self": [], "inclusive": [], "categories": []}
    return {
        "samples": total,
        "idle": idle / total,
        "self": [(k, v / busy) for k, v in own.most_common(25)],
        "inclusive": [(k, v / busy) for k, v in incl.most_common(60)],
        "categories": [(k, v / busy) for k, v in cats.most_common()],
    }


def _frame_name(frame: str) -> str:
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    path = match.group(2)
    for marker in ("site-packages/", "/src/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = path.split("/", 1)[-1]
            break
    return f"{match.group(1)} ({path})"


def run_profile(ctx: Ctx) -> None:
    seconds = ctx.opts.profile_seconds
    out_dir = ctx.workdir / "profile"
    out_dir.mkdir(exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    use_py_spy = Path(py_spy).exists()
    result: dict[str, Any] = {"tool": "py-spy" if use_py_spy else "cProfile", "procs": {}}
    ctx.results["profile"] = result
    with Procs(ctx.logdir("profile")) as procs:
        backend = setups.start_backend(procs)
        wrap = None if use_py_spy else _wrap("", out_dir)
        o = setups.start_outrelay(procs, ctx.pki, backend.port, wrap=wrap)
        clients.upload(o.local_port, 4 * MIB)
        spies: dict[str, Proc] = {}
        if use_py_spy:
            for k, p in o.procs.items():
                spies[k] = procs.start(
                    f"py-spy-{k}",
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(p.pid),
                        "--duration",
                        str(seconds),
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--format",
                        "raw",
                        "-o",
                        str(out_dir / f"{k}.raw"),
                    ],
                )
            time.sleep(0.5)
        say(f"profile ({result['tool']}): bulk uploads for {seconds}s")
        moved = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            clients.upload(o.local_port, 8 * MIB)
            moved += 8 * MIB
        result["moved_mib"] = moved / MIB
        if use_py_spy:
            for k, spy in spies.items():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.popen.wait(30)
                raw = out_dir / f"{k}.raw"
                if raw.exists():
                    result["procs"][k] = _collapse(raw)
                else:
                    result["procs"][k] = {"error": spy.tail(5)}
        else:
            for k, p in o.procs.items():
                procs.stop(p, timeout=20)
                prof = out_dir / f"{k}.prof"
                if prof.exists():
                    result["procs"][k] = _pstats(prof)


def _pstats(path: Path) -> dict[str, Any]:
    import pstats

    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    rows = [(f"{fn} ({Path(file).name}:{line})", v[2], v[3]) for (file, line, fn), v in raw.items()]
    return {
        "samples": total,
        "self": [(name, t / total) for name, t, _ in sorted(rows, key=lambda r: -r[1])[:25]],
        "inclusive": [(name, c / total) for name, _, c in sorted(rows, key=lambda r: -r[2])[:60]],
    }
