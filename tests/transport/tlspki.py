"""The session's dev PKI (``tests/devpki.py``) as the transport tests use it.

``tests/transport/conftest.py`` offers it as the fixture ``pki``; a test module that
names the type imports it from here, never from the conftest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from devpki import DevPki

from outrelay.pki import Issued
from outrelay.transport import QuicTlsConfig

__all__ = ["Pki"]


@dataclass
class Pki:
    """TLS configs over :class:`DevPki`: the relay's, one agent's, and any client's."""

    dev: DevPki
    dir: Path = field(init=False)
    """Where :meth:`client` writes the identities it is given."""
    ca: Issued = field(init=False)
    ca_file: str = field(init=False)
    relay: QuicTlsConfig = field(init=False)
    """The relay's server TLS config (client certificates checked against the CA)."""
    agent: QuicTlsConfig = field(init=False)
    """The first ``pki dev`` agent's client TLS config (tenant ``acme``)."""
    agent_uri: str = field(init=False)
    """The identity (URI SAN) of :attr:`agent`."""

    def __post_init__(self) -> None:
        dev = self.dev
        self.dir = dev.dir / "transport"
        self.ca = dev.ca
        self.ca_file = str(dev.ca_cert)
        self.relay = dev.relay_tls()
        self.agent = dev.tls(dev.agent(0))
        self.agent_uri = dev.agent(0).uri

    def client(self, name: str, issued: Issued, ca_file: str | None = None) -> QuicTlsConfig:
        """Write ``issued`` as ``name`` under :attr:`dir`; its TLS config, trusting ``ca_file``."""
        crt, key = self.dev.write(name, issued, self.dir)
        return QuicTlsConfig(str(crt), str(key), ca_file or self.ca_file)
