"""``python -m bench``: outrelay against its QUIC ceiling and its peers, on 127.0.0.1.

Scenarios (``--only`` takes a comma-separated subset; default: all):

  bulk         one connection's throughput: app -> consumer agent -> relay ->
               provider agent -> backend (agents as shipped, and on each other
               QUIC backend: --agent-backends), vs direct TCP, the raw single-stream
               aioquic ceiling (outrelay's transport, plain aioquic API),
               quic-go, ssh -L, a stunnel mTLS pair, and outrelay's TLS+yamux
               fallback; CPU seconds per GiB per process
  cpu          alias of bulk (CPU per GiB is measured during the bulk runs)
  ttfb         connect + 1-byte echo through every path
  concurrency  N connections opened at once through one agent pair
  resume       relay SIGKILLed mid-download and restarted 2 s later
  stacks       aioquic vs qh3 (asyncio and uvloop) as the QUIC client
  qh3          alias of stacks
  backends     the agents on aioquic vs qh3 vs qh3+uvloop, and on TLS+yamux with and
               without uvloop, end to end through the relay: bulk, TTFB, resume
  experiments  candidate src changes applied at run time, vs baseline
  profile      py-spy (or cProfile) of consumer, relay and provider under bulk load
  mesh         many relays on etcd (issue 18): opens/s, TTFB and bulk through a forwarded
               path (consumer -> r1 -> r2 -> provider) vs one relay, registry resolve
               time (the mesh cache's lookup), cross-relay failover stall (bench/mesh.py)
  api          the Python API (issue 19): fresh open_connection + 1-byte echo, median/p90,
               against the sidecar consumer in the same run (bench/api.py)
  udp          UDP services (issue 19): packets/s delivered and loss at rising offered
               rates, over QUIC and the TLS+yamux fallback (bench/udp.py)

Issue 16's targets (thresholds in bench/targets.py) are judged from bulk and
ttfb and reported with a verdict at the top of results.md and at the end of
the output: T1 bulk >= 0.5x raw quic-go (same run), T2 <= 30 CPU s/GiB over
relay + both agents, T3 TTFB <= 5x ssh -L.

Results: bench/results/results.md, results.json and *.png. Logs of every
process: the run directory printed at the start (kept with --keep).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import api, mesh, report, scenarios, setups, targets, udp
from bench.common import BenchError

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
SCENARIOS = [
    "bulk",
    "ttfb",
    "concurrency",
    "resume",
    "stacks",
    "backends",
    "experiments",
    "profile",
    "mesh",
    "api",
    "udp",
]
ALIASES = {"cpu": "bulk", "qh3": "stacks"}


def _options(args: argparse.Namespace) -> scenarios.Options:
    quick = args.quick
    size = args.size or (16 if quick else 64)
    reps = args.reps or (2 if quick else 5)
    return scenarios.Options(
        size_mib=size,
        reps=reps,
        quick=quick,
        ttfb_count=args.ttfb_count or (10 if quick else 30),
        conns=args.conns,
        resume_reps=args.resume_reps or (1 if quick else 3),
        resume_rate_mib=4.0,
        resume_seconds=10.0 if quick else 12.0,
        profile_seconds=5 if quick else 12,
        aux_size_mib=args.size or (8 if quick else 32),
        aux_reps=args.reps or (1 if quick else 3),
        agent_backends=_agent_backends(args.agent_backends),
        relay_args=tuple(shlex.split(args.relay_args)),
    )


def _agent_backends(spec: str | None) -> tuple[str, ...]:
    if spec is None:
        return scenarios.default_agent_backends()
    chosen = tuple(b.strip() for b in spec.split(",") if b.strip() and b.strip() != "none")
    for name in chosen:
        if name not in scenarios.AGENT_BACKENDS:
            raise SystemExit(
                f"unknown agent QUIC backend {name!r}; choose from "
                + ", ".join(scenarios.AGENT_BACKENDS)
            )
    return chosen


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few reps (~3 min)")
    parser.add_argument(
        "--reps",
        type=int,
        default=0,
        help="repetitions (default: bulk 5, stacks/experiments 3; quick: 2 and 1)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=0,
        help="transfer MiB (default: bulk 64, stacks/experiments 32; quick: 16 and 8)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated scenarios: " + ", ".join(SCENARIOS)
    )
    parser.add_argument("--conns", type=int, default=1000, help="concurrent connections")
    parser.add_argument("--ttfb-count", type=int, default=0, help="TTFB samples per path")
    parser.add_argument("--resume-reps", type=int, default=0, help="relay restarts")
    parser.add_argument(
        "--agent-backends",
        default=None,
        metavar="LIST",
        help="bulk/ttfb: extra outrelay rows with both agents on these QUIC backends "
        "(comma-separated: " + ", ".join(scenarios.AGENT_BACKENDS) + "; 'none' for none; "
        "default: every backend other than the shipped one). The 'outrelay' row, the one "
        "the targets judge, always runs the agents as shipped (--quic-backend auto)",
    )
    parser.add_argument(
        "--relay-args",
        default="",
        metavar="ARGS",
        help="bulk/ttfb: extra flags for the relay of every outrelay path (one shell-quoted "
        "string, e.g. a relay-side backend choice)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    return parser.parse_args(argv)


def _selected(only: str) -> list[str]:
    if not only:
        return list(SCENARIOS)
    chosen = []
    for name in (n.strip() for n in only.split(",") if n.strip()):
        name = ALIASES.get(name, name)
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    chosen = _selected(args.only)
    opts = _options(args)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="outrelay-bench-"))
    scenarios.say(f"run directory {workdir}; scenarios: {', '.join(chosen)}")
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "options": vars(opts),
        "scenarios": chosen,
    }
    failed: dict[str, str] = {}
    try:
        pki = setups.make_pki(workdir / "pki")
        ctx = scenarios.Ctx(opts=opts, workdir=workdir, pki=pki, results=results)
        if {"bulk", "ttfb", "stacks"} & set(chosen):
            ctx.goquic, ctx.goquic_note = setups.build_goquic(workdir / "go")
            scenarios.say(f"quic-go peer: {ctx.goquic_note if ctx.goquic is None else 'built'}")
        steps = []
        if "bulk" in chosen or "ttfb" in chosen:
            steps.append(
                (
                    "bulk+ttfb",
                    lambda: scenarios.run_bulk_and_ttfb(
                        ctx, bulk="bulk" in chosen, ttfb="ttfb" in chosen
                    ),
                )
            )
        table = {
            "stacks": scenarios.run_stacks,
            "backends": scenarios.run_backends,
            "concurrency": scenarios.run_concurrency,
            "resume": scenarios.run_resume,
            "experiments": scenarios.run_experiments,
            "profile": scenarios.run_profile,
            "mesh": mesh.run_mesh,
            "api": api.run_api,
            "udp": udp.run_udp,
        }
        steps += [
            (name, lambda fn=table[name]: fn(ctx))
            for name in SCENARIOS
            if name in table and name in chosen
        ]
        for name, step in steps:
            t0 = time.monotonic()
            try:
                step()
            except (BenchError, OSError) as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
                scenarios.say(f"{name} FAILED: {exc}")
                traceback.print_exc()
            scenarios.say(f"{name} done in {time.monotonic() - t0:.0f}s")
        results["skipped"] = {
            **ctx.skipped,
            **{f"{k} (failed)": v[:300] for k, v in failed.items()},
        }
    except KeyboardInterrupt:
        scenarios.say("interrupted; every process started has been stopped")
        return 130
    finally:
        results["elapsed_s"] = time.monotonic() - started
        results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        if args.keep:
            scenarios.say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    page = report.write(results, args.out, command)
    scenarios.say(f"results: {page} (+ results.json, plots) in {results['elapsed_s']:.0f}s")
    if chosen == SCENARIOS and not failed and args.out == RESULTS:
        block = report.headline(results, results["summary"], command)
        if report.update_benchmarks_md(BENCHMARKS_MD, block):
            scenarios.say(f"updated the latest-run block of {BENCHMARKS_MD}")
    with contextlib.suppress(BrokenPipeError):
        print(page.read_text())
        # The verdicts once more at the end, where a terminal shows them.
        print(
            "\n".join(
                ["", "Targets (issue 16):", "", *targets.markdown(results["summary"]["targets"])]
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
