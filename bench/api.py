"""The ``api`` scenario (issue 19): open latency of the Python API.

``outrelay.Agent`` runs inside the benchmark process (its own identity, issued with
``outrelay pki agent``), connected to the usual relay with a provider in front of the
benchmark backend (:func:`bench.setups.start_outrelay`). One sample = a fresh
``await agent.open_connection("bench")`` + a 1-byte echo + close, from the call to the
byte back; interleaved with the same through the sidecar consumer (fresh TCP connect to
its listener + 1-byte echo, :func:`bench.clients.echo_once`), so the two are compared in
one run. Reported: median and p90 of each.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

from bench import clients, setups
from bench.common import Procs, median, percentile, venv_script
from bench.scenarios import Ctx, say

__all__ = ["markdown", "run_api"]

WARMUP = 3
STEP_TIMEOUT = 15.0


def _api_identity(ctx: Ctx) -> Any:
    import outrelay

    out = ctx.pki.dir
    if not (out / "api.crt").exists():
        argv = [venv_script("outrelay"), "pki", "agent", "--ca-dir", str(out), "--out", str(out)]
        argv += ["--tenant", "acme", "--name", "api"]
        subprocess.run(
            argv,
            check=True,
            capture_output=True,
            timeout=60,
        )
    return outrelay.Identity.from_files(out / "api.crt", out / "api.key", ctx.pki.ca)


async def _api_open_once(agent: Any) -> float:
    start = time.perf_counter()
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await agent.open_connection("bench")
        writer.write(b"E")
        await writer.drain()
        got = await reader.readexactly(1)
        elapsed = time.perf_counter() - start
        writer.close()
        await writer.wait_closed()
    if got != b"E":
        raise RuntimeError(f"echo answered {got!r}")
    return elapsed


async def _measure(ctx: Ctx, relay_port: int, local_port: int, out: dict[str, Any]) -> None:
    import outrelay

    identity = _api_identity(ctx)
    async with outrelay.Agent(relays=[f"127.0.0.1:{relay_port}"], identity=identity) as agent:
        for _ in range(WARMUP):
            await _api_open_once(agent)
            clients.echo_once(local_port)
        for _ in range(ctx.opts.ttfb_count):
            out["api_s"].append(await _api_open_once(agent))
            out["sidecar_s"].append(clients.echo_once(local_port))


def run_api(ctx: Ctx) -> None:
    out: dict[str, Any] = {"count": ctx.opts.ttfb_count, "api_s": [], "sidecar_s": []}
    ctx.results["api"] = out
    with Procs(ctx.logdir("api")) as procs:
        backend = setups.start_backend(procs)
        path = setups.start_outrelay(procs, ctx.pki, backend.port)
        say(f"api: {ctx.opts.ttfb_count} fresh opens + 1-byte echo, API vs sidecar")
        asyncio.run(_measure(ctx, path.relay_port, path.local_port, out))
    for key in ("api", "sidecar"):
        ms = [s * 1000 for s in out[f"{key}_s"]]
        out[f"{key}_median_ms"] = median(ms)
        out[f"{key}_p90_ms"] = percentile(ms, 90)
    say(
        f"api: open+echo median {out['api_median_ms']:.2f} ms (p90 {out['api_p90_ms']:.2f}); "
        f"sidecar {out['sidecar_median_ms']:.2f} ms (p90 {out['sidecar_p90_ms']:.2f})"
    )


def markdown(results: dict[str, Any]) -> list[str]:
    api = results.get("api")
    if not api or "api_median_ms" not in api:
        return []
    return [
        "",
        "## Python API (issue 19): open latency",
        "",
        f"{api['count']} samples, interleaved. API = `await agent.open_connection()` in process "
        "+ 1-byte echo + close; sidecar = fresh TCP connect to the consumer agent + 1-byte echo.",
        "",
        "| path | median ms | p90 ms |",
        "|---|---:|---:|",
        f"| outrelay.Agent.open_connection | {api['api_median_ms']:.2f} "
        f"| {api['api_p90_ms']:.2f} |",
        f"| sidecar consumer (TCP) | {api['sidecar_median_ms']:.2f} "
        f"| {api['sidecar_p90_ms']:.2f} |",
    ]
