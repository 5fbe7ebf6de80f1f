"""mTLS admission on both transports: the clients a relay must not let in are refused.

DESIGN.md asks for proof that a client certificate from another CA, an expired one,
one without a URI SAN and no client certificate at all are each refused by the
server. The same matrix runs against a QUIC listener (dialled with each QUIC client
library) and a TLS + yamux listener: the client's connection ends, the listener
reports the refusal with its reason and hands no connection on, and a good client
still gets in afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration
from quicbackends import HAVE_QH3

from outrelay.pki import Issued, create_ca, issue_agent
from outrelay.transport import BrokenResourceError, Connection, QuicTlsConfig
from outrelay.transport.tcp import connect_tcp

from .listeners import Listener, dial_quic, listen_quic, listen_tcp, raw_tls_exchange
from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)

OTHER_CA = "other-ca"
"""From a CA with another name."""
LOOKALIKE_CA = "lookalike-ca"
"""From another CA with the dev CA's name (``create_ca()``'s default): only the key differs."""
EXPIRED = "expired"
NO_URI = "no-uri-san"
NO_CERT = "no-certificate"


def _leaf(pki: Pki, case: str) -> Issued:
    """The certificate the refused client presents in ``case``."""
    if case in (OTHER_CA, LOOKALIKE_CA):
        other = create_ca("Other CA") if case == OTHER_CA else create_ca()
        return issue_agent(other, tenant="acme")[0]
    if case == EXPIRED:
        now = dt.datetime.now(dt.UTC)
        return issue_agent(
            pki.ca,
            tenant="acme",
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        )[0]
    assert case == NO_URI
    return issue_agent(pki.ca, tenant="acme", uri_sans=())[0]


class Quic:
    """A QUIC listener, dialled with the client library ``backend``."""

    reasons = {
        OTHER_CA: "does not verify",
        LOOKALIKE_CA: "does not verify",
        EXPIRED: "expired",
        NO_URI: "^no URI SAN$",
        NO_CERT: "^no client certificate$",
    }
    """Per case: a pattern the server's refusal reason matches (``re.search``)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    async def listen(self, pki: Pki) -> Listener[Any]:
        return await listen_quic(pki)

    async def dial(self, port: int, tls: QuicTlsConfig) -> Connection:
        return await dial_quic(self.backend, port, tls)

    async def refused_client(self, port: int, tls: QuicTlsConfig) -> None:
        """Connect with a certificate the server refuses; return once the client saw it."""
        client = await self.dial(port, tls)
        # TLS 1.3: the client finishes first; the server then closes the connection.
        async with asyncio.timeout(10):
            await client.wait_closed()

    async def no_certificate(self, port: int, ca_file: str) -> None:
        """Connect without a client certificate (aioquic's client: ours always sends one)."""
        config = QuicConfiguration(
            is_client=True, alpn_protocols=["orp/1"], server_name="localhost"
        )
        config.load_verify_locations(cafile=ca_file)
        async with connect("127.0.0.1", port, configuration=config) as protocol:
            async with asyncio.timeout(10):
                await protocol.wait_closed()


class Tcp:
    """A TLS + yamux listener."""

    reasons = {
        OTHER_CA: "certificate verify failed",
        LOOKALIKE_CA: "certificate verify failed",
        EXPIRED: "expired",
        NO_URI: "^no URI SAN$",
        NO_CERT: "(?i)certificate",
    }

    async def listen(self, pki: Pki) -> Listener[Any]:
        return await listen_tcp(pki)

    async def dial(self, port: int, tls: QuicTlsConfig) -> Connection:
        return await connect_tcp("127.0.0.1", port, tls)

    async def refused_client(self, port: int, tls: QuicTlsConfig) -> None:
        try:
            conn = await connect_tcp("127.0.0.1", port, tls, handshake_timeout=5)
        except BrokenResourceError as exc:
            assert str(exc)
            return
        # TLS 1.3: the client finishes its handshake before the server's verdict.
        async with asyncio.timeout(5):
            await conn.wait_closed()
        assert conn.close_reason
        assert not conn.close_reason.startswith("closed locally")

    async def no_certificate(self, port: int, ca_file: str) -> None:
        """A plain ``ssl`` client without a certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca_file)
        ctx.set_alpn_protocols(["orp/1"])
        assert await raw_tls_exchange(port, ctx) != "data"


TRANSPORTS = ["aioquic", "qh3", "tcp"]


def _params() -> list[Any]:
    out = []
    for name in TRANSPORTS:
        # The no-certificate client is aioquic's on QUIC: once is enough.
        cases = [OTHER_CA, LOOKALIKE_CA, EXPIRED, NO_URI] + ([] if name == "qh3" else [NO_CERT])
        marks = pytest.mark.skipif(name == "qh3" and not HAVE_QH3, reason="qh3 is not installed")
        out += [pytest.param(name, case, id=f"{name}-{case}", marks=marks) for case in cases]
    return out


@pytest.mark.parametrize(("transport", "case"), _params())
async def test_server_refuses_the_client(pki: Pki, transport: str, case: str) -> None:
    t = Tcp() if transport == "tcp" else Quic(transport)
    listener = await t.listen(pki)
    try:
        if case == NO_CERT:
            await t.no_certificate(listener.port, pki.ca_file)
        else:
            tls = pki.client(case, _leaf(pki, case))
            await t.refused_client(listener.port, tls)
        (reason,) = await listener.refusals(1)
        assert re.search(t.reasons[case], reason), reason
        assert listener.conns.empty()
        # ... and a good client still gets in.
        client = await t.dial(listener.port, pki.agent)
        assert (await listener.accepted()).identity == pki.agent_uri
        client.close()
        assert len(listener.refused) == 1, listener.refused
    finally:
        await listener.close()
