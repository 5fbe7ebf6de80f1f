"""Tests for outrelay.relay.audit: audit events as JSON lines (spec 02 §6.2.7)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from outrelay.relay import audit as audit_module
from outrelay.relay.audit import AUDIT_QUEUE_DEPTH, AuditEvent, AuditLog

LOGGER = logging.getLogger("test.audit")

CONSUMER = "outrelay://acme/agent/11111111-1111-1111-1111-111111111111"
PROVIDER = "outrelay://acme/agent/22222222-2222-2222-2222-222222222222"


def event(n: int = 0, *, side: str = "caller") -> AuditEvent:
    return AuditEvent(
        ts_unix_ms=1_700_000_000_000 + n,
        tenant="acme",
        caller=CONSUMER,
        target=f"svc-{n}",
        method="POST /charge",
        decision="DECISION_ALLOW",
        reason="allow-web",
        side=side,
    )


def umasked(mode: int) -> int:
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def read_lines(path: Path) -> list[dict[str, object]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# --- AuditEvent --------------------------------------------------------------------------------


def test_event_to_json_is_one_line_with_stable_keys() -> None:
    ev = AuditEvent(
        ts_unix_ms=5,
        tenant="acme",
        caller=PROVIDER,
        target=CONSUMER,
        method="line\nbreak",
        decision="DECISION_DENY",
        reason="no matching rule",
        side="callee",
    )
    line = ev.to_json()
    assert "\n" not in line
    assert list(json.loads(line)) == [
        "ts_unix_ms",
        "tenant",
        "caller",
        "target",
        "method",
        "decision",
        "reason",
        "stream_id",
        "side",
    ]
    assert json.loads(line) == {
        "ts_unix_ms": 5,
        "tenant": "acme",
        "caller": PROVIDER,
        "target": CONSUMER,
        "method": "line\nbreak",
        "decision": "DECISION_DENY",
        "reason": "no matching rule",
        "stream_id": "",
        "side": "callee",
    }


def test_event_defaults_match_the_reference() -> None:
    ev = event()
    assert ev.stream_id == ""  # the reference never sets it
    assert ev.side == "caller"


def test_provide_side_names_a_register_check() -> None:
    ev = event(side="provide")
    assert json.loads(ev.to_json())["side"] == "provide"


@pytest.mark.parametrize(
    ("field", "value"), [("decision", "allow"), ("decision", ""), ("side", "both")]
)
def test_event_rejects_bad_values(field: str, value: str) -> None:
    kwargs: dict[str, object] = {
        "ts_unix_ms": 0,
        "tenant": "",
        "caller": "",
        "target": "",
        "method": "",
        "decision": "DECISION_ALLOW",
        "reason": "",
    }
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        AuditEvent(**kwargs)  # type: ignore[arg-type]


# --- AuditLog ----------------------------------------------------------------------------------


async def test_events_written_as_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "sub" / "events.jsonl"
    log = AuditLog(str(path), logger=LOGGER)
    task = asyncio.create_task(log.run())
    log.emit(event(1))
    log.emit(event(2, side="callee"))
    await log.aclose()
    await asyncio.wait_for(task, timeout=5)
    assert [(e["target"], e["side"]) for e in read_lines(path)] == [
        ("svc-1", "caller"),
        ("svc-2", "callee"),
    ]
    stats = log.statistics()
    assert (stats.queued, stats.written, stats.dropped, stats.write_errors) == (0, 2, 0, 0)


async def test_file_and_directory_modes(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "audit.jsonl"
    log = AuditLog(path, logger=LOGGER)
    task = asyncio.create_task(log.run())
    log.emit(event())
    await log.aclose()
    await task
    assert stat.S_IMODE(path.stat().st_mode) == umasked(0o600)
    assert stat.S_IMODE(path.parent.stat().st_mode) == umasked(0o750)


async def test_appends_to_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"old":1}\n', encoding="utf-8")
    log = AuditLog(path, logger=LOGGER)
    task = asyncio.create_task(log.run())
    log.emit(event(3))
    await log.aclose()
    await task
    lines = read_lines(path)
    assert lines[0] == {"old": 1}
    assert lines[1]["target"] == "svc-3"


async def test_lines_reach_the_file_while_running(tmp_path: Path) -> None:
    """Each batch is flushed: a reader sees the line without waiting for close."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, logger=LOGGER)
    task = asyncio.create_task(log.run())
    try:
        log.emit(event(7))
        for _ in range(200):
            if path.exists() and path.read_text(encoding="utf-8"):
                break
            await asyncio.sleep(0.01)
        assert read_lines(path)[0]["target"] == "svc-7"
        assert log.statistics().written == 1
    finally:
        await log.aclose()
        await task


async def test_queue_overflow_drops_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Spec 02 §6.2.7: a full queue drops (never blocks) with a rate-limited warning."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, queue_size=4, logger=LOGGER)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        for n in range(10):  # no writer running yet: emit must still return at once
            log.emit(event(n))
    stats = log.statistics()
    assert (stats.queued, stats.dropped) == (4, 6)
    warnings = [r for r in caplog.records if "audit queue full; event dropped" in r.getMessage()]
    assert len(warnings) == 1  # at most one per second
    # The writer then drains what was queued: the first four events.
    task = asyncio.create_task(log.run())
    await log.aclose()
    await task
    assert [e["target"] for e in read_lines(path)] == ["svc-0", "svc-1", "svc-2", "svc-3"]
    assert log.statistics().written == 4


def test_default_queue_depth() -> None:
    assert AUDIT_QUEUE_DEPTH == 1024
    log = AuditLog(None, logger=LOGGER)
    for n in range(AUDIT_QUEUE_DEPTH + 5):
        log.emit(event(n))
    stats = log.statistics()
    assert (stats.queued, stats.dropped) == (AUDIT_QUEUE_DEPTH, 5)


def test_drop_warning_reports_count_after_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(audit_module, "_monotonic", lambda: clock[0])
    log = AuditLog(None, queue_size=1, logger=LOGGER)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        log.emit(event())
        for _ in range(3):
            log.emit(event())
        clock[0] += 1.0
        log.emit(event())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "1 dropped since the last warning, 1 in total" in messages[0]
    assert "3 dropped since the last warning, 4 in total" in messages[1]


async def test_emit_after_close_is_dropped(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", logger=LOGGER)
    task = asyncio.create_task(log.run())
    await log.aclose()
    await task
    log.emit(event())
    assert log.statistics().dropped == 1
    await log.aclose()  # idempotent


async def test_aclose_without_run_drains_inline(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, logger=LOGGER)
    log.emit(event(1))
    log.emit(event(2))
    await log.aclose()
    assert [e["target"] for e in read_lines(path)] == ["svc-1", "svc-2"]


async def test_run_after_close_returns(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", logger=LOGGER)
    await log.aclose()
    await asyncio.wait_for(log.run(), timeout=5)


async def test_second_run_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, logger=LOGGER)
    first = asyncio.create_task(log.run())
    await asyncio.sleep(0)
    second = asyncio.create_task(log.run())
    log.emit(event(1))
    await asyncio.sleep(0.01)
    assert not second.done()
    await log.aclose()
    await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
    assert len(read_lines(path)) == 1


async def test_aclose_before_the_writer_task_starts(tmp_path: Path) -> None:
    """The relay may close before its writer task got to run: nothing is lost or doubled."""
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, logger=LOGGER)
    log.emit(event(1))
    task = asyncio.create_task(log.run())  # not started yet
    await log.aclose()  # drains by itself
    await asyncio.wait_for(task, timeout=5)  # then the task waits or returns at once
    assert [e["target"] for e in read_lines(path)] == ["svc-1"]


async def test_cancelled_writer_then_aclose_writes_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, logger=LOGGER)
    task = asyncio.create_task(log.run())
    await asyncio.sleep(0.05)  # the file is open and the writer waits
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    log.emit(event(9))
    await log.aclose()
    assert read_lines(path)[0]["target"] == "svc-9"


async def test_without_path_events_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog(None, logger=LOGGER)
    with caplog.at_level(logging.DEBUG, logger=LOGGER.name):
        task = asyncio.create_task(log.run())
        log.emit(event(4))
        await log.aclose()
        await task
    records = [r for r in caplog.records if r.getMessage().startswith("audit {")]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG
    assert '"target":"svc-4"' in records[0].getMessage()
    assert log.statistics().written == 1


async def test_unopenable_path_raises(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, logger=LOGGER)  # a directory
    with pytest.raises(OSError):
        await log.run()


async def test_write_error_is_logged_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: object, lines: list[str]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit_module._AuditFile, "append", broken)
    log = AuditLog(tmp_path / "a.jsonl", logger=LOGGER)
    with caplog.at_level(logging.ERROR, logger=LOGGER.name):
        task = asyncio.create_task(log.run())
        log.emit(event())
        await log.aclose()
        await task
    assert log.statistics().write_errors == 1
    assert log.statistics().written == 0
    assert any("No space left" in r.getMessage() for r in caplog.records)


def test_rejects_bad_queue_size() -> None:
    with pytest.raises(ValueError):
        AuditLog(None, queue_size=0, logger=LOGGER)
