"""TCP fallback backend of the transport interface: TLS 1.3 + yamux.

Spec 01 "TCP fallback", spec 02 §9 and spec 03 §2.2: TLS 1.3 on TCP with
ALPN ``orp/1`` and the same certificates as QUIC, then a hashicorp yamux
session (:mod:`outrelay.transport.yamux`), the dialler being the yamux client.
Keep-alive is off on the wire, as the reference configures it.

Layers, all driven by asyncio callbacks on one :class:`asyncio.Protocol`:

* **TCP**: ``loop.create_connection``/``create_server``. SO_KEEPALIVE is on so
  the kernel finds a silently dead peer (ours: the wire is unchanged). A
  socket error or EOF breaks every stream with :class:`BrokenResourceError`.
* **TLS**: stdlib ``ssl`` over memory BIOs, not asyncio's ``start_tls``, so
  the server can read the ClientHello first: a client offering ALPN without
  ``orp/1`` gets a ``no_application_protocol`` alert, one offering no ALPN is
  accepted (spec 02 §9.1, as Go's crypto/tls does). The server requires a
  client certificate (OpenSSL checks chain, dates and EKU against the CA)
  and then calls ``verify_client`` for the identity (first URI SAN), as
  :mod:`outrelay.transport.quic` does.
* **yamux**: the sans-IO core; :mod:`~.connection` only moves its bytes and events.

Backpressure both ways (DESIGN.md):

* **Receiving**: a stream buffers at most its yamux window; credit goes back
  when the application reads (``receive_some``), so a slow reader stalls its
  writer, not the connection.
* **Sending**: ``send_all`` waits while the peer's window for the stream is
  used up, and while the socket's write buffer is over
  :data:`WRITE_BUFFER_HIGH`. A peer that stops reading the socket while we
  still owe it control frames is cut off at :data:`WRITE_BUFFER_MAX`.

Server robustness (spec 02 §9.3 [REC]): every accepted socket gets its own
task that waits for the TLS handshake at most :data:`HANDSHAKE_TIMEOUT` and
then verifies the client; failures (port scans, garbage, no or bad
certificates, stalled clients) are reported to ``on_refused`` and never
touch the accept loop. At most :data:`MAX_TLS_HANDSHAKES` handshakes run at
once, :data:`MAX_TLS_HANDSHAKES_PER_SOURCE` from one IP address; a socket
beyond either cap is closed as soon as it is accepted, before any TLS state
exists for it.

Modules: :mod:`~.settings` (limits), :mod:`~.client_hello` (the sans-IO
ClientHello parser), :mod:`~.stream` (:class:`TcpStream` and the ``StreamOwner``
interface it uses to reach its connection),
:mod:`~.connection` (:class:`TcpConn`, the yamux connection),
:mod:`~.tls_shell` (socket I/O and the TLS pump) and :mod:`~.endpoints`
(dial, listen, handshake caps). Only the last two touch ``ssl`` and socket
errors; they come out as :mod:`outrelay.transport.base` errors.
"""

from __future__ import annotations

from outrelay.transport.tcp.client_hello import IncompleteClientHello, client_hello_alpn
from outrelay.transport.tcp.connection import TcpConn
from outrelay.transport.tcp.endpoints import (
    TcpServerHandle,
    connect_tcp,
    connect_yamux_plaintext,
    serve_tcp,
    serve_yamux_plaintext,
)
from outrelay.transport.tcp.settings import (
    HANDSHAKE_TIMEOUT,
    MAX_TLS_HANDSHAKES,
    MAX_TLS_HANDSHAKES_PER_SOURCE,
    SEND_CHUNK,
    WRITE_BUFFER_HIGH,
    WRITE_BUFFER_MAX,
)
from outrelay.transport.tcp.stream import TcpStream

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_TLS_HANDSHAKES",
    "MAX_TLS_HANDSHAKES_PER_SOURCE",
    "SEND_CHUNK",
    "WRITE_BUFFER_HIGH",
    "WRITE_BUFFER_MAX",
    "IncompleteClientHello",
    "TcpConn",
    "TcpServerHandle",
    "TcpStream",
    "client_hello_alpn",
    "connect_tcp",
    "connect_yamux_plaintext",
    "serve_tcp",
    "serve_yamux_plaintext",
]
