"""The benchmark's verdicts on issue 16's targets: thresholds and wording, no timing.

``bench/targets.py`` is pure arithmetic over a run's summary, so it is checked here
on made-up figures; the benchmark itself is never run by the tests.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

TARGETS_PY = Path(__file__).resolve().parent.parent / "bench" / "targets.py"


def _targets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_targets_under_test", TARGETS_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building
    spec.loader.exec_module(module)
    return module


T = _targets()


def _bulk_row(label: str, mbps: float, cpu: dict[str, float]) -> dict[str, Any]:
    return {
        "label": label,
        "n": 2,
        "mbps": mbps,
        "cpu_s_per_gib": cpu,
        "cpu_total": sum(cpu.values()) if cpu else float("nan"),
    }


def _run(ours_mbps: float, go_mbps: float, cpu: dict[str, float], ttfb: tuple[float, float]):
    summary = {
        "bulk": {
            "outrelay": _bulk_row("outrelay", ours_mbps, cpu),
            "outrelay-qh3": _bulk_row("outrelay qh3", ours_mbps, cpu),
            "quic-go": _bulk_row("quic-go", go_mbps, {"client": 5.0, "server": 5.0}),
        },
        "ttfb": {
            "outrelay": {"label": "outrelay", "n": 10, "median": ttfb[0], "p90": ttfb[0]},
            "ssh": {"label": "ssh -L", "n": 10, "median": ttfb[1], "p90": ttfb[1]},
        },
    }
    seconds = {"outrelay": [1.0, 2.0], "quic-go": [0.5, 0.5]}
    results = {
        "machine": {"nproc": 2},
        "bulk": {"paths": {k: {"seconds": v, "rep": [0, 1]} for k, v in seconds.items()}},
    }
    return {v.key: v for v in T.evaluate(results, summary)}


def test_targets_carry_the_issue_numbers() -> None:
    assert (T.T1_BULK_VS_QUICGO, T.T2_CPU_S_PER_GIB, T.T3_TTFB_VS_SSH) == (0.5, 30.0, 5.0)


def test_each_target_is_met_on_its_boundary() -> None:
    v = _run(500.0, 1000.0, {"relay": 10.0, "consumer": 10.0, "provider": 10.0}, (5.0, 1.0))
    assert [v[k].met for k in ("T1", "T2", "T3")] == [True, True, True]
    assert v["T1"].measured.startswith("0.50×")
    assert "per rep 0.25–0.50" in v["T1"].measured  # 0.5/1.0 and 0.5/2.0


def test_targets_not_met_come_with_their_breakdown() -> None:
    v = _run(100.0, 1000.0, {"relay": 40.0, "consumer": 20.0, "provider": 20.0}, (6.0, 1.0))
    assert [v[k].met for k in ("T1", "T2", "T3")] == [False, False, False]
    text = "\n".join(T.markdown(T.as_json(list(v.values()))))
    assert "**T1 not met.**" in text and "relay at 40.0 CPU s/GiB" in text
    assert "relay 40.0, consumer 20.0, provider 20.0 (sum 80.0)" in text
    assert "T3 needs ≤ 5.00 ms" in text


def test_a_missing_path_is_not_measured_rather_than_failed() -> None:
    results = {"machine": {"nproc": 2}, "skipped": {"quic-go": "no Go toolchain"}}
    summary = {"bulk": {"outrelay": _bulk_row("outrelay", 100.0, {})}}
    verdicts = T.evaluate(results, summary)
    assert [x.met for x in verdicts] == [None, None, None]
    assert "no Go toolchain" in verdicts[0].measured
    assert "ttfb not run" in verdicts[2].measured
