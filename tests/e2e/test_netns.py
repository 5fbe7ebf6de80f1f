"""The namespace helper itself: leftovers of dead runs are swept, live runs' are not."""

from __future__ import annotations

import subprocess

import pytest

from .netns import PREFIX, Namespace, Network, network, run, sweep

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_sweep_removes_namespaces_of_dead_runs_only() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=10)

    def build(net: Network) -> tuple[Namespace, Namespace]:
        return Namespace(f"{PREFIX}sw-{gone.pid}-dead0"), Namespace(f"{PREFIX}sw-1-init0")

    # network() skips where namespaces cannot be made, and cleans up its own.
    with network("sw", build) as (dead, live):
        run("ip", "netns", "add", dead.name)
        try:
            assert dead.exists()
            assert dead.name in sweep()
            assert not dead.exists()
        finally:
            run("ip", "netns", "del", dead.name, check=False)
        # pid 1 always runs: a namespace named after it is a live run's and stays.
        run("ip", "netns", "add", live.name)
        try:
            assert live.name not in sweep()
            assert live.exists()
        finally:
            run("ip", "netns", "del", live.name, check=False)
