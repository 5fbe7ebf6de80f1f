"""The session's dev PKI (``tests/devpki.py``) as the transport tests use it.

``tests/transport/conftest.py`` offers it as the fixture ``pki``; a test module that
names the type imports it from here, never from the conftest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from devpki import DevPki

from outrelay.pki import Issued
from outrelay.transport import QuicTlsConfig

__all__ = ["Pki"]


@dataclass(frozen=True)
class Pki:
    """TLS configs over :class:`DevPki`: the relay's, one agent's, and any client's."""

    dev: DevPki

    @property
    def dir(self) -> Path:
        """Where :meth:`client` writes the identities it is given."""
        return self.dev.dir / "transport"

    @property
    def ca(self) -> Issued:
        return self.dev.ca

    @property
    def ca_file(self) -> str:
        return str(self.dev.ca_cert)

    @property
    def relay(self) -> QuicTlsConfig:
        """The relay's server TLS config (client certificates checked against the CA)."""
        return self.dev.relay_tls()

    @property
    def agent(self) -> QuicTlsConfig:
        """The first ``pki dev`` agent's client TLS config (tenant ``acme``)."""
        return self.dev.tls(self.dev.agent(0))

    @property
    def agent_uri(self) -> str:
        """The identity (URI SAN) of :attr:`agent`."""
        return self.dev.agent(0).uri

    def client(self, name: str, issued: Issued, ca_file: str | None = None) -> QuicTlsConfig:
        """Write ``issued`` as ``name`` under :attr:`dir`; its TLS config, trusting ``ca_file``."""
        crt, key = self.dev.write(name, issued, self.dir)
        return QuicTlsConfig(str(crt), str(key), ca_file or self.ca_file)
