"""The first TLS record a Python client sends: a ClientHello, for listeners to be fed by hand.

Shared by the ClientHello parser test, the TCP admission tests (half a hello that
stalls a handshake) and the e2e flood of half-open TLS handshakes.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

__all__ = ["client_hello"]


def client_hello(alpn: Sequence[str] | None = ("orp/1",)) -> bytes:
    """A TLS 1.3 ClientHello for ``localhost`` offering ``alpn`` (None: no ALPN extension)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if alpn is not None:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:  # it waits for a ServerHello: the hello is out
        return outgoing.read()
    raise AssertionError("a TLS client finished its handshake without a server")
