"""The container image: built with deployments/image/build.sh (podman, a cached
debootstrap base, no registry), ``outrelay-agent --version`` inside it, and a
relay and two agents in containers on one podman network passing an echo.

The debootstrap base tarball is cached in ``OUTRELAY_IMAGE_CACHE`` (default
``~/.cache/outrelay-image``), so only the first build on a machine runs
debootstrap; later builds only rebuild the wheels and the two stages. The test
skips only where podman itself cannot run a container (probed once, with the
runtime's own error in the skip message) or is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import outrelay
from tests.deploy.scripts import ECHO_CLIENT, ECHO_SERVER

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "deployments" / "image" / "build.sh"
TAG = f"localhost/outrelay:{outrelay.__version__}"
# Lower than podman's defaults: those exceed the hard limits of some sandboxes
# (crun's setrlimit fails there); the same options build.sh uses.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
# Errors of the container runtime itself (not of our image) that mean podman
# cannot run containers on this machine.
RUNTIME_LIMITS = ("cgroups in hybrid mode", "setrlimit", "OCI permission denied",
                  "cannot set up namespace", "OCI runtime error")  # fmt: skip

pytestmark = pytest.mark.timeout(900)


def _podman(
    *argv: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(argv)}: {proc.returncode}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def image() -> str:
    """Build the image once per run (build.sh reuses the cached base)."""
    if shutil.which("podman") is None or shutil.which("debootstrap") is None:
        pytest.skip("podman or debootstrap is not installed (.ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("the image build needs root (debootstrap, rootful podman)")
    started = time.monotonic()
    proc = subprocess.run(
        [str(BUILD), TAG], capture_output=True, text=True, timeout=840, check=False
    )
    took = time.monotonic() - started
    if proc.returncode != 0:
        limit = next((m for m in RUNTIME_LIMITS if m in proc.stderr), None)
        if limit is not None:
            lines = [ln for ln in proc.stderr.splitlines() if limit in ln]
            pytest.skip(f"podman cannot run containers here: {lines[-1].strip()}")
        raise AssertionError(f"build.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    print(f"image {TAG} built in {took:.1f} s")
    return TAG


def test_version_inside_the_image(image: str) -> None:
    got = _podman("run", "--rm", *ULIMITS, "--network", "none", image, "--version")
    assert got.stdout.strip() == outrelay.__version__
    labels = json.loads(_podman("image", "inspect", image).stdout)[0]["Labels"]
    assert labels["org.opencontainers.image.version"] == outrelay.__version__
    who = _podman("run", "--rm", *ULIMITS, "--network", "none", "--entrypoint", "sh", image,
                  "-c", "id -u; command -v iptables")  # fmt: skip
    uid, iptables = who.stdout.split()
    assert uid == "10001" and iptables.endswith("/iptables")


@contextlib.contextmanager
def _podman_network(name: str) -> Iterator[list[str]]:
    containers: list[str] = []
    _podman("network", "create", name)
    try:
        yield containers
    finally:
        for c in containers:
            _podman("rm", "-f", "-t", "2", c, check=False)
        _podman("network", "rm", "-f", name, check=False)


def test_relay_and_two_agents_in_containers(image: str, tmp_path: Path) -> None:
    pki_dir = tmp_path / "identity"
    subprocess.run(
        [sys.executable, "-m", "outrelay.cli", "pki", "dev", "--out", str(pki_dir)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    # The containers run as uid 10001: let them read this throw-away identity.
    tmp_path.chmod(0o755)
    pki_dir.chmod(0o755)
    for f in pki_dir.iterdir():
        f.chmod(0o644)
    ids = json.loads((pki_dir / "identities.json").read_text())
    uri = {a["name"]: a["uri"] for a in ids["agents"]}
    tag = f"ortimg-{os.getpid()}"
    mount = ["-v", f"{pki_dir}:/etc/outrelay:ro"]
    ident = ["--server-name=localhost", "--ca=/etc/outrelay/ca.crt", "--log-format=json"]
    with _podman_network(tag) as containers:

        def run_detached(name: str, *argv: str) -> None:
            _podman("run", "-d", "--name", name, *ULIMITS, *argv)
            containers.append(name)

        run_detached(f"{tag}-relay", "--network", tag, *mount, "--entrypoint", "outrelay-relay",
                     image, "--listen=0.0.0.0:7443", "--cert=/etc/outrelay/relay.crt",
                     "--key=/etc/outrelay/relay.key", "--ca=/etc/outrelay/ca.crt",
                     "--log-format=json")  # fmt: skip
        info = json.loads(_podman("inspect", f"{tag}-relay").stdout)[0]
        relay_ip = info["NetworkSettings"]["Networks"][tag]["IPAddress"]
        assert relay_ip, info["NetworkSettings"]
        run_detached(f"{tag}-prov", "--network", tag, *mount, image, f"--relay={relay_ip}:7443",
                     *ident, "--cert=/etc/outrelay/agent-a.crt", "--key=/etc/outrelay/agent-a.key",
                     f"--uri={uri['agent-a']}", "--expose=svc-echo=127.0.0.1:8080")  # fmt: skip
        run_detached(f"{tag}-echo", "--network", f"container:{tag}-prov", "--entrypoint",
                     "python3", image, "-c", ECHO_SERVER, "127.0.0.1", "8080")  # fmt: skip
        run_detached(f"{tag}-cons", "--network", tag, *mount, image, f"--relay={relay_ip}:7443",
                     *ident, "--cert=/etc/outrelay/agent-b.crt", "--key=/etc/outrelay/agent-b.key",
                     f"--uri={uri['agent-b']}", "--consume=svc-echo@127.0.0.1:30001")  # fmt: skip
        got = _podman("run", "--rm", *ULIMITS, "--network", f"container:{tag}-cons",
                      "--entrypoint", "python3", image, "-c", ECHO_CLIENT, "30001", "60",
                      timeout=120, check=False)  # fmt: skip
        if got.returncode != 0 or got.stdout.split() != [str(256 * 4096), "True"]:
            logs = "\n".join(_podman("logs", c, check=False).stderr[-2000:] for c in containers)
            raise AssertionError(f"echo failed: {got.stdout} {got.stderr}\n{logs}")
