"""Turn raw samples into medians, ratios, a markdown page and PNG plots.

Writes ``results.json`` (everything, raw samples included), ``results.md``
(tables) and ``*.png`` (matplotlib, Agg backend) into the results directory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import api, mesh, targets, udp
from bench.common import median, percentile

MIB = 1 << 20
GIB = 1 << 30

TARGET_BULK = 0.7
"""DESIGN.md's original bulk target (÷ the raw aioquic ceiling); issue 16's are in bench.targets."""
TARGET_TTFB = 3.0


# -- machine ---------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cmd(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (
        (proc.stdout.strip() or proc.stderr.strip()).splitlines()[0]
        if proc.stdout or proc.stderr
        else "?"
    )


def _dpkg(package: str) -> str:
    out = _cmd(["dpkg-query", "-W", "-f", "${Version}", package])
    return out if out and "no packages" not in out else "not installed"


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "aioquic": _version("aioquic"),
        "qh3": _version("qh3"),
        "uvloop": _version("uvloop"),
        "outrelay": _version("outrelay"),
        "go": _cmd(["go", "version"]),
        "quic-go": _dpkg("golang-github-lucas-clemente-quic-go-dev"),
        "openssh": _cmd(["ssh", "-V"]),
        "stunnel": _dpkg("stunnel4"),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


# -- summaries -----------------------------------------------------------------------------------


def _mbps(size: int, seconds: float) -> float:
    return size * 8 / 1e6 / seconds if seconds and seconds == seconds else float("nan")


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bulk = results.get("bulk")
    if bulk:
        size = bulk["size_mib"] * MIB
        rows = {}
        for name, e in bulk["paths"].items():
            rates = [_mbps(size, s) for s in e["seconds"]]
            cpu = {k: median(v) / (size / GIB) for k, v in e["cpu"].items()}
            rows[name] = {
                "label": e["label"],
                "n": len(rates),
                "mbps": median(rates),
                "min": min(rates, default=float("nan")),
                "max": max(rates, default=float("nan")),
                "cpu_s_per_gib": cpu,
                "cpu_total": sum(cpu.values()) if cpu else float("nan"),
                "errors": e.get("errors", []),
            }
        out["bulk"] = rows
        ratios = {}
        agent = rows.get("outrelay", {}).get("mbps", float("nan"))
        for variant in sorted(n for n in rows if n.startswith("outrelay-") and n != "outrelay-tcp"):
            for other in ("quic-go", "quic-ceiling"):
                if other in rows:
                    ratios[f"{variant} / {other}"] = rows[variant]["mbps"] / rows[other]["mbps"]
        for other in (
            "quic-ceiling",
            "aioquic-plain",
            "quic-go",
            "tcp",
            "ssh",
            "stunnel",
            "outrelay-tcp",
        ):
            if other in rows:
                ratios[f"outrelay / {other}"] = agent / rows[other]["mbps"]
        if "quic-ceiling" in rows and "quic-go" in rows:
            ratios["quic-ceiling / quic-go"] = (
                rows["quic-ceiling"]["mbps"] / rows["quic-go"]["mbps"]
            )
        out["bulk_ratios"] = ratios
    ttfb = results.get("ttfb")
    if ttfb:
        rows = {}
        for name, e in ttfb["paths"].items():
            ms = [x * 1000 for x in e["samples"]]
            rows[name] = {
                "label": e["label"],
                "n": len(ms),
                "median": median(ms),
                "p90": percentile(ms, 90),
                "min": min(ms, default=float("nan")),
                "errors": e.get("errors", []),
            }
        out["ttfb"] = rows
        if "outrelay" in rows and "ssh" in rows:
            out["ttfb_ratio"] = rows["outrelay"]["median"] / rows["ssh"]["median"]
    stacks = results.get("stacks")
    if stacks:
        size = stacks["size_mib"] * MIB
        rows = {}
        for name, e in stacks["paths"].items():
            rows[name] = {
                "label": e["label"],
                "up": median([_mbps(size, s) for s in e["upload"]]),
                "down": median([_mbps(size, s) for s in e["download"]]),
                "cpu_up": median(e["cpu_upload"]) / (size / GIB),
                "cpu_down": median(e["cpu_download"]) / (size / GIB),
                "errors": e.get("errors", []),
            }
        out["stacks"] = rows
    exp = results.get("experiments")
    if exp:
        size = exp["size_mib"] * MIB
        rows = {}
        for name, e in exp["variants"].items():
            cpu = {k: median(v) / (size / GIB) for k, v in e["cpu"].items()}
            rows[name] = {
                "mbps": median([_mbps(size, s) for s in e["seconds"]]),
                "cpu": cpu,
                "cpu_total": sum(cpu.values()) if cpu else float("nan"),
                "n": len(e["seconds"]),
                "errors": e.get("errors", []),
            }
        base = rows.get("baseline")
        for name, row in rows.items():
            ref = rows["ceiling"] if name.startswith("ceiling") and "ceiling" in rows else base
            if ref:
                row["speedup"] = row["mbps"] / ref["mbps"]
                row["cpu_ratio"] = ref["cpu_total"] / row["cpu_total"]
        out["experiments"] = rows
    return out


# -- markdown ------------------------------------------------------------------------------------


def _f(x: Any, digits: int = 0) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:,.{digits}f}"
    return str(x)


def _mb(n: float) -> str:
    return f"{n / MIB:,.1f}"


def markdown(results: dict[str, Any], summary: dict[str, Any], command: str) -> str:
    m = results["machine"]
    lines = [
        "# outrelay benchmark results",
        "",
        f"Generated by `{command}` on {results['started']} (took {results['elapsed_s']:.0f} s).",
        "All traffic on 127.0.0.1. Figures are medians over the repetitions; the machine may",
        "have been shared (load average at start/end: "
        f"{' '.join(m['loadavg'])} / {' '.join(results.get('loadavg_end', ['?']))}).",
        "",
        "## Targets (issue 16)",
        "",
        *targets.markdown(summary.get("targets", [])),
        "",
        "## Machine",
        "",
        "| item | value |",
        "|---|---|",
    ]
    for key in (
        "nproc",
        "cpu",
        "kernel",
        "python",
        "aioquic",
        "qh3",
        "uvloop",
        "outrelay",
        "go",
        "quic-go",
        "openssh",
        "stunnel",
    ):
        lines.append(f"| {key} | {m.get(key, '?')} |")
    if results.get("skipped"):
        lines += [
            "",
            "Skipped: " + "; ".join(f"**{k}**: {v}" for k, v in results["skipped"].items()),
        ]
    bulk = summary.get("bulk")
    if bulk:
        b = results["bulk"]
        lines += [
            "",
            f"## Bulk throughput, one connection ({b['size_mib']} MiB upload, {b['reps']} reps)",
            "",
            "| path | Mbit/s (median) | min–max | CPU s/GiB (per process) | CPU s/GiB total |",
            "|---|---:|---:|---|---:|",
        ]
        for row in sorted(bulk.values(), key=lambda r: -r["mbps"] if r["mbps"] == r["mbps"] else 0):
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in row["cpu_s_per_gib"].items()) or "–"
            err = f" ({len(row['errors'])} errors)" if row["errors"] else ""
            lines.append(
                f"| {row['label']}{err} | {_f(row['mbps'])} | {_f(row['min'])}–{_f(row['max'])} "
                f"| {cpu} | {_f(row['cpu_total'], 1)} |"
            )
        lines += ["", "| ratio | value | target |", "|---|---:|---|"]
        for key, value in summary["bulk_ratios"].items():
            target, ok = "", True
            if key == "outrelay / quic-ceiling":
                target, ok = f"≥ {TARGET_BULK} (DESIGN.md)", value >= TARGET_BULK
            elif key == "outrelay / quic-go":
                target = f"≥ {targets.T1_BULK_VS_QUICGO} (T1)"
                ok = value >= targets.T1_BULK_VS_QUICGO
            verdict = (" (met)" if ok else " (**not met**)") if target else ""
            lines.append(f"| {key} | {value:.3f} | {target}{verdict} |")
        lines += [
            "",
            "CPU for the QUIC client paths: `client` is the sender process (its own process",
            "time), `server` the receiver (from /proc). For the agent path: consumer agent,",
            "relay and provider agent, from /proc/<pid>/stat utime+stime around each transfer.",
        ]
    ttfb = summary.get("ttfb")
    if ttfb:
        lines += [
            "",
            f"## Time to first byte, fresh connection ({results['ttfb']['count']} samples)",
            "",
            "connect + 1-byte echo. TCP paths: a new TCP connection over the already running",
            "tunnel/agents (ssh -L: over the established SSH session). Raw QUIC paths: a new QUIC",
            "connection each time (full handshake with client certificate).",
            "",
            "| path | median ms | p90 ms | min ms |",
            "|---|---:|---:|---:|",
        ]
        for row in sorted(ttfb.values(), key=lambda r: r["median"]):
            lines.append(
                f"| {row['label']} | {_f(row['median'], 2)} | {_f(row['p90'], 2)} "
                f"| {_f(row['min'], 2)} |"
            )
        if "ttfb_ratio" in summary:
            r = summary["ttfb_ratio"]
            verdict = "met" if r <= TARGET_TTFB else "**not met**"
            t3 = "met" if r <= targets.T3_TTFB_VS_SSH else "**not met**"
            lines += [
                "",
                f"outrelay / ssh -L TTFB: **{r:.2f}×** (T3 ≤ {targets.T3_TTFB_VS_SSH:g}×: {t3}; "
                f"DESIGN.md ≤ {TARGET_TTFB:g}×: {verdict})",
            ]
    conc = results.get("concurrency")
    if conc:
        lines += [
            "",
            f"## Concurrency: {conc['n']} connections opened at once through one agent pair",
            "",
            "`hold`: every connection stays open until all have their echo (or failed), so up to",
            f"{conc['n']} streams are open at once; `burst`: each connection closes right after",
            "its echo. Open latency = connect() to the 1-byte echo back. `baseline` is the code",
            "as it is; `streams1k` runs relay and agents with the runtime patch of that name",
            "(1,100 streams per QUIC connection instead of 100); `ring4k` adds resume rings",
            "that start at 4 KiB instead of 64 KiB.",
            "",
            "| variant | mode | completed | p50 ms | p99 ms | max ms | failures |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for variant, v in conc["variants"].items():
            for mode in ("hold", "burst"):
                r = v.get(mode)
                if r:
                    lines.append(
                        f"| {variant} | {mode} | {r['completed']}/{r['n']} | {_f(r['p50_ms'], 1)} "
                        f"| {_f(r['p99_ms'], 1)} | {_f(r['max_ms'], 1)} "
                        f"| {r['failures'] or '–'} |"
                    )
        lines += [
            "",
            "RSS in MiB; per-stream bytes = (RSS with every `hold` connection open − RSS before)",
            "÷ connections that completed.",
            "",
            "| variant | process | before | all open (hold) | peak | after close "
            "| bytes RSS per open stream |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for variant, v in conc["variants"].items():
            hold = v.get("hold", {})
            for proc, before in v["rss_before"].items():
                settled = hold.get("at_settled", {}).get("rss", {}).get(proc, float("nan"))
                completed = hold.get("completed", 0)
                per = (settled - before) / completed if completed else float("nan")
                lines.append(
                    f"| {variant} | {proc} | {_mb(before)} | {_mb(settled)} "
                    f"| {_mb(hold.get('rss_peak', {}).get(proc, 0))} "
                    f"| {_mb(hold.get('rss_after_close', {}).get(proc, 0))} | {_f(per)} |"
                )
        for variant, v in conc["variants"].items():
            warn = {k: w for k, w in v.get("log_warnings", {}).items() if w}
            if warn:
                lines += ["", f"`{variant}`: warnings logged during the run: {warn}"]
                for proc, samples in v.get("log_samples", {}).items():
                    lines += [f"- {proc}: `{x}`" for x in samples]
    res = results.get("resume")
    if res:
        lines += [
            "",
            f"## Resume stall: relay SIGKILLed at {res['kill_at_s']:g} s into a paced download "
            f"({res['size_mib']:.0f} MiB at {res['rate_mib_s']:g} MiB/s), restarted "
            f"{res['down_s']:g} s later on the same port",
            "",
            "`baseline` is the code as it is; `fastdead` runs the agents with the runtime patch of",
            "the same name (bench/patched.py). Agents' stall_ms counts from the moment they saw",
            "the break, the application's from its last byte before the kill.",
            "",
            "| variant | run | app stall (longest gap) ms | gap started at s | bytes intact "
            "| how the agents noticed "
            "| agents' `stream resumed` lines (retransmitted B / stall ms) |",
            "|---|---|---:|---:|---|---|---|",
        ]
        counters: dict[str, int] = {}
        for r in res["runs"]:
            variant = r.get("variant", "baseline")
            counters[variant] = counters.get(variant, 0) + 1
            agents = (
                "; ".join(
                    f"{x['agent']}: {x['retransmitted']} B / {x['stall_ms']} ms"
                    for x in r.get("resumed", [])
                )
                or "none"
            )
            lost = "; ".join(f"{x['agent']}: {x['reason']}" for x in r.get("lost", [])) or "–"
            intact = r.get("intact")
            detail = (
                "yes"
                if intact
                else f"**no** ({r.get('received', 0)}/{r.get('expected', 0)} B "
                f"{r.get('error', '')})"
            )
            lines.append(
                f"| {variant} | {counters[variant]} | {_f(r.get('max_gap_ms', float('nan')))} "
                f"| {_f(r.get('gap_at_s', float('nan')), 2)} | {detail} | {lost} | {agents} |"
            )
    stacks = summary.get("stacks")
    if stacks:
        st = results["stacks"]
        lines += [
            "",
            f"## QUIC client stacks, raw single stream ({st['size_mib']} MiB, {st['reps']} reps)",
            "",
            "Upload = the client sends; download = the server sends. The aioquic server is",
            "outrelay's transport (`bench.quicraw`: mTLS, ALPN orp/1, client chain verified), so a",
            "working row also proves the stack can present a client certificate to the relay.",
            "",
            "| client -> server | up Mbit/s | down Mbit/s "
            "| client CPU s/GiB up | client CPU s/GiB down |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in stacks.values():
            err = f" ({len(row['errors'])} errors)" if row["errors"] else ""
            lines.append(
                f"| {row['label']}{err} | {_f(row['up'])} | {_f(row['down'])} "
                f"| {_f(row['cpu_up'], 1)} "
                f"| {_f(row['cpu_down'], 1)} |"
            )
    exp = summary.get("experiments")
    if exp:
        e = results["experiments"]
        lines += [
            "",
            "## Experiments: candidate src changes applied at run time "
            f"({e['size_mib']} MiB, {e['reps']} reps)",
            "",
            "See `bench/patched.py` for each patch. Ratios are against `baseline` (agent path) or",
            "`ceiling` (raw transport) measured in the same run; CPU ratio = baseline CPU s/GiB ÷",
            "variant CPU s/GiB (summed over consumer, relay and provider; client+server for",
            "ceilings).",
            "",
            "| variant | Mbit/s | throughput ratio | CPU s/GiB total | CPU ratio | per process |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name, row in exp.items():
            per = ", ".join(f"{k} {v:.1f}" for k, v in row["cpu"].items())
            lines.append(
                f"| {name} | {_f(row['mbps'])} | {_f(row.get('speedup', float('nan')), 2)} | "
                f"{_f(row['cpu_total'], 1)} | {_f(row.get('cpu_ratio', float('nan')), 2)} | {per} |"
            )
    prof = results.get("profile")
    if prof:
        lines += [
            "",
            f"## Profile of the bulk path ({prof['tool']}, "
            f"{prof.get('moved_mib', 0):.0f} MiB moved)",
            "",
            "Share of each process's samples; full lists in `profile-<process>.txt`.",
        ]
        for proc, p in prof["procs"].items():
            if "self" not in p:
                lines += ["", f"**{proc}**: {p.get('error', 'no data')}"]
                continue
            idle = p.get("idle", 0.0)
            lines += [
                "",
                f"**{proc}** ({p['samples']:.0f} samples, {idle * 100:.0f}% idle in select(); "
                "shares below are of the busy samples). By where the time is spent (leaf frame):",
                "",
            ]
            lines += [f"- {share * 100:.1f}% {name}" for name, share in p.get("categories", [])]
            lines += ["", "Top functions (self time):", ""]
            lines += [f"- {share * 100:.1f}% `{name}`" for name, share in p["self"][:10]]
    lines += mesh.markdown(results)
    lines += api.markdown(results)
    lines += udp.markdown(results)
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in results.get("plots", [])), ""]
    return "\n".join(lines)


def write_profiles(results: dict[str, Any], out: Path) -> None:
    prof = results.get("profile")
    if not prof:
        return
    for proc, p in prof["procs"].items():
        if "self" not in p:
            continue
        text = [f"# {proc}: {prof['tool']}, {p['samples']:.0f} samples", ""]
        text += [f"idle (select): {p.get('idle', 0) * 100:.1f}% of all samples", ""]
        text += ["## categories (share of busy samples)"]
        text += [f"{share * 100:6.2f}%  {name}" for name, share in p.get("categories", [])]
        text += ["", "## self"]
        text += [f"{share * 100:6.2f}%  {name}" for name, share in p["self"]]
        text += ["", "## inclusive"]
        text += [f"{share * 100:6.2f}%  {name}" for name, share in p["inclusive"]]
        (out / f"profile-{proc}.txt").write_text("\n".join(text) + "\n")


# -- plots ---------------------------------------------------------------------------------------


def plots(results: dict[str, Any], summary: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    bulk = summary.get("bulk")
    if bulk:
        rows = sorted((r for r in bulk.values() if r["n"]), key=lambda r: r["mbps"])
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
        y = range(len(rows))
        ax.barh(list(y), [r["mbps"] for r in rows], color="#4c72b0")
        ax.errorbar(
            [r["mbps"] for r in rows],
            list(y),
            xerr=[[r["mbps"] - r["min"] for r in rows], [r["max"] - r["mbps"] for r in rows]],
            fmt="none",
            ecolor="black",
            capsize=3,
        )
        ax.set_yticks(list(y), [r["label"] for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("Mbit/s (median, min–max; log scale)")
        ax.set_title(f"Bulk throughput, one connection, {results['bulk']['size_mib']} MiB")
        save(fig, "bulk.png")
        cpu_rows = [r for r in rows if r["cpu_s_per_gib"]]
        if cpu_rows:
            fig, ax = plt.subplots(figsize=(8, 0.45 * len(cpu_rows) + 1.5))
            left = [0.0] * len(cpu_rows)
            names = sorted({k for r in cpu_rows for k in r["cpu_s_per_gib"]})
            for name in names:
                vals = [r["cpu_s_per_gib"].get(name, 0.0) for r in cpu_rows]
                ax.barh(range(len(cpu_rows)), vals, left=left, label=name)
                left = [a + b for a, b in zip(left, vals, strict=True)]
            ax.set_yticks(range(len(cpu_rows)), [r["label"] for r in cpu_rows])
            ax.set_xlabel("CPU seconds per GiB moved")
            ax.legend(fontsize=7, loc="upper right")
            ax.set_title("CPU cost per GiB, by process")
            save(fig, "cpu.png")
    ttfb = results.get("ttfb")
    if ttfb:
        items = [
            (e["label"], [x * 1000 for x in e["samples"]])
            for e in ttfb["paths"].values()
            if e["samples"]
        ]
        items.sort(key=lambda kv: median(kv[1]))
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(items) + 1.5))
        ax.boxplot([v for _, v in items], vert=False, showfliers=True)
        ax.set_yticks(range(1, len(items) + 1), [k for k, _ in items])
        ax.set_xscale("log")
        ax.set_xlabel("ms, connect + 1-byte echo (log scale)")
        ax.set_title("Time to first byte of a fresh connection")
        save(fig, "ttfb.png")
    conc = results.get("concurrency")
    if conc:
        fig, ax = plt.subplots(figsize=(7, 4))
        for variant, v in conc["variants"].items():
            for mode in ("hold", "burst"):
                r = v.get(mode)
                if r and r["latencies_ms"]:
                    xs = r["latencies_ms"]
                    ys = [(i + 1) / r["n"] for i in range(len(xs))]
                    ax.plot(xs, ys, label=f"{variant} {mode} ({r['completed']}/{r['n']})")
        ax.set_xscale("log")
        ax.set_xlabel("open latency, ms (log)")
        ax.set_ylabel(f"fraction of {conc['n']} connections")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        ax.set_title("Concurrent opens through one agent pair")
        save(fig, "concurrency.png")
    res = results.get("resume")
    if res and res["runs"]:
        fig, ax = plt.subplots(figsize=(8, 4))
        for i, r in enumerate(res["runs"], 1):
            tl = r.get("timeline") or []
            if tl:
                label = f"{r.get('variant', 'baseline')} #{i}"
                ax.plot([t for t, _ in tl], [b / MIB for _, b in tl], label=label)
            ax.axvline(r["killed_at"], color="red", linestyle="--", linewidth=0.8)
            ax.axvline(r["restarted_at"], color="green", linestyle="--", linewidth=0.8)
        ax.set_xlabel("seconds (red: relay SIGKILL, green: relay restarted)")
        ax.set_ylabel("MiB received by the application")
        ax.legend()
        ax.set_title("Download through the agents while the relay restarts")
        save(fig, "resume.png")
    stacks = summary.get("stacks")
    if stacks:
        rows = list(stacks.values())
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
        ys = range(len(rows))
        ax.barh([y - 0.2 for y in ys], [r["up"] for r in rows], height=0.4, label="upload")
        ax.barh([y + 0.2 for y in ys], [r["down"] for r in rows], height=0.4, label="download")
        ax.set_yticks(list(ys), [r["label"] for r in rows])
        ax.set_xlabel("Mbit/s (median)")
        ax.legend()
        ax.set_title("QUIC client stacks, one stream")
        save(fig, "stacks.png")
    exp = summary.get("experiments")
    if exp:
        names = list(exp)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.8), sharey=True)
        a1.barh(range(len(names)), [exp[n]["mbps"] for n in names], color="#4c72b0")
        a1.set_xlabel("Mbit/s (median)")
        a2.barh(range(len(names)), [exp[n]["cpu_total"] for n in names], color="#dd8452")
        a2.set_xlabel("CPU s/GiB (sum of processes)")
        a1.set_yticks(range(len(names)), names)
        fig.suptitle("Candidate src changes (runtime patches)")
        save(fig, "experiments.png")
    return made


BEGIN = "<!-- bench:latest:begin -->"
END = "<!-- bench:latest:end -->"


def _range(values: list[float], digits: int = 0) -> str:
    vals = [v for v in values if v == v]
    if not vals:
        return "–"
    lo, hi = min(vals), max(vals)
    return _f(lo, digits) if lo == hi else f"{_f(lo, digits)}–{_f(hi, digits)}"


def headline(results: dict[str, Any], summary: dict[str, Any], command: str) -> str:
    """The targets and the figures behind them, for the block in BENCHMARKS.md."""
    m = results["machine"]
    lines = [
        *targets.markdown(summary.get("targets", [])),
        "",
        f"Latest complete run: `{command}`, {results['started']}, {results['elapsed_s']:.0f} s; "
        f"{m['nproc']} × {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, "
        f"aioquic {m['aioquic']}, qh3 {m['qh3']}; load average at start "
        f"{' '.join(m['loadavg'])}. Full tables: `bench/results/results.md`.",
        "",
        "| target (DESIGN.md) | measured | verdict |",
        "|---|---|---|",
    ]
    bulk = summary.get("bulk", {})
    ratio = summary.get("bulk_ratios", {}).get("outrelay / quic-ceiling")
    if ratio is not None:
        lines.append(
            f"| bulk ≥ {TARGET_BULK}× raw single-stream aioquic | {ratio:.2f}× "
            f"({_f(bulk['outrelay']['mbps'])} vs {_f(bulk['quic-ceiling']['mbps'])} Mbit/s) | "
            f"{'met' if ratio >= TARGET_BULK else '**not met**'} |"
        )
    if "ttfb_ratio" in summary:
        t = summary["ttfb"]
        r = summary["ttfb_ratio"]
        lines.append(
            f"| TTFB ≤ {TARGET_TTFB:g}× ssh -L | {r:.1f}× ({_f(t['outrelay']['median'], 2)} vs "
            f"{_f(t['ssh']['median'], 2)} ms) | {'met' if r <= TARGET_TTFB else '**not met**'} |"
        )
    conc = results.get("concurrency")
    if conc:
        parts = []
        all_ok = True
        for variant, v in conc["variants"].items():
            for mode in ("hold", "burst"):
                if mode in v:
                    r = v[mode]
                    all_ok &= variant != "baseline" or r["completed"] == r["n"]
                    parts.append(f"{variant} {mode} {r['completed']}/{r['n']}")
        lines.append(
            f"| {conc['n']:,} concurrent connections all complete | {', '.join(parts)} | "
            f"{'met' if all_ok else '**not met** as shipped'} |"
        )
    res = results.get("resume")
    if res and res["runs"]:
        by: dict[str, list[dict[str, Any]]] = {}
        for run in res["runs"]:
            by.setdefault(run.get("variant", "baseline"), []).append(run)
        intact = all(r.get("intact") for r in res["runs"])
        stalls = "; ".join(
            f"{k}: stall {_range([r.get('max_gap_ms', float('nan')) for r in runs])} ms"
            for k, runs in by.items()
        )
        lines.append(
            f"| relay restart: no byte lost or duplicated, stall reported | "
            f"{sum(bool(r.get('intact')) for r in res['runs'])}/{len(res['runs'])} intact; "
            f"{stalls} | {'met' if intact else '**not met**'} |"
        )
    lines += mesh.headline(results)
    if bulk:
        lines += ["", "| bulk path | Mbit/s | CPU s/GiB |", "|---|---:|---:|"]
        for row in sorted(bulk.values(), key=lambda r: -r["mbps"] if r["mbps"] == r["mbps"] else 0):
            lines.append(f"| {row['label']} | {_f(row['mbps'])} | {_f(row['cpu_total'], 1)} |")
    exp = summary.get("experiments")
    if exp:
        lines += [
            "",
            "| runtime patch (bench/patched.py) | throughput ratio | CPU ratio |",
            "|---|---:|---:|",
        ]
        for name, row in exp.items():
            if name not in ("baseline", "ceiling"):
                lines.append(
                    f"| {name} | {_f(row.get('speedup', float('nan')), 2)} "
                    f"| {_f(row.get('cpu_ratio', float('nan')), 2)} |"
                )
    stacks = summary.get("stacks")
    if stacks:
        lines += [
            "",
            "| QUIC client -> server | up Mbit/s | down Mbit/s | client CPU s/GiB up/down |",
            "|---|---:|---:|---:|",
        ]
        for row in stacks.values():
            lines.append(
                f"| {row['label']} | {_f(row['up'])} | {_f(row['down'])} "
                f"| {_f(row['cpu_up'], 1)} / {_f(row['cpu_down'], 1)} |"
            )
    return "\n".join(lines)


def update_benchmarks_md(path: Path, block: str) -> bool:
    """Replace the block between the markers in BENCHMARKS.md; False if there are none."""
    try:
        text = path.read_text()
    except OSError:
        return False
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    return True


def write(results: dict[str, Any], out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results)
    summary["targets"] = targets.as_json(targets.evaluate(results, summary))
    results["summary"] = summary
    results["plots"] = plots(results, summary, out)
    write_profiles(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    page = out / "results.md"
    page.write_text(markdown(results, summary, command))
    return page
