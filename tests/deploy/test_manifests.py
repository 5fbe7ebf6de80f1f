"""Every Kubernetes manifest under deployments/, and the Secrets printed by
``outrelay pki dev --k8s-secret``, validate offline against the Kubernetes
schemas (strict: unknown fields are errors), and the compose file keeps the
shape its comments promise."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deployments" / "kubernetes"
COMPOSE = ROOT / "deployments" / "compose" / "compose.yaml"
# The schemas kubernetes-validate ships; 1.33 is a current release line
# (kubernetes-validate 1.37 carries 1.x up to 1.37).
K8S_VERSION = "1.33.0"

pytestmark = pytest.mark.timeout(60)


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _manifest_files() -> list[Path]:
    files = sorted(K8S_DIR.glob("*.yaml"))
    assert files, f"no manifests in {K8S_DIR}"
    return files


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifest_validates(path: Path) -> None:
    for doc in _docs(path.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_manifest() -> None:
    # The check above is not vacuous: a misspelt field fails strict validation.
    doc = _docs((K8S_DIR / "10-relay.yaml").read_text())[0]
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


PKI_DEV = [sys.executable, "-m", "outrelay.cli", "pki", "dev"]


def _pki_dev(out: Path, secret: str, *more: str) -> subprocess.CompletedProcess[str]:
    """``outrelay pki dev --out OUT --k8s-secret SECRET [MORE...]``."""
    return subprocess.run(
        [*PKI_DEV, "--out", str(out), "--k8s-secret", secret, *more],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_manifests_use_the_secrets_pki_dev_emits(tmp_path: Path) -> None:
    out = _pki_dev(tmp_path / "pki", "outrelay", "--k8s-namespace", "outrelay")
    assert out.returncode == 0, out.stderr
    secrets = _docs(out.stdout)
    assert [s["metadata"]["name"] for s in secrets] == [
        "outrelay-relay",
        "outrelay-agent-a",
        "outrelay-agent-b",
    ]
    ca_pem = (tmp_path / "pki" / "ca.crt").read_bytes()
    for secret, base in zip(secrets, ("relay", "agent-a", "agent-b"), strict=True):
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
        assert secret["type"] == "kubernetes.io/tls"
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        assert data["tls.crt"] == (tmp_path / "pki" / f"{base}.crt").read_bytes()
        assert data["tls.key"] == (tmp_path / "pki" / f"{base}.key").read_bytes()
        assert data["ca.crt"] == ca_pem
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uri = san.value.get_values_for_type(x509.UniformResourceIdentifier)[0]
        assert secret["metadata"]["annotations"]["outrelay.dev/uri"] == uri
    # The summary went to stderr, so stdout is YAML alone.
    assert "Dev PKI written" in out.stderr

    mounted = set()
    for path in _manifest_files():
        for doc in _docs(path.read_text()):
            if doc["kind"] == "Deployment":
                for vol in doc["spec"]["template"]["spec"].get("volumes", []):
                    mounted.add(vol["secret"]["secretName"])
    assert mounted == {s["metadata"]["name"] for s in secrets}


def test_bad_secret_name_is_a_usage_error(tmp_path: Path) -> None:
    proc = _pki_dev(tmp_path / "p", "Not_Valid")
    assert proc.returncode == 2
    assert "invalid Secret name" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_probes_point_at_the_admin_endpoint() -> None:
    for path in _manifest_files():
        for doc in _docs(path.read_text()):
            if doc["kind"] != "Deployment":
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                if not c["image"].startswith("localhost/outrelay:"):
                    continue
                assert "--admin-listen=0.0.0.0:9901" in c["args"], (path.name, c["name"])
                assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert c["resources"]["limits"]["memory"]


def test_tproxy_example_shape() -> None:
    doc = _docs((K8S_DIR / "50-sidecar-tproxy.yaml").read_text())[0]
    spec = doc["spec"]["template"]["spec"]
    assert spec["dnsPolicy"] == "None"
    assert spec["dnsConfig"]["nameservers"] == ["127.0.0.1"]
    init = spec["initContainers"][0]
    assert init["command"] == ["iptables"]
    assert "NET_ADMIN" in init["securityContext"]["capabilities"]["add"]
    agent = next(c for c in spec["containers"] if c["name"] == "outrelay-agent")
    assert "--dns-listen=127.0.0.1:53" in agent["args"]
    assert "--tproxy-listen=127.0.0.1:15001" in agent["args"]
    assert "15001" in init["args"]
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_compose_shares_the_agent_namespace_and_publishes_nothing() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert services["app"]["network_mode"] == "service:outrelay-agent"
    assert all("ports" not in s for s in services.values())
