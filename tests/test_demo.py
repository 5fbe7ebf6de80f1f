"""`outrelay demo --once`: the README's main job works with embedded defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(90)
def test_demo_once_makes_a_request_through_the_tunnel() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "outrelay.cli", "demo", "--once"],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HTTP/1.0 200 OK" in result.stdout
    assert "hello from the provider's backend, through OutRelay" in result.stdout
    assert "outrelay://demo/agent/" in result.stdout
