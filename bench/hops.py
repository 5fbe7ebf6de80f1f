"""Where a fresh connection's first byte spends its time: one figure per hop (issue 16).

Starts a backend, a relay, a provider and a consumer with ``--log-level debug`` (so
their ``msg=hop`` marks are logged, see ``outrelay.observe.hop``), makes ``--count``
fresh connections through the consumer, each sending one byte and waiting for its echo,
and lines the marks of the three processes up per stream id. ``t`` in every mark is
``time.monotonic()``, one clock for all processes of the host, and the client takes
its own marks on the same clock, so each interval below is one hop or one step.

    .venv/bin/python -m bench.hops --count 40

Debug logging costs time of its own (aioquic logs too), so the total here is higher
than the ``ttfb`` scenario's; the split is what this is for. Marks that a run does not
produce (e.g. ``c_answer`` comes after the first bytes when the consumer pipelines)
just leave their interval out.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.common import LOOPBACK, Procs
from bench.setups import make_pki, start_backend, start_outrelay

MARK = re.compile(r'msg="hop" ev=(\w+) stream_id=(\d+) t=([\d.]+)')

STEPS: tuple[tuple[str, str, str], ...] = (
    ("app_connect", "c_accept", "app connect() -> consumer accepted"),
    ("c_accept", "c_open_sent", "consumer: OPEN_STREAM written"),
    ("c_open_sent", "r_open", "hop C->R: relay read OPEN_STREAM"),
    ("r_open", "r_incoming_sent", "relay: decide + INCOMING_STREAM written"),
    ("r_incoming_sent", "p_incoming", "hop R->P: provider read INCOMING_STREAM"),
    ("p_incoming", "p_backend", "provider: backend dialled"),
    ("p_backend", "p_accept_sent", "provider: STREAM_ACCEPT written"),
    ("p_accept_sent", "r_answer", "hop P->R: relay read STREAM_ACCEPT"),
    ("r_answer", "r_ready_sent", "relay: STREAM_READY to both ctrl streams"),
    ("r_ready_sent", "c_answer", "hop R->C: consumer knows the mode"),
    ("p_accept_sent", "p_mode", "provider: accepted -> knows the mode"),
    ("c_answer", "c_up_first", "consumer: first app byte onto the relay stream"),
    ("c_up_first", "r_c2p_first", "hop C->R: relay forwarded the first byte"),
    ("r_c2p_first", "p_to_backend_first", "hop R->P: provider wrote it to the backend"),
    ("p_to_backend_first", "p_from_backend_first", "backend echo (TCP round trip)"),
    ("p_from_backend_first", "r_p2c_first", "hop P->R: relay forwarded the echo"),
    ("r_p2c_first", "c_down_first", "hop R->C: consumer wrote the echo to the app"),
    ("c_down_first", "app_echo", "consumer -> app (TCP)"),
    ("app_connect", "app_echo", "total (client's TTFB, debug logging on)"),
)


def echo(port: int) -> tuple[float, float]:
    """One fresh connection, one byte there and back: (start, end) on the monotonic clock."""
    start = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(b"E")
        if sock.recv(1) != b"E":
            raise SystemExit("echo answered nothing")
        end = time.monotonic()
    return start, end


def marks(texts: list[str]) -> dict[int, dict[str, float]]:
    """Stream id -> event -> first time seen, from the processes' logs."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for text in texts:
        for event, sid, t in MARK.findall(text):
            out[int(sid)].setdefault(event, float(t))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument(
        "--log-level",
        default="debug",
        help="warn: no marks, only the client's TTFB (e.g. to compare builds: run once "
        "with PYTHONPATH=<another checkout>/src)",
    )
    parser.add_argument("--keep-logs", help="copy the processes' logs to this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="outrelay-hops-") as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        with Procs(logs) as procs:
            pki = make_pki(work / "pki")
            backend = start_backend(procs)
            path = start_outrelay(procs, pki, backend.port, log_level=args.log_level)
            texts = [p.text() for p in path.procs.values()]
            already = set(marks(texts))
            for _ in range(3):
                echo(path.local_port)  # warm-up
            texts = [p.text() for p in path.procs.values()]
            already |= set(marks(texts))
            client = [echo(path.local_port) for _ in range(args.count)]
            time.sleep(0.5)  # let the last lines reach the logs
            texts = [p.text() for p in path.procs.values()]
            if args.keep_logs:
                shutil.copytree(logs, args.keep_logs, dirs_exist_ok=True)
    totals = sorted((end - start) * 1000 for start, end in client)
    print(
        f"{len(client)} fresh connections, 1-byte echo: TTFB median {statistics.median(totals):.3f}"
        f" ms (p10 {totals[len(totals) // 10]:.3f}, min {totals[0]:.3f})"
    )
    streams = marks(texts)
    if not streams:
        return
    by_order = sorted(
        (sid for sid in streams if sid not in already and "c_accept" in streams[sid]),
        key=lambda sid: streams[sid]["c_accept"],
    )
    if len(by_order) != len(client):
        raise SystemExit(f"{len(by_order)} streams with marks for {len(client)} connections")
    for sid, (start, end) in zip(by_order, client, strict=True):
        streams[sid]["app_connect"] = start
        streams[sid]["app_echo"] = end
    print("per hop: median (p10-p90) in ms")
    for a, b, label in STEPS:
        values = [
            (streams[s][b] - streams[s][a]) * 1000
            for s in by_order
            if a in streams[s] and b in streams[s]
        ]
        if not values:
            continue
        values.sort()
        p10 = values[len(values) // 10]
        p90 = values[(len(values) * 9) // 10 - (1 if len(values) % 10 == 0 else 0)]
        median = statistics.median(values)
        print(f"  {label:<46} {median:7.3f}  ({p10:.3f}-{p90:.3f})  n={len(values)}")


if __name__ == "__main__":
    main()
