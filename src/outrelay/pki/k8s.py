"""Kubernetes Secret manifests for ``outrelay pki dev --k8s-secret NAME``.

A sidecar reads its identity from files; on Kubernetes those files come from a
Secret mounted read-only. This module renders such a Secret as YAML text, pure
(PEM bytes in, text out), so the CLI can print it and a test can validate it
against the Kubernetes schemas.

The Secret has type ``kubernetes.io/tls`` (keys ``tls.crt`` and ``tls.key``,
which that type requires) plus ``ca.crt``: the same key names cert-manager
writes, so a Secret managed by cert-manager can replace it unchanged. The
YAML is written by hand rather than with a YAML library: every value is either
base64 (no YAML-special characters) or a JSON string (a valid YAML
double-quoted scalar), so no dependency is needed for a correct document.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping

__all__ = ["URI_ANNOTATION", "secret_yaml", "validate_secret_name"]

#: Annotation carrying the identity URI of the certificate, for the reader
#: of the Secret (the agent's ``--uri`` must equal it).
URI_ANNOTATION = "outrelay.dev/uri"

# A Secret name is a DNS-1123 subdomain: lower-case alphanumerics, '-' and
# '.', starting and ending alphanumeric, at most 253 characters.
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MAX_NAME = 253


def validate_secret_name(name: str) -> str:
    """Return ``name`` if it is a valid Kubernetes object name.

    Raises:
        ValueError: ``name`` is not a DNS-1123 subdomain; the message says so.
    """
    if len(name) > _MAX_NAME or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise ValueError(
            f"invalid Secret name {name!r}: use lower-case letters, digits, '-' and '.', "
            f"starting and ending with a letter or digit, at most {_MAX_NAME} characters"
        )
    return name


def secret_yaml(
    name: str,
    *,
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    namespace: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Render one ``kind: Secret`` YAML document (without the ``---`` separator).

    Args:
        name: Secret name (checked with :func:`validate_secret_name`).
        cert_pem: Leaf certificate, PEM (``tls.crt``).
        key_pem: Its private key, PEM (``tls.key``).
        ca_pem: CA bundle that verifies the peer, PEM (``ca.crt``).
        namespace: ``metadata.namespace``; omitted when None (kubectl's
            ``-n`` then decides).
        annotations: Extra ``metadata.annotations``.

    Returns:
        The YAML text, ending in a newline.
    """
    validate_secret_name(name)
    lines = ["apiVersion: v1", "kind: Secret", "metadata:", f"  name: {name}"]
    if namespace is not None:
        lines.append(f"  namespace: {validate_secret_name(namespace)}")
    lines += ["  labels:", "    app.kubernetes.io/part-of: outrelay"]
    if annotations:
        lines.append("  annotations:")
        lines += [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in annotations.items()]
    lines += ["type: kubernetes.io/tls", "data:"]
    for key, value in (("tls.crt", cert_pem), ("tls.key", key_pem), ("ca.crt", ca_pem)):
        lines.append(f"  {key}: {base64.b64encode(value).decode('ascii')}")
    return "\n".join(lines) + "\n"
