"""Limits and timeouts of the TLS + yamux over TCP backend."""

from __future__ import annotations

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_TLS_HANDSHAKES",
    "MAX_TLS_HANDSHAKES_PER_SOURCE",
    "SEND_CHUNK",
    "WRITE_BUFFER_HIGH",
    "WRITE_BUFFER_MAX",
]

HANDSHAKE_TIMEOUT = 10.0
"""Spec 02 §9.3 [REC]: TCP connect plus TLS handshake, each side. On the
server, a socket whose handshake has not completed by then is aborted."""
MAX_TLS_HANDSHAKES = 256
"""Server: TLS handshakes in progress at once, all sources together. Each one
holds a socket, an SSLObject with its BIOs and a task (~30-60 KiB) for up to
:data:`HANDSHAKE_TIMEOUT`; 256 bound that to ~15 MiB and a few hundred file
descriptors, while a handshake on a live link takes milliseconds, so agents
reconnecting after a restart do not come near it. Over it, a new socket is
closed at once (the client's reconnect loop tries again)."""
MAX_TLS_HANDSHAKES_PER_SOURCE = 32
"""Server: TLS handshakes in progress from one IP address: a host that opens
sockets and stalls them can take an eighth of :data:`MAX_TLS_HANDSHAKES`,
never all of it."""
CLOSE_TIMEOUT = 5.0
"""After ``close()``, give the socket this long to flush, then abort it."""
SEND_CHUNK = 128 * 1024
"""Largest DATA frame we write at once; smaller frames interleave streams
more fairly, larger ones cost less Python per byte."""
WRITE_BUFFER_HIGH = 1 << 20
"""Socket write buffer above which ``send_all`` waits (asyncio pause_writing)."""
WRITE_BUFFER_LOW = 256 * 1024
WRITE_BUFFER_MAX = 16 << 20
"""Hard cap: over this, the peer is not reading at all; drop the connection."""
TLS_READ_SIZE = 256 * 1024
MAX_CLIENT_HELLO = 64 * 1024
"""Bytes the server reads looking for the ClientHello's ALPN before giving
the handshake to OpenSSL regardless (real ClientHellos are under 2 KiB)."""
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 15, 5, 3
"""TCP keep-alive: a peer silent for 15 s is probed 3 times 5 s apart."""
