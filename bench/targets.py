"""Issue 16's performance targets: the thresholds, the verdicts and what explains them.

Benchmarks, never timed tests: every ratio compares paths measured in the same
run (bulk paths interleaved within each repetition), so load from elsewhere on
the machine hits both sides alike. The thresholds live here and only here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MIB = 1 << 20
GIB = 1 << 30
MBIT_PER_GIB = GIB * 8 / 1e6
"""Mbit in one GiB: a process spending S CPU seconds per GiB moves at most this / S Mbit/s."""

T1_BULK_VS_QUICGO = 0.5
"""T1: bulk through agents + our relay over QUIC ≥ this × raw single-stream quic-go (same run)."""
T2_CPU_S_PER_GIB = 30.0
"""T2: CPU seconds per GiB, summed over relay, consumer and provider (bulk over QUIC) ≤ this."""
T3_TTFB_VS_SSH = 5.0
"""T3: time to first byte of a fresh connection ≤ this × ``ssh -L`` on an existing session."""

AGENT_PATH = "outrelay"
"""The bulk/TTFB path the targets judge: agents as shipped, our relay, QUIC."""
AGENT_PROCS = ("relay", "consumer", "provider")


@dataclass
class Verdict:
    key: str
    target: str
    measured: str = "not measured"
    met: bool | None = None
    """None: not measured in this run."""
    why: list[str] = field(default_factory=list)
    """The measured breakdown behind the figure (shown when the target is not met)."""


def _ok(x: Any) -> bool:
    return isinstance(x, int | float) and not math.isnan(x)


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}" if _ok(x) else "–"


def _cpu(row: dict[str, Any]) -> str:
    cpu = row.get("cpu_s_per_gib", {})
    parts = [f"{k} {_n(cpu[k], 1)}" for k in AGENT_PROCS if k in cpu]
    parts += [f"{k} {_n(v, 1)}" for k, v in cpu.items() if k not in AGENT_PROCS]
    return ", ".join(parts) + f" (sum {_n(row.get('cpu_total', float('nan')), 1)})"


def _per_rep_ratios(bulk: dict[str, Any], a: str, b: str) -> list[float]:
    """Throughput ratio a/b per repetition in which both paths completed."""
    ea, eb = bulk["paths"].get(a, {}), bulk["paths"].get(b, {})
    sa = dict(zip(ea.get("rep", []), ea.get("seconds", []), strict=False))
    sb = dict(zip(eb.get("rep", []), eb.get("seconds", []), strict=False))
    return [sb[r] / sa[r] for r in sorted(sa.keys() & sb.keys()) if sa[r] > 0]


def _agent_variants(rows: dict[str, Any]) -> list[str]:
    """The agent-path rows: as shipped first, then the other agent backends (not TLS+yamux)."""
    out = [AGENT_PATH] if AGENT_PATH in rows else []
    return out + sorted(
        n for n in rows if n.startswith(AGENT_PATH + "-") and n != AGENT_PATH + "-tcp"
    )


def _t1(results: dict[str, Any], summary: dict[str, Any]) -> Verdict:
    v = Verdict("T1", f"bulk, agents + relay over QUIC ≥ {T1_BULK_VS_QUICGO:g}× raw quic-go")
    rows = summary.get("bulk")
    if not rows:
        v.measured = "not measured (bulk not run)"
        return v
    ours, go = rows.get(AGENT_PATH), rows.get("quic-go")
    if not ours or not go or not (_ok(ours["mbps"]) and _ok(go["mbps"])):
        skipped = results.get("skipped", {}).get("quic-go", "")
        v.measured = "not measured (" + (skipped or "a path has no successful transfer") + ")"
        return v
    ratio = ours["mbps"] / go["mbps"]
    reps = _per_rep_ratios(results["bulk"], AGENT_PATH, "quic-go")
    spread = f"; per rep {_n(min(reps), 2)}–{_n(max(reps), 2)}" if len(reps) > 1 else ""
    v.measured = f"{ratio:.2f}× ({_n(ours['mbps'])} vs {_n(go['mbps'])} Mbit/s{spread})"
    v.met = ratio >= T1_BULK_VS_QUICGO
    need = T1_BULK_VS_QUICGO * go["mbps"]
    order = [*_agent_variants(rows), "outrelay-tcp", "quic-ceiling", "aioquic-plain", "quic-go"]
    v.why.append(
        "throughput, Mbit/s (median, same run): "
        + "; ".join(f"{rows[n]['label']} {_n(rows[n]['mbps'])}" for n in order if n in rows)
        + f"; T1 needs ≥ {_n(need)}"
    )
    for name in _agent_variants(rows):
        row = rows[name]
        cpu = {k: x for k, x in row.get("cpu_s_per_gib", {}).items() if _ok(x) and x > 0}
        if not cpu:
            continue
        worst = max(cpu, key=lambda k: cpu[k])
        cores = results.get("machine", {}).get("nproc") or 1
        total = sum(cpu.values())
        v.why.append(
            f"{row['label']}: the busiest process is the {worst} at {_n(cpu[worst], 1)} CPU s/GiB, "
            f"so it moves at most ≈ {_n(MBIT_PER_GIB / cpu[worst])} Mbit/s with a core to itself; "
            f"the path's {len(cpu)} processes together spend {_n(total, 1)} s/GiB on "
            f"{cores} core(s): ≤ ≈ {_n(MBIT_PER_GIB * min(cores, len(cpu)) / total)} Mbit/s. "
            f"T1 needs every process ≤ {_n(MBIT_PER_GIB / need, 1)} s/GiB and their sum "
            f"≤ {_n(MBIT_PER_GIB * min(cores, len(cpu)) / need, 1)}"
        )
    if go.get("cpu_s_per_gib"):
        v.why.append(f"raw quic-go for comparison, CPU s/GiB: {_cpu(go)}")
    return v


def _t2(summary: dict[str, Any]) -> Verdict:
    v = Verdict("T2", f"CPU s/GiB, relay + both agents (bulk over QUIC) ≤ {T2_CPU_S_PER_GIB:g}")
    rows = summary.get("bulk")
    ours = (rows or {}).get(AGENT_PATH)
    if not ours or not _ok(ours.get("cpu_total", float("nan"))):
        v.measured = "not measured (bulk not run)" if not rows else "not measured"
        return v
    total = ours["cpu_total"]
    cpu = ours["cpu_s_per_gib"]
    v.measured = (
        f"{_n(total, 1)} s/GiB ("
        + ", ".join(f"{k} {_n(cpu[k], 1)}" for k in AGENT_PROCS if k in cpu)
        + ")"
    )
    v.met = total <= T2_CPU_S_PER_GIB
    for name in _agent_variants(rows or {}):
        v.why.append(f"{rows[name]['label']}, CPU s/GiB: {_cpu(rows[name])}")
    for name in ("outrelay-tcp", "quic-ceiling", "quic-go"):
        if name in rows and rows[name].get("cpu_s_per_gib"):
            v.why.append(f"{rows[name]['label']} for comparison, CPU s/GiB: {_cpu(rows[name])}")
    if cpu:
        worst = max(cpu, key=lambda k: cpu[k])
        v.why.append(
            f"largest share: {worst} {_n(100 * cpu[worst] / total)} %; T2 leaves "
            f"{_n(T2_CPU_S_PER_GIB / 3, 1)} s/GiB per process on average"
        )
    return v


def _t3(summary: dict[str, Any]) -> Verdict:
    v = Verdict("T3", f"TTFB of a fresh connection ≤ {T3_TTFB_VS_SSH:g}× ssh -L (open session)")
    rows = summary.get("ttfb")
    if not rows:
        v.measured = "not measured (ttfb not run)"
        return v
    ours, ssh = rows.get(AGENT_PATH), rows.get("ssh")
    if not ours or not ssh or not (_ok(ours["median"]) and _ok(ssh["median"])):
        v.measured = "not measured (no ssh -L or no outrelay samples)"
        return v
    ratio = ours["median"] / ssh["median"]
    v.measured = (
        f"{ratio:.1f}× ({_n(ours['median'], 2)} vs {_n(ssh['median'], 2)} ms, medians of "
        f"{ours['n']} / {ssh['n']})"
    )
    v.met = ratio <= T3_TTFB_VS_SSH
    v.why.append(
        "median ms (p90): "
        + "; ".join(
            f"{r['label']} {_n(r['median'], 2)} ({_n(r['p90'], 2)})"
            for r in sorted(rows.values(), key=lambda r: r["median"] if _ok(r["median"]) else 1e9)
        )
        + f"; T3 needs ≤ {_n(T3_TTFB_VS_SSH * ssh['median'], 2)} ms"
    )
    v.why.append(
        "TCP rows (direct, ssh -L, stunnel, outrelay) open a new TCP connection through the "
        "running tunnel/agents; the raw QUIC rows open a new QUIC connection (full mTLS "
        "handshake) for every sample"
    )
    return v


def evaluate(results: dict[str, Any], summary: dict[str, Any]) -> list[Verdict]:
    return [_t1(results, summary), _t2(summary), _t3(summary)]


def _word(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "**not met**")


def as_json(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    return [
        {"key": v.key, "target": v.target, "measured": v.measured, "met": v.met, "why": v.why}
        for v in verdicts
    ]


def markdown(items: list[dict[str, Any]]) -> list[str]:
    """The verdict table (from :func:`as_json`), then the breakdown of every target not met."""
    lines = ["| target (issue 16) | measured | verdict |", "|---|---|---|"]
    lines += [f"| {v['key']}: {v['target']} | {v['measured']} | {_word(v['met'])} |" for v in items]
    misses = [v for v in items if v["met"] is False and v["why"]]
    if misses:
        lines += ["", "Why, measured in the same run:", ""]
        for v in misses:
            lines.append(f"- **{v['key']} not met.** " + v["why"][0])
            lines += [f"  - {w}" for w in v["why"][1:]]
    return lines
