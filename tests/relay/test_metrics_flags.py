"""``--metrics-interval`` takes seconds or a Go duration, as the reference relay does."""

from __future__ import annotations

import argparse

import pytest

from outrelay.relay.cli import _go_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("500ms", 0.5), ("1m30s", 90.0), ("2", 2.0), ("-1s", -1.0), ("0", 0.0)],
)
def test_go_durations_and_seconds(text: str, seconds: float) -> None:
    assert _go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10x", "s", "", "1s2", "nan", "inf"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _go_duration(text)
