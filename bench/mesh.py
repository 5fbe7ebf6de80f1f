"""The ``mesh`` scenario (issue 18 item 6): many relays on etcd against one relay.

Measured, all on 127.0.0.1:

* **forwarded vs single**: TTFB (fresh connection + 1-byte echo), opens/s (a burst of fresh
  connections opened at once, completed ÷ wall time) and bulk throughput (upload to the
  sink) through ``consumer -> r1 -> r2 -> provider`` (two relays on a one-member etcd,
  the provider registered on r2, so every open is forwarded r1 -> r2), and through the
  usual single relay (in-memory registry, :func:`bench.setups.start_outrelay`). Paths are
  interleaved within each repetition, as in ``bulk``; the report gives the ratios;
* **registry resolve**: the in-process cost of the mesh cache's lookup
  (``MeshCache.remote_providers``: what an open on an etcd relay calls to find a provider on
  another relay, answered from the watched cache), a microbenchmark over a cache holding many
  services on many relays;
* **cross-relay failover stall**: a paced download through ``r1 -> r3``, the provider
  dialling ``--relay r3,r2``; r3 is SIGKILLed mid-download and never returns, the provider
  fails over to r2 and the two resume halves meet through the registry. The longest gap
  the application saw, whether every byte arrived intact, and the agents' ``stream
  resumed`` lines (stall_ms) are recorded.

etcd is Debian's ``/usr/bin/etcd`` (one member: the benchmark measures the data path, the
e2e tests cover a three-member cluster); without it the scenario is skipped with the reason.
Every process goes through :class:`~bench.common.Procs`, so it is stopped on any error.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import clients, setups
from bench.common import (
    LOOPBACK,
    BenchError,
    Proc,
    Procs,
    free_port,
    median,
    percentile,
    venv_script,
)
from bench.scenarios import LOST, RESUMED, Ctx, _open_many, say
from bench.setups import READY_TIMEOUT, Pki, wait_path, wait_tcp, wait_udp

__all__ = ["headline", "markdown", "run_mesh", "summarise"]

MIB = 1 << 20
TENANT = "acme"
ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
RELAYS = {"r1": "eu-west", "r2": "us-east", "r3": "ap-south"}
"""Relay id -> region; distinct regions (no region preference helps the forwarded path)."""
RESOLVE_RELAYS = 16
RESOLVE_SERVICES = 2_000
"""The resolve microbenchmark's cache: this many services, each on every one of that many
relays (plus a few lookups of names nobody provides)."""


# -- processes ---------------------------------------------------------------------------------


def _etcd_binary() -> str:
    found = shutil.which("etcd") or (ETCD if Path(ETCD).exists() else None)
    if found is None:
        raise BenchError("etcd not installed (apt-get install etcd-server etcd-client)")
    return found


def start_etcd(procs: Procs, datadir: Path) -> str:
    """A one-member etcd on loopback; returns ``etcd://127.0.0.1:<client port>`` once healthy."""
    binary = _etcd_binary()
    client, peer = free_port(), free_port()
    datadir.mkdir(parents=True, exist_ok=True)
    proc = procs.start(
        "etcd",
        [
            binary,
            "--name", "bench",
            "--data-dir", str(datadir / "bench.etcd"),
            "--listen-client-urls", f"http://{LOOPBACK}:{client}",
            "--advertise-client-urls", f"http://{LOOPBACK}:{client}",
            "--listen-peer-urls", f"http://{LOOPBACK}:{peer}",
            "--initial-advertise-peer-urls", f"http://{LOOPBACK}:{peer}",
            "--initial-cluster", f"bench=http://{LOOPBACK}:{peer}",
            "--initial-cluster-state", "new",
            "--logger", "zap", "--log-level", "error",
        ],
    )  # fmt: skip
    wait_tcp(client, READY_TIMEOUT, proc)
    ctl = shutil.which("etcdctl") or ETCDCTL
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        done = subprocess.run(
            [ctl, f"--endpoints=http://{LOOPBACK}:{client}", "endpoint", "health"],
            capture_output=True,
            text=True,
            timeout=10,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
            check=False,
        )
        if done.returncode == 0:
            return f"etcd://{LOOPBACK}:{client}"
        if not proc.alive or time.monotonic() > deadline:
            raise BenchError(f"etcd not healthy: {done.stderr.strip()[-300:]}\n{proc.tail()}")
        time.sleep(0.2)


def relay_cert(pki: Pki, relay_id: str, region: str) -> tuple[str, str]:
    """``outrelay pki relay`` from the run's dev CA: outrelay://<region>/relay/<relay_id>."""
    out = pki.dir / "relays" / relay_id
    subprocess.run(
        [
            venv_script("outrelay"), "pki", "relay", "--ca-dir", str(pki.dir),
            "--out", str(out), "--region", region, "--id", relay_id, "--force",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return str(out / "relay.crt"), str(out / "relay.key")


@dataclass
class MeshRelay:
    relay_id: str
    proc: Proc
    port: int
    argv: list[str]

    @property
    def addr(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def start_mesh_relay(
    procs: Procs, pki: Pki, relay_id: str, registry: str, *, log_level: str
) -> MeshRelay:
    cert, key = relay_cert(pki, relay_id, RELAYS[relay_id])
    port = free_port(socket.SOCK_DGRAM)
    argv = [
        venv_script("outrelay-relay"),
        "--listen", f"{LOOPBACK}:{port}",
        "--cert", cert, "--key", key, "--ca", pki.ca,
        "--relay-id", relay_id, "--region", RELAYS[relay_id],
        "--registry", registry,
        "--log-level", log_level,
    ]  # fmt: skip
    proc = procs.start(relay_id, argv)
    wait_udp(proc, port, READY_TIMEOUT)
    return MeshRelay(relay_id, proc, port, argv)


def start_agent(
    procs: Procs,
    pki: Pki,
    name: str,
    index: int,
    relays: str,
    role: list[str],
    *,
    log_level: str,
) -> Proc:
    uri, cert, key = pki.agents[index]
    argv = [venv_script("outrelay-agent"), "--relay", relays, "--uri", uri]
    argv += ["--cert", cert, "--key", key, "--ca", pki.ca, "--log-level", log_level, *role]
    return procs.start(name, argv)


@dataclass
class MeshPath:
    """Where applications connect, and the processes between them and the backend."""

    name: str
    label: str
    port: int
    procs: dict[str, Proc]


# -- forwarded vs single relay ---------------------------------------------------------------


def _start_forwarded(ctx: Ctx, procs: Procs, backend_port: int, registry: str) -> MeshPath:
    r1 = start_mesh_relay(procs, ctx.pki, "r1", registry, log_level="warn")
    r2 = start_mesh_relay(procs, ctx.pki, "r2", registry, log_level="warn")
    local = free_port()
    provider = start_agent(
        procs,
        ctx.pki,
        "provider",
        0,
        r2.addr,
        ["--expose", f"bench={LOOPBACK}:{backend_port}"],
        log_level="warn",
    )
    consumer = start_agent(
        procs,
        ctx.pki,
        "consumer",
        1,
        r1.addr,
        ["--consume", f"bench@{LOOPBACK}:{local}"],
        log_level="warn",
    )
    wait_tcp(local, READY_TIMEOUT, consumer)
    wait_path(local, READY_TIMEOUT, [r1.proc, r2.proc, provider, consumer])
    return MeshPath(
        "forwarded",
        "consumer -> r1 -> r2 -> provider (etcd registry)",
        local,
        {"consumer": consumer, "r1": r1.proc, "r2": r2.proc, "provider": provider},
    )


def _open_burst(port: int, n: int) -> dict[str, Any]:
    result = asyncio.run(_open_many(port, n, False, dict))
    result.pop("at_settled", None)
    result["opens_per_s"] = result["completed"] / result["wall_s"] if result["wall_s"] else 0.0
    return result


def _compare(ctx: Ctx, paths: list[MeshPath], store: dict[str, Any]) -> None:
    opts = ctx.opts
    size = opts.size_mib * MIB
    burst = 50 if opts.quick else 200
    store["size_mib"], store["reps"], store["burst"] = opts.size_mib, opts.reps, burst
    rows: dict[str, Any] = store.setdefault("paths", {})
    for path in paths:
        rows[path.name] = {"label": path.label, "ttfb": [], "opens": [], "bulk_s": []}
        clients.echo_once(path.port)  # warm-up
    say(
        f"mesh: {len(paths)} paths x {opts.reps} reps: {opts.ttfb_count} TTFB samples, "
        f"a burst of {burst} opens, {opts.size_mib} MiB upload"
    )
    for rep in range(opts.reps):
        for path in paths:
            row = rows[path.name]
            try:
                row["ttfb"] += [clients.echo_once(path.port) for _ in range(opts.ttfb_count)]
                row["opens"].append(_open_burst(path.port, burst))
                row["bulk_s"].append(clients.upload(path.port, size))
            except (BenchError, OSError) as exc:
                row.setdefault("errors", []).append(str(exc)[:300])
        say(
            f"mesh rep {rep + 1}/{opts.reps}: "
            + ", ".join(
                f"{n} ttfb {median(r['ttfb']) * 1000:.2f} ms, "
                f"{r['opens'][-1]['opens_per_s'] if r['opens'] else float('nan'):.0f} opens/s, "
                f"{size * 8 / 1e6 / r['bulk_s'][-1] if r['bulk_s'] else float('nan'):.0f} Mbit/s"
                for n, r in rows.items()
            )
        )


# -- registry resolve (in-process) -------------------------------------------------------------


def resolve_microbench(lookups: int) -> dict[str, Any]:
    """Time ``remote_providers`` on the etcd relay's cache holding many services on many
    relays (:class:`outrelay.relay.mesh.cache.MeshCache`, what ``EtcdMesh.remote_providers``
    answers from, with no I/O); per-lookup time, in batches of 100."""
    view, names = _filled_cache(RESOLVE_RELAYS, RESOLVE_SERVICES)
    samples: list[float] = []
    found = 0
    per_batch = 100
    for i in range(0, lookups, per_batch):
        batch = [names[(i + j) * 7919 % len(names)] for j in range(per_batch)]
        t0 = time.perf_counter()
        for name in batch:
            found += bool(view.remote_providers(TENANT, name))
        samples.append((time.perf_counter() - t0) / per_batch)
    return {
        "relays": RESOLVE_RELAYS,
        "services": RESOLVE_SERVICES,
        "lookups": lookups,
        "hits": found,
        "median_us": median(samples) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "what": type(view).__name__,
    }


def _filled_cache(relays: int, services: int) -> tuple[Any, list[str]]:
    """Relay 0's :class:`MeshCache` after a snapshot in which every other relay provides
    every service (one agent each); returns it and the names to look up (two unknown)."""
    from outrelay.relay.mesh import ProviderRecord, RelayRecord
    from outrelay.relay.mesh.cache import (
        EventKind,
        KeyLayout,
        MeshCache,
        WatchEvent,
        provider_value,
        relay_value,
    )

    layout = KeyLayout()
    events: list[WatchEvent] = []
    revision = 0

    def put(key: str, value: bytes) -> None:
        nonlocal revision
        revision += 1
        events.append(WatchEvent(EventKind.PUT, key.encode(), value, revision, revision))

    names = [f"svc-{k}" for k in range(services)]
    for i in range(relays):
        rid, region = f"relay-{i}", "eu" if i % 2 else "us"
        put(layout.relay(rid), relay_value(RelayRecord(rid, region, f"127.0.0.1:{7000 + i}")))
        if i == 0:
            continue
        for k, name in enumerate(names):
            uri = f"outrelay://{TENANT}/agent/{i:04d}{k:08d}"
            record = ProviderRecord(TENANT, name, uri, rid, region, "", 1_700_000_000_000 + k)
            put(layout.service(TENANT, name, rid, uri), provider_value(record))
    cache = MeshCache(layout, "relay-0", "us")
    cache.load_snapshot(events, revision)
    return cache, [*names, "nobody-1", "nobody-2"]


# -- cross-relay failover --------------------------------------------------------------------


def _failover_once(ctx: Ctx, procs: Procs, backend_port: int, registry: str) -> dict[str, Any]:
    opts = ctx.opts
    relays = {
        rid: start_mesh_relay(procs, ctx.pki, rid, registry, log_level="info")
        for rid in ("r1", "r2", "r3")
    }
    local = free_port()
    provider = start_agent(
        procs,
        ctx.pki,
        "provider",
        0,
        f"{relays['r3'].addr},{relays['r2'].addr}",
        ["--expose", f"bench={LOOPBACK}:{backend_port}"],
        log_level="info",
    )
    consumer = start_agent(
        procs,
        ctx.pki,
        "consumer",
        1,
        relays["r1"].addr,
        ["--consume", f"bench@{LOOPBACK}:{local}"],
        log_level="info",
    )
    wait_tcp(local, READY_TIMEOUT, consumer)
    wait_path(local, READY_TIMEOUT, [*(r.proc for r in relays.values()), provider, consumer])
    rate = int(opts.resume_rate_mib * MIB)
    size = int(rate * opts.resume_seconds)
    kill_at = 3.0
    holder: list[clients.DownloadResult] = []
    thread = threading.Thread(
        target=lambda: holder.append(clients.download_with_gaps(local, size, rate, 60)),
        daemon=True,
    )
    start = time.monotonic()
    thread.start()
    time.sleep(kill_at)
    procs.kill(relays["r3"].proc)
    killed = time.monotonic() - start
    thread.join(timeout=opts.resume_seconds + 120)
    run: dict[str, Any] = {"killed_at": killed, "expected": size}
    if not holder:
        run["error"] = "download did not finish in time"
    else:
        res = holder[0]
        run.update(
            received=res.received,
            intact=res.intact and res.received == size,
            max_gap_ms=res.max_gap * 1000,
            gap_at_s=res.gap_at,
            seconds=res.seconds,
            error=res.error,
        )
    run["resumed"] = [
        {"agent": name, "retransmitted": int(m.group(1)), "stall_ms": int(m.group(2))}
        for name, proc in (("consumer", consumer), ("provider", provider))
        for m in RESUMED.finditer(proc.text())
    ]
    run["lost"] = [
        {"agent": name, "reason": m.group(1)}
        for name, proc in (("consumer", consumer), ("provider", provider))
        for m in LOST.finditer(proc.text())
    ]
    return run


# -- the scenario ------------------------------------------------------------------------------


def run_mesh(ctx: Ctx) -> None:
    opts = ctx.opts
    out: dict[str, Any] = {}
    ctx.results["mesh"] = out
    lookups = 20_000 if opts.quick else 200_000
    say(f"mesh: registry resolve, {lookups} lookups")
    try:
        out["resolve"] = resolve_microbench(lookups)
    except (ImportError, AttributeError, TypeError) as exc:
        out["resolve"] = {"error": f"{type(exc).__name__}: {exc}"}
    with Procs(ctx.logdir("mesh")) as procs:
        registry = start_etcd(procs, ctx.workdir / "etcd-compare")
        backend = setups.start_backend(procs)
        say("mesh: starting a single relay, and r1 + r2 on etcd")
        single = setups.start_outrelay(procs, ctx.pki, backend.port)
        paths = [
            MeshPath("single", "consumer -> relay -> provider (one relay)", single.local_port, {}),
            _start_forwarded(ctx, procs, backend.port, registry),
        ]
        _compare(ctx, paths, out)
    runs: list[dict[str, Any]] = []
    out["failover"] = {
        "rate_mib_s": opts.resume_rate_mib,
        "size_mib": opts.resume_rate_mib * opts.resume_seconds,
        "runs": runs,
    }
    for rep in range(opts.resume_reps):
        say(f"mesh failover {rep + 1}/{opts.resume_reps}: r1 -> r3, r3 SIGKILLed at 3 s")
        with Procs(ctx.logdir(f"mesh-failover-{rep + 1}")) as procs:
            registry = start_etcd(procs, ctx.workdir / f"etcd-failover-{rep + 1}")
            backend = setups.start_backend(procs)
            run = _failover_once(ctx, procs, backend.port, registry)
        runs.append(run)
        say(
            f"mesh failover {rep + 1}: app stall {run.get('max_gap_ms', float('nan')):.0f} ms, "
            f"intact={run.get('intact')}, agents: {run['resumed']}"
        )


# -- report ----------------------------------------------------------------------------------


def _f(x: Any, digits: int = 0) -> str:
    if isinstance(x, int | float) and x == x:
        return f"{x:,.{digits}f}"
    return "–"


def summarise(mesh: dict[str, Any]) -> dict[str, Any]:
    """Medians per path and the forwarded/single ratios."""
    size = mesh.get("size_mib", 0) * MIB
    rows: dict[str, Any] = {}
    for name, r in mesh.get("paths", {}).items():
        opens = [o["opens_per_s"] for o in r["opens"]]
        rows[name] = {
            "label": r["label"],
            "ttfb_ms": median(x * 1000 for x in r["ttfb"]),
            "ttfb_p90_ms": percentile([x * 1000 for x in r["ttfb"]], 90),
            "opens_per_s": median(opens),
            "open_p50_ms": median(o["p50_ms"] for o in r["opens"]),
            "open_failures": sum(sum(o["failures"].values()) for o in r["opens"]),
            "mbps": median(size * 8 / 1e6 / s for s in r["bulk_s"]) if size else float("nan"),
            "errors": r.get("errors", []),
        }
    ratios: dict[str, float] = {}
    f, s = rows.get("forwarded"), rows.get("single")
    if f and s:
        ratios = {
            "bulk": f["mbps"] / s["mbps"],
            "opens_per_s": f["opens_per_s"] / s["opens_per_s"],
            "ttfb": f["ttfb_ms"] / s["ttfb_ms"],
        }
    return {"paths": rows, "ratios": ratios}


def markdown(results: dict[str, Any]) -> list[str]:
    mesh = results.get("mesh")
    if not mesh:
        return []
    summary = summarise(mesh)
    lines = [
        "",
        "## Many relays (issue 18): forwarded path vs one relay, resolve, failover",
        "",
        f"Two relays on a one-member etcd, provider on r2, consumer on r1 (every open forwarded "
        f"r1 -> r2), against one relay with the in-memory registry; {mesh.get('reps', 0)} reps "
        f"interleaved. TTFB = fresh connection + 1-byte echo; opens/s = a burst of "
        f"{mesh.get('burst', 0)} fresh connections at once, completed ÷ wall time; bulk = "
        f"{mesh.get('size_mib', 0)} MiB upload.",
        "",
        "| path | TTFB median ms | TTFB p90 ms | opens/s | open p50 ms (burst) "
        "| open failures | bulk Mbit/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["paths"].values():
        err = f" ({len(row['errors'])} errors)" if row["errors"] else ""
        lines.append(
            f"| {row['label']}{err} | {_f(row['ttfb_ms'], 2)} | {_f(row['ttfb_p90_ms'], 2)} "
            f"| {_f(row['opens_per_s'])} | {_f(row['open_p50_ms'], 1)} | {row['open_failures']} "
            f"| {_f(row['mbps'])} |"
        )
    ratios = summary["ratios"]
    if ratios:
        lines += [
            "",
            f"Forwarded ÷ single relay: bulk **{_f(ratios['bulk'], 2)}×**, opens/s "
            f"**{_f(ratios['opens_per_s'], 2)}×**, TTFB {_f(ratios['ttfb'], 2)}×.",
        ]
    res = mesh.get("resolve", {})
    if "median_us" in res:
        lines += [
            "",
            f"Registry resolve (`{res['what']}.remote_providers`, in process, "
            f"{res['services']:,} services on each of {res['relays'] - 1} other relays, "
            f"{res['lookups']:,} "
            f"lookups): median **{_f(res['median_us'], 2)} µs**, p99 {_f(res['p99_us'], 2)} µs "
            "per lookup (no etcd round trip: relays resolve from their watched cache).",
        ]
    elif res:
        lines += ["", f"Registry resolve: not measured ({res.get('error', '?')})."]
    fo = mesh.get("failover", {})
    if fo.get("runs"):
        lines += [
            "",
            f"Cross-relay failover: paced download ({fo['size_mib']:.0f} MiB at "
            f"{fo['rate_mib_s']:g} MiB/s) through r1 -> r3; r3 SIGKILLed at 3 s and never "
            "restarted; the provider (`--relay r3,r2`) fails over to r2.",
            "",
            "| run | app stall (longest gap) ms | bytes intact | agents' `stream resumed` "
            "(retransmitted B / stall ms) |",
            "|---|---:|---|---|",
        ]
        for i, r in enumerate(fo["runs"], 1):
            agents = (
                "; ".join(
                    f"{x['agent']}: {x['retransmitted']} B / {x['stall_ms']} ms"
                    for x in r.get("resumed", [])
                )
                or "none"
            )
            intact = (
                "yes"
                if r.get("intact")
                else f"**no** ({r.get('received', 0)}/{r.get('expected', 0)} B "
                f"{r.get('error', '')})"
            )
            lines.append(f"| {i} | {_f(r.get('max_gap_ms'))} | {intact} | {agents} |")
    return lines


def headline(results: dict[str, Any]) -> list[str]:
    """One row for BENCHMARKS.md's latest-run table."""
    mesh = results.get("mesh")
    if not mesh:
        return []
    summary = summarise(mesh)
    parts = []
    f = summary["paths"].get("forwarded")
    r = summary["ratios"]
    if f and r:
        parts.append(
            f"forwarded r1->r2: {_f(f['opens_per_s'])} opens/s ({_f(r['opens_per_s'], 2)}× one "
            f"relay), TTFB {_f(f['ttfb_ms'], 2)} ms ({_f(r['ttfb'], 2)}×), bulk "
            f"{_f(r['bulk'], 2)}× one relay"
        )
    res = mesh.get("resolve", {})
    if "median_us" in res:
        parts.append(f"resolve {_f(res['median_us'], 2)} µs")
    runs = mesh.get("failover", {}).get("runs", [])
    if runs:
        stalls = [x.get("max_gap_ms", float("nan")) for x in runs]
        intact = sum(bool(x.get("intact")) for x in runs)
        parts.append(
            f"failover stall {'/'.join(_f(s) for s in stalls)} ms, {intact}/{len(runs)} intact"
        )
    if not parts:
        return []
    return [f"| many relays (issue 18) | {'; '.join(parts)} | measured |"]
