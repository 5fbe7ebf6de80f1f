"""The one development PKI of the test suite (``outrelay pki dev``, made once a session).

``tests/conftest.py`` offers it as the session fixture ``dev_pki``; the layers adapt it
to what their tests expect (``tests/e2e``: ``pki`` is the :class:`DevPki` itself;
``tests/relay``: ``rawagent.Pki``, whose ``agent(tenant)`` returns a TLS config and a
URI; ``tests/transport``: ``tlspki.Pki``, the relay's and an agent's TLS configs;
``tests/pki``: ``ca`` is :attr:`DevPki.ca`).

What it holds:

* the CA as an :class:`outrelay.pki.Issued` (:attr:`DevPki.ca`) and its certificate
  file (:attr:`DevPki.ca_cert`, the ``--ca`` bundle of relays and agents);
* the relay's certificate and key files (``localhost``, 127.0.0.1, ::1);
* the two agent identities ``pki dev`` writes (tenant ``acme``): :meth:`DevPki.agent`;
* :meth:`DevPki.issue_agent`: one more agent identity, any tenant, from the same CA.

Issuing is in-process (the library), never a subprocess: ``tests/pki/test_cli.py``
tests the command itself.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outrelay.pki import Issued, issue_agent, load_ca, write_identity
from outrelay.pki.cli import main as pki_main
from outrelay.transport import QuicTlsConfig

__all__ = ["DevPki", "Identity", "make_dev_pki"]

TENANT = "acme"
"""The tenant of the ``pki dev`` agents and the default of :meth:`DevPki.issue_agent`."""

_serial = itertools.count()


@dataclass(frozen=True)
class Identity:
    """An agent identity on disk: its name, URI SAN, certificate and key files."""

    name: str
    uri: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPki:
    """A dev CA, a relay certificate and agent identities, written under :attr:`dir`."""

    dir: Path
    ca: Issued
    ca_cert: Path
    relay_cert: Path
    relay_key: Path
    agents: tuple[Identity, ...]
    """The identities ``pki dev`` wrote (``agent-a``, ``agent-b``; tenant ``acme``)."""

    def agent(self, index: int) -> Identity:
        """The ``index``-th ``pki dev`` agent identity (0: ``agent-a``, 1: ``agent-b``)."""
        return self.agents[index]

    def issue_agent(
        self,
        name: str | None = None,
        *,
        tenant: str = TENANT,
        out: Path | None = None,
        ca: Issued | None = None,
        **kwargs: Any,
    ) -> Identity:
        """One more agent identity of ``tenant``, written to ``out`` (default ``dir/extra``).

        Args:
            name: File base name (default: a fresh ``agent-<n>``); an existing
                identity of that name in ``out`` is replaced.
            ca: Issue from this CA instead of the dev CA (a foreign identity).
            kwargs: Passed to :func:`outrelay.pki.issue_agent` (``days``,
                ``not_before``, ``not_after``, ...).
        """
        name = name or f"agent-{next(_serial)}"
        out = out or self.dir / "extra"
        issued, uri = issue_agent(ca or self.ca, tenant=tenant, **kwargs)
        cert, key = write_identity(out, name, issued, force=True)
        return Identity(name=name, uri=uri, cert=cert, key=key)

    def write(self, name: str, issued: Issued, out: Path | None = None) -> tuple[Path, Path]:
        """Write any certificate and key (``out``, default ``dir/extra``); returns the files."""
        return write_identity(out or self.dir / "extra", name, issued, force=True)

    def tls(self, identity: Identity, ca_file: Path | str | None = None) -> QuicTlsConfig:
        """The client TLS config of ``identity``, trusting ``ca_file`` (default: the dev CA)."""
        return QuicTlsConfig(str(identity.cert), str(identity.key), str(ca_file or self.ca_cert))

    def relay_tls(self) -> QuicTlsConfig:
        """The relay's server TLS config (its certificate, client certificates from the CA)."""
        return QuicTlsConfig(str(self.relay_cert), str(self.relay_key), str(self.ca_cert))


def make_dev_pki(out: Path) -> DevPki:
    """``outrelay pki dev --out OUT`` (in-process) and everything it wrote."""
    with contextlib.redirect_stdout(io.StringIO()) as said:
        code = pki_main(["pki", "dev", "--out", str(out)])
    if code != 0:
        raise RuntimeError(f"outrelay pki dev failed ({code}): {said.getvalue()}")
    data = json.loads((out / "identities.json").read_text())
    agents = tuple(
        Identity(name=a["name"], uri=a["uri"], cert=Path(a["cert"]), key=Path(a["key"]))
        for a in data["agents"]
    )
    return DevPki(
        dir=out,
        ca=load_ca(out),
        ca_cert=out / "ca.crt",
        relay_cert=out / "relay.crt",
        relay_key=out / "relay.key",
        agents=agents,
    )
