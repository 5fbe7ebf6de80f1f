"""A sans-IO implementation of the hashicorp yamux session protocol.

Spec 01 "TCP fallback" and spec 02 §9: after TLS on TCP, agent and relay
speak hashicorp yamux, protocol version 0. The agent is the client (odd
stream ids, stream 1 is ORP ctrl), the relay the server (even ids).

Theory of operation
===================

One :class:`YamuxSession` is one yamux conversation. It does no I/O, reads no
clock and starts no task (STYLE.md §1):

* **bytes in**: :meth:`YamuxSession.receive_data` takes whatever the socket
  gave, in any split; ``b""`` is EOF.
* **meaning out**: :meth:`YamuxSession.next_event` returns the next event
  (:class:`StreamOpened`, :class:`DataReceived`, :class:`StreamEnded`, ...) or
  ``None``. Call it after *every* method, not only after ``receive_data``: a
  stream that closes can let a backlogged one through (see "Limits").
* **intent in**: :meth:`~YamuxSession.open_stream`,
  :meth:`~YamuxSession.send_data`, :meth:`~YamuxSession.end_stream`,
  :meth:`~YamuxSession.reset_stream`, :meth:`~YamuxSession.ping`,
  :meth:`~YamuxSession.go_away`, and
  :meth:`~YamuxSession.acknowledge_received` once the application has
  *consumed* bytes.
* **bytes out**: :meth:`YamuxSession.data_to_send`, after every call above.
  The core also speaks on its own (ACK of a new stream, ping replies,
  WINDOW_UPDATE, GO_AWAY after a protocol error).

Wire format (hashicorp ``spec.md``)
-----------------------------------

Every frame starts with a 12-byte big-endian header: version u8 (0), type u8
(:class:`FrameType`), flags u16 (:class:`Flag`), stream id u32, length u32.
Only DATA frames carry a payload (``length`` bytes). For WINDOW_UPDATE the
length is a credit delta; for PING an opaque value echoed back with ACK; for
GO_AWAY an error code (:class:`GoAwayCode`). A stream is opened by the first
frame carrying SYN (we send a zero-delta WINDOW_UPDATE, like hashicorp) and
acknowledged by ACK; FIN half-closes one direction, RST resets both.

Flow control: credit returned on consumption
---------------------------------------------

Each direction of each stream starts with a 256 KiB window
(:data:`INITIAL_STREAM_WINDOW`). A receiver must never get more bytes than it
granted: a DATA frame longer than the remaining credit is a protocol error
(GO_AWAY 1), checked on the header, before any payload byte is read. So the
bytes buffered for a stream are bounded by its window.

Credit goes back when the *application* has read bytes (h2's
``acknowledge_received_data``, STYLE.md §1), not when they arrive: a slow
reader caps what the peer can push. Per stream we keep::

    credit   -- bytes the peer may still send
    unacked  -- bytes received, not yet consumed by the application
    window   -- the target; always credit + unacked <= window

and send WINDOW_UPDATE(window - unacked - credit) once that delta reaches
half a window (hashicorp batches the same way).

Auto-tuning. A fixed 256 KiB window caps one stream at 256 KiB per round trip
(~40 Mbit/s at 50 ms). We double a stream's window, up to
:data:`MAX_STREAM_WINDOW`, when the peer *ran out of credit* since the last
growth and the application has *caught up* (nothing left unread): then the
window, not the reader, was the limit. This is the clock-free form of the
rule in h2 and quic-go/go-yamux ("the window was used up within a few RTTs").
A reader that stops reading never satisfies "caught up", and what growth can
cost is bounded twice: per stream (16 MiB) and per session
(:data:`AUTOTUNE_BUDGET`, returned when a stream ends). hashicorp/yamux peers
need no support for this: a larger window is just a larger WINDOW_UPDATE.

Limits
------

* Incoming streams: at most ``max_incoming_streams`` (100, as quic-go's
  default on the QUIC path, spec 02 §2.1) are open at once from the peer.
  Further SYNs are still ACKed at once but wait in an accept backlog of
  ``accept_backlog`` (256, hashicorp's ``AcceptBacklog``); their bytes stay
  in this core, within the stream's initial window, and they are announced
  (:class:`StreamOpened`, then the buffered data) as soon as an open stream
  ends. Beyond the backlog a SYN is answered with RST, as hashicorp does when
  its backlog is full. We ACK at once rather than hold the ACK as
  backpressure because hashicorp/yamux v0.1.2 (the reference relay) closes
  the *whole session* when an opened stream stays un-ACKed for 75 s.
* Outgoing streams: at most ``max_inflight_opens`` (256, hashicorp's SYN
  semaphore) un-ACKed SYNs; :attr:`YamuxSession.can_open_stream` turns false
  and the shell waits for :class:`StreamAcknowledged`. This never overruns a
  hashicorp peer's backlog.

Where we differ from hashicorp/yamux (all compatible on the wire)
------------------------------------------------------------------

* Half-close is kept per stream: after our FIN we still read, after the
  peer's FIN we still write (the reference's Go stream wrapper lacks the
  former, spec 03 §2.2).
* A SYN with the wrong parity or id 0 is a protocol error (hashicorp takes
  it); ids need not grow, since hashicorp may send SYNs out of order.
* Data after the peer's FIN and a second FIN reset that stream only
  (hashicorp buffers the former and ends the session on the latter).
* Window auto-tuning and the incoming-stream limit, described above.

Errors
======

:class:`YamuxError` is the only exception this module raises. A
:class:`YamuxRemoteError` means the peer broke the protocol: the core has
already queued GO_AWAY with the error's ``error_code`` and is terminated; send
:meth:`~YamuxSession.data_to_send` and close the socket. A
:class:`YamuxLocalError` means the caller misused the API. Stream-level faults
(data after the peer's FIN, a second FIN) are not connection errors: the core
resets that stream and reports :class:`StreamReset`, as h2 answers stream
errors with RST_STREAM.
"""

from __future__ import annotations

from outrelay.transport.yamux.frames import (
    ACCEPT_BACKLOG,
    AUTOTUNE_BUDGET,
    HEADER_SIZE,
    INITIAL_STREAM_WINDOW,
    MAX_INCOMING_STREAMS,
    MAX_INFLIGHT_OPENS,
    MAX_STREAM_WINDOW,
    PROTOCOL_VERSION,
    ConnectionEnded,
    DataReceived,
    Event,
    Flag,
    FrameType,
    GoAwayCode,
    GoAwayReceived,
    Header,
    PingAcknowledged,
    PingReceived,
    StreamAcknowledged,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    YamuxError,
    YamuxLocalError,
    YamuxProtocolError,
    YamuxRemoteError,
)
from outrelay.transport.yamux.session import YamuxSession
from outrelay.transport.yamux.state import StreamInput, StreamState, YamuxConfig, YamuxStatistics

__all__ = [
    "ACCEPT_BACKLOG",
    "AUTOTUNE_BUDGET",
    "HEADER_SIZE",
    "INITIAL_STREAM_WINDOW",
    "MAX_INCOMING_STREAMS",
    "MAX_INFLIGHT_OPENS",
    "MAX_STREAM_WINDOW",
    "PROTOCOL_VERSION",
    "ConnectionEnded",
    "DataReceived",
    "Event",
    "Flag",
    "FrameType",
    "GoAwayCode",
    "GoAwayReceived",
    "Header",
    "PingAcknowledged",
    "PingReceived",
    "StreamAcknowledged",
    "StreamEnded",
    "StreamInput",
    "StreamOpened",
    "StreamReset",
    "StreamState",
    "WindowUpdated",
    "YamuxConfig",
    "YamuxError",
    "YamuxLocalError",
    "YamuxProtocolError",
    "YamuxRemoteError",
    "YamuxSession",
    "YamuxStatistics",
]
