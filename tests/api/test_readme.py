"""The README's "Python API" snippet works as pasted (against a real relay and provider)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from e2e.harness import Backends, Cluster, child_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippet() -> str:
    """The Python heredoc of the section's shell block."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    shell = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return shell.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]


def test_readme_python_api_snippet(cluster: Cluster, backends: Backends, tmp_path: Path) -> None:
    relay = cluster.start_relay()
    web = backends.http(b"hello")
    cluster.start_agent(cluster.pki.agent(0), relay, name="provider", expose={"web": web.addr})
    # The README's `outrelay pki agent ... --name app` identity, and its relay address.
    pki = tmp_path / "pki"
    pki.mkdir()
    app = cluster.pki.agent(1)
    (pki / "app.crt").symlink_to(app.cert)
    (pki / "app.key").symlink_to(app.key)
    (pki / "ca.crt").symlink_to(cluster.pki.ca_cert)
    code = _snippet()
    assert '"127.0.0.1:7443"' in code
    result = subprocess.run(
        [sys.executable, "-c", code.replace('"127.0.0.1:7443"', f'"{relay.addr}"')],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("HTTP/1.") and " 200 " in lines[0], lines
    assert lines[1].startswith("404 "), lines
    assert web.requests == 1
