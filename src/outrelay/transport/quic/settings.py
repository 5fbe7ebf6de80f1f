"""Limits and timeouts of the QUIC backend (spec 01 "QUIC transport"), one place.

Read them as ``settings.NAME`` at the time of use: a test may change one
(``settings.STREAM_WINDOW = 4096``) for the connections it makes next.
"""

from __future__ import annotations

__all__ = [
    "BUSY_SILENCE_FLOOR",
    "CLOSE_REASON_MAX",
    "CONNECTION_WINDOW",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "KEEPALIVE_INTERVAL",
    "LARGE_DATAGRAM_MAX",
    "LIVENESS_CHECK",
    "MAX_DATAGRAM_SIZE",
    "MAX_INCOMING_STREAMS",
    "PEER_SILENCE_TIMEOUT",
    "SEND_BUFFER",
    "STREAM_WINDOW",
]

IDLE_TIMEOUT = 10.0  # spec 01: max idle timeout 10 s
KEEPALIVE_INTERVAL = 3.0  # spec 01: keep-alive every 3 s
HANDSHAKE_TIMEOUT = 5.0  # spec 01: quic-go's handshake idle timeout
LIVENESS_CHECK = 0.5
BUSY_SILENCE_FLOOR = 3.0
"""With bytes in flight, silence longer than max(this, 4 x PTO) means the peer
is gone (bench: resume stall 9 s -> ~3 s)."""
PEER_SILENCE_TIMEOUT = 6.5
"""Ours: two keep-alives (3 s) without a single packet back means the peer is
gone; close at once instead of waiting out the 10 s idle timeout. Local
only, so wire-compatible; it shortens the stall when a relay dies."""
MAX_INCOMING_STREAMS = 1024
"""Peer-opened bidirectional streams allowed at once. The reference (quic-go's
default) allows 100, so a reference relay makes our agent queue its 101st
open; between our relay and agents 1,000 application connections fit on one
connection (bench: concurrency). Each stream's buffers are bounded by
``STREAM_WINDOW``."""
STREAM_WINDOW = 1 << 20
"""Receive credit per stream beyond what the application consumed. One MiB
keeps a loopback path busy; 100 streams x 1 MiB bounds what a peer can make
us buffer on one connection."""
SEND_BUFFER = 1 << 20
"""Unacknowledged bytes per stream before ``send_all`` waits."""
CLOSE_REASON_MAX = 200
"""Bytes of a CONNECTION_CLOSE reason phrase we send; it must fit one packet."""
MAX_DATAGRAM_SIZE = 1350
"""aioquic does no path-MTU discovery; 1350 B fits every common IPv4/IPv6
path and is ~20 % faster than the 1200 B minimum (DESIGN.md). Every
connection starts with it; :mod:`~.path_mtu` raises it where the path allows."""
LARGE_DATAGRAM_MAX = 16384
"""The largest datagram an aioquic connection sends on a jumbo path
(:mod:`~.path_mtu`), and aioquic's limit: it writes STREAM and CRYPTO frame
lengths as 2-byte varints (at most 16,383), so a larger datagram carries a
corrupt frame. Bench, loopback, one run (CPU s/GiB summed over relay and both
agents): 1,350 B 87, 4 KiB 33, 16 KiB 14 (BENCHMARKS.md)."""
CONNECTION_WINDOW = 16 << 20

DATAGRAM_FRAME_MAX = 65536
"""``max_datagram_frame_size`` we announce (RFC 9221 §3): we accept DATAGRAM frames."""
DATAGRAM_PAYLOAD_MAX = 1100
"""The largest payload we send in one DATAGRAM frame: it must fit in one packet of the
1,200-byte minimum path with the QUIC headers; larger ones go on the stream."""
DATAGRAM_QUEUE_MAX = 256
"""DATAGRAM frames waiting in the QUIC library (congestion window full) before we drop."""
