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

import enum
import struct
from collections import deque
from dataclasses import dataclass, field

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

PROTOCOL_VERSION = 0
HEADER_SIZE = 12
_HEADER = struct.Struct(">BBHII")
INITIAL_STREAM_WINDOW = 256 * 1024
"""Spec 01: every stream starts with 256 KiB of credit each way (protocol constant)."""
MAX_STREAM_WINDOW = 16 << 20
"""Auto-tuning stops here: 16 MiB fills ~2.6 Gbit/s at 50 ms RTT."""
AUTOTUNE_BUDGET = 32 << 20
"""Window growth one session may grant in total, beyond the initial windows.
Bounds what a peer can make us buffer even if every stream was tuned up."""
MAX_INCOMING_STREAMS = 100
"""Peer-opened streams open at once; spec 02 §2.1 (quic-go's default)."""
ACCEPT_BACKLOG = 256
"""hashicorp ``AcceptBacklog`` default: SYNs waiting beyond the limit above."""
MAX_INFLIGHT_OPENS = 256
"""Our own un-ACKed SYNs; hashicorp's semaphore of the same size."""
MAX_STREAM_ID = 0xFFFF_FFFF


class FrameType(enum.IntEnum):
    """Header ``type`` byte."""

    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    """Header ``flags`` bits; unknown bits are ignored, as hashicorp does."""

    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


class GoAwayCode(enum.IntEnum):
    """GO_AWAY error codes (the header's length field). Unknown codes pass as ints."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


# --------------------------------------------------------------------------- errors


class YamuxError(Exception):
    """Base of every error this module raises."""


class YamuxLocalError(YamuxError):
    """The caller misused the API (unknown stream, send after FIN, ...)."""


class YamuxRemoteError(YamuxError):
    """The peer broke the protocol; GO_AWAY(``error_code``) is already queued."""

    error_code: int = GoAwayCode.INTERNAL_ERROR


class YamuxProtocolError(YamuxRemoteError):
    """Malformed frame, window overrun, duplicate SYN, ..."""

    error_code = GoAwayCode.PROTOCOL_ERROR


# --------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class Header:
    """One 12-byte frame header."""

    type: int
    """A :class:`FrameType` value."""
    flags: int
    """:class:`Flag` bits."""
    stream_id: int
    length: int
    """Payload length (DATA), window delta, ping value or go-away code."""
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return _HEADER.pack(self.version, self.type, self.flags, self.stream_id, self.length)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
        """Parse 12 bytes at ``offset``.

        Raises:
            YamuxProtocolError: wrong version or unknown frame type.
        """
        version, type_, flags, stream_id, length = _HEADER.unpack_from(data, offset)
        if version != PROTOCOL_VERSION:
            raise YamuxProtocolError(f"unsupported yamux version {version}")
        if type_ > FrameType.GO_AWAY:
            raise YamuxProtocolError(f"unknown frame type {type_}")
        return cls(type_, flags, stream_id, length, version)


def _frame(type_: FrameType, flags: int, stream_id: int, length: int) -> bytes:
    return _HEADER.pack(PROTOCOL_VERSION, type_, flags, stream_id, length)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened ``stream_id`` (already ACKed); hand it to an acceptor."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes for a stream. Call ``acknowledge_received`` once they are consumed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed (FIN): no more data on ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone: the peer sent RST, or we reset it for ``reason``."""

    stream_id: int
    reason: str = "reset by peer"
    code: int = 0
    """The peer's error code: the length of its WINDOW_UPDATE|RST frame (ours, see
    ``outrelay.orp.extensions``; hashicorp always sends 0)."""


@dataclass(frozen=True, slots=True)
class StreamAcknowledged:
    """The peer ACKed a stream we opened; one more open may proceed."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted ``delta`` more bytes of credit on ``stream_id``."""

    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the reply is already queued."""

    opaque: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """Reply to our :meth:`YamuxSession.ping` with the same ``opaque`` value."""

    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer accepts no new streams. A non-zero code ends the session
    (hashicorp exits on 1, 2 and unknown codes); close the connection."""

    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """EOF. ``clean`` is false when it cut a frame in half."""

    clean: bool


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamAcknowledged
    | WindowUpdated
    | PingReceived
    | PingAcknowledged
    | GoAwayReceived
    | ConnectionEnded
)


# --------------------------------------------------------------------------- stream state
#
# SYN and ACK only create and acknowledge a stream (``_Stream.acked`` tracks the
# latter); the state machine is about the two halves::
#
#                               +--------+
#             send FIN          |  OPEN  |        recv FIN
#          +--------------------|        |--------------------+
#          v                    +--------+                    v
#   +-------------------+           |            +--------------------+
#   | HALF_CLOSED_LOCAL |           | send/recv  | HALF_CLOSED_REMOTE |
#   |  (we sent FIN,    |           |    RST     |  (peer sent FIN,   |
#   |   still reading)  |           v            |   still writing)   |
#   +-------------------+       +-------+        +--------------------+
#          |  recv FIN          | RESET |            send FIN  |
#          +------------------->|       |<------ RST ----------+
#                   |           +-------+                      |
#                   +---------> CLOSED <-----------------------+
#
# RST from any live state leads to RESET. CLOSED and RESET streams are forgotten,
# so later frames for their id are skipped (hashicorp does the same). A missing
# (state, input) pair is illegal: the caller gets YamuxLocalError for our own
# inputs, and the peer's inputs become a stream reset; nothing changes first
# (h11's "nothing happens" rule).


class StreamState(enum.Enum):
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"
    RESET = "reset"


class StreamInput(enum.Enum):
    SEND_DATA = "send data"
    SEND_FIN = "send FIN"
    SEND_RST = "send RST"
    RECV_DATA = "receive data"
    RECV_FIN = "receive FIN"
    RECV_RST = "receive RST"


_S = StreamState
_I = StreamInput
_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_FIN): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_FIN): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_FIN): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_FIN): _S.CLOSED,
    **{
        (state, reset): _S.RESET
        for state in (_S.OPEN, _S.HALF_CLOSED_LOCAL, _S.HALF_CLOSED_REMOTE)
        for reset in (_I.SEND_RST, _I.RECV_RST)
    },
}
_GONE = (_S.CLOSED, _S.RESET)


class _IllegalTransition(Exception):
    pass


def _next_state(state: StreamState, event: StreamInput) -> StreamState:
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise _IllegalTransition(f"cannot {event.value} in state {state.value}") from None


@dataclass(slots=True)
class _Stream:
    id: int
    outgoing: bool
    state: StreamState = StreamState.OPEN
    acked: bool = False
    # sending: the peer's credit for us
    send_window: int = INITIAL_STREAM_WINDOW
    sent: int = 0
    credited: int = 0
    # receiving: see "Flow control" in the module docstring
    window: int = INITIAL_STREAM_WINDOW
    credit: int = INITIAL_STREAM_WINDOW
    unacked: int = 0
    starved: bool = False
    grown: int = 0
    # incoming streams waiting in the accept backlog
    delivered: bool = True
    pending: bytearray = field(default_factory=bytearray)
    pending_fin: bool = False


# --------------------------------------------------------------------------- session


@dataclass(frozen=True)
class YamuxConfig:
    """Tunables of one session; the defaults are the documented limits."""

    max_incoming_streams: int = MAX_INCOMING_STREAMS
    """Peer-opened streams announced and open at once."""
    accept_backlog: int = ACCEPT_BACKLOG
    """Peer-opened streams waiting beyond ``max_incoming_streams``; more are RST."""
    max_inflight_opens: int = MAX_INFLIGHT_OPENS
    """Our streams that may wait for the peer's ACK at once."""
    max_stream_window: int = MAX_STREAM_WINDOW
    """Receive window auto-tuning stops here; ``INITIAL_STREAM_WINDOW`` disables it."""
    autotune_budget: int = AUTOTUNE_BUDGET
    """Total growth beyond the initial windows, over all streams of the session."""


@dataclass(frozen=True)
class YamuxStatistics:
    """A snapshot for ``observe/`` (trio-style ``statistics()``)."""

    open_streams: int
    incoming_open: int
    accept_backlog: int
    inflight_opens: int
    autotune_used: int
    bytes_received: int
    bytes_sent: int
    window_updates_sent: int
    local_go_away: int | None
    remote_go_away: int | None


class YamuxSession:
    """One yamux session, client or server side. See the module docstring."""

    def __init__(self, *, client: bool, config: YamuxConfig | None = None) -> None:
        """Args:
        client: True on the side that dialled (odd stream ids), False on the
            listener (even ids).
        config: limits; the module defaults if omitted.
        """
        self.client = client
        self.config = config or YamuxConfig()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        # decoder: a partial header, or the rest of a DATA payload
        self._header_buf = bytearray()
        self._payload_left = 0
        self._payload_stream: _Stream | None = None
        self._payload_flags = 0
        # limits and counters
        self._incoming_open = 0
        self._backlog: deque[int] = deque()
        self._inflight = 0
        self._autotune_used = 0
        self._bytes_received = 0
        self._bytes_sent = 0
        self._updates_sent = 0
        self.local_go_away: int | None = None
        """The code of the GO_AWAY we sent, if any: we refuse new streams."""
        self.remote_go_away: int | None = None
        """The code of the GO_AWAY the peer sent, if any: it refuses new streams."""
        self.terminated = False
        """True after EOF or a protocol error; only ``data_to_send`` works then."""

    # -- bytes and events ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means EOF.

        Then drain :meth:`next_event` and send :meth:`data_to_send`.

        Raises:
            YamuxRemoteError: the peer broke the protocol. GO_AWAY is queued
                and the session is terminated: flush and close the socket.
            YamuxLocalError: called after EOF or a protocol error.

        Any other exception is a bug in this module.
        """
        if self.terminated:
            raise YamuxLocalError("session already terminated")
        if not data:
            clean = not self._header_buf and not self._payload_left
            self.terminated = True
            self._events.append(ConnectionEnded(clean=clean))
            return
        try:
            self._process(memoryview(data).cast("B"))
        except YamuxRemoteError as exc:
            if self.local_go_away is None:
                self.local_go_away = exc.error_code
                self._out.append(_frame(FrameType.GO_AWAY, 0, 0, exc.error_code))
            self.terminated = True
            raise

    def next_event(self) -> Event | None:
        """Return the next event, or ``None`` when there is none."""
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Return (and forget) every byte queued for the peer."""
        if not self._out:
            return b""
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    # -- intent: streams ----------------------------------------------------------

    @property
    def can_open_stream(self) -> bool:
        """Whether :meth:`open_stream` would succeed now.

        False while ``max_inflight_opens`` SYNs await ACK (wait for
        :class:`StreamAcknowledged` or :class:`StreamReset`), after the peer's
        GO_AWAY, once ids are exhausted, or after termination.
        """
        return (
            not self.terminated
            and self.remote_go_away is None
            and self._inflight < self.config.max_inflight_opens
            and self._next_id <= MAX_STREAM_ID
        )

    def open_stream(self) -> int:
        """Open a stream (queues WINDOW_UPDATE with SYN) and return its id.

        Raises:
            YamuxLocalError: see :attr:`can_open_stream` for when.
        """
        self._check_usable()
        if self.remote_go_away is not None:
            raise YamuxLocalError(f"peer sent GO_AWAY ({self.remote_go_away}); no new streams")
        if self._inflight >= self.config.max_inflight_opens:
            raise YamuxLocalError("too many streams await the peer's ACK")
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise YamuxLocalError("stream ids exhausted")
        self._next_id += 2
        self._streams[stream_id] = _Stream(stream_id, outgoing=True)
        self._inflight += 1
        self._out.append(_frame(FrameType.WINDOW_UPDATE, Flag.SYN, stream_id, 0))
        return stream_id

    def send_window(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` would accept now on ``stream_id``."""
        stream = self._get(stream_id)
        if stream.state not in (_S.OPEN, _S.HALF_CLOSED_REMOTE):
            return 0
        return stream.send_window

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the peer's window allows, as one DATA frame.

        Returns:
            How many bytes were taken (0 when the window is exhausted: wait
            for :class:`WindowUpdated`). Send the rest later.

        Raises:
            YamuxLocalError: unknown stream, or we already sent FIN/RST.
        """
        self._check_usable()
        stream = self._get(stream_id)
        self._local_transition(stream, _I.SEND_DATA)
        n = min(len(data), stream.send_window)
        if n <= 0:
            return 0
        self._out.append(_frame(FrameType.DATA, 0, stream_id, n))
        self._out.append(bytes(memoryview(data)[:n]))
        stream.send_window -= n
        stream.sent += n
        self._bytes_sent += n
        return n

    def end_stream(self, stream_id: int) -> None:
        """Half-close: queue FIN; the peer reads EOF after the data sent so far.

        Raises:
            YamuxLocalError: unknown stream, or FIN/RST already sent.
        """
        self._check_usable()
        stream = self._get(stream_id)
        self._local_transition(stream, _I.SEND_FIN)
        self._out.append(_frame(FrameType.WINDOW_UPDATE, Flag.FIN, stream_id, 0))
        if stream.state in _GONE:
            self._forget(stream)

    def reset_stream(self, stream_id: int, code: int = 0) -> None:
        """Queue RST and forget the stream. A no-op for ids already gone.

        ``code`` (0 to 2**32-1) rides in the WINDOW_UPDATE|RST frame's length field;
        hashicorp adds it to a send window that the RST made useless.
        """
        stream = self._streams.get(stream_id)
        if stream is None or self.terminated:
            return
        self._local_transition(stream, _I.SEND_RST)
        self._out.append(_frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, code))
        self._forget(stream)

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of ``stream_id``: return credit.

        Queues a WINDOW_UPDATE once half a window is due, and grows the window
        when the peer was starved (module docstring). Ids already gone are
        ignored (bytes may outlive their stream in the shell's buffer).

        Raises:
            YamuxLocalError: ``n`` exceeds the bytes received and not yet acknowledged.
        """
        stream = self._streams.get(stream_id)
        if stream is None or n == 0 or self.terminated:
            return
        if n < 0 or n > stream.unacked:
            raise YamuxLocalError(
                f"stream {stream_id}: acknowledging {n} bytes, {stream.unacked} unacknowledged"
            )
        stream.unacked -= n
        if stream.state not in (_S.OPEN, _S.HALF_CLOSED_LOCAL):
            return  # the peer has finished sending; no credit needed
        if stream.starved and stream.unacked == 0:
            stream.starved = False
            limit = self.config.max_stream_window
            grow = min(
                stream.window,
                limit - stream.window,
                self.config.autotune_budget - self._autotune_used,
            )
            if grow > 0:
                stream.window += grow
                stream.grown += grow
                self._autotune_used += grow
        delta = stream.window - stream.unacked - stream.credit
        if delta >= stream.window // 2:
            stream.credit += delta
            self._updates_sent += 1
            self._out.append(_frame(FrameType.WINDOW_UPDATE, 0, stream_id, delta))

    # -- intent: session ----------------------------------------------------------

    def ping(self, opaque: int) -> None:
        """Queue a PING (SYN); the reply is :class:`PingAcknowledged` with ``opaque``."""
        self._check_usable()
        self._out.append(_frame(FrameType.PING, Flag.SYN, 0, opaque & 0xFFFF_FFFF))

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Queue GO_AWAY: the peer may open no more streams; later SYNs get RST.

        Existing streams go on. Idempotent: only the first call sends.
        """
        if self.local_go_away is not None:
            return
        self.local_go_away = int(code)
        self._out.append(_frame(FrameType.GO_AWAY, 0, 0, int(code) & 0xFFFF_FFFF))

    # -- introspection ------------------------------------------------------------

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The stream's state, or ``None`` once it is closed, reset or unknown."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else None

    def receive_window(self, stream_id: int) -> int:
        """The stream's current receive window target (grows with auto-tuning)."""
        return self._get(stream_id).window

    def receive_credit(self, stream_id: int) -> int:
        """Bytes the peer may still send on ``stream_id`` before an update."""
        return self._get(stream_id).credit

    def unacknowledged_bytes(self, stream_id: int) -> int:
        """Bytes we sent that the peer has not credited back (read) yet.

        Credit beyond what we sent (a peer growing its window) counts as
        covering everything; 0 for streams already gone.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, stream.sent - stream.credited)

    def statistics(self) -> YamuxStatistics:
        return YamuxStatistics(
            open_streams=len(self._streams),
            incoming_open=self._incoming_open,
            accept_backlog=len(self._backlog),
            inflight_opens=self._inflight,
            autotune_used=self._autotune_used,
            bytes_received=self._bytes_received,
            bytes_sent=self._bytes_sent,
            window_updates_sent=self._updates_sent,
            local_go_away=self.local_go_away,
            remote_go_away=self.remote_go_away,
        )

    # -- decoding -----------------------------------------------------------------

    def _process(self, view: memoryview) -> None:
        pos = 0
        end = len(view)
        while pos < end:
            if self._payload_left:
                take = min(self._payload_left, end - pos)
                self._on_payload(view[pos : pos + take])
                pos += take
                self._payload_left -= take
                if not self._payload_left:
                    self._end_payload()
                continue
            if not self._header_buf and end - pos >= HEADER_SIZE:
                header = Header.decode(view, pos)
                pos += HEADER_SIZE
            else:
                take = min(HEADER_SIZE - len(self._header_buf), end - pos)
                self._header_buf += view[pos : pos + take]
                pos += take
                if len(self._header_buf) < HEADER_SIZE:
                    return
                header = Header.decode(self._header_buf)
                self._header_buf.clear()
            self._on_header(header)

    def _on_header(self, header: Header) -> None:
        if header.type == FrameType.PING:
            if header.flags & Flag.SYN:
                self._out.append(_frame(FrameType.PING, Flag.ACK, 0, header.length))
                self._events.append(PingReceived(header.length))
            else:
                self._events.append(PingAcknowledged(header.length))
        elif header.type == FrameType.GO_AWAY:
            self.remote_go_away = header.length
            self._events.append(GoAwayReceived(header.length))
        else:
            self._on_stream_frame(header)

    def _on_stream_frame(self, header: Header) -> None:
        stream_id, flags = header.stream_id, header.flags
        stream = self._streams.get(stream_id)
        if flags & Flag.SYN:
            if stream is not None:
                raise YamuxProtocolError(f"duplicate SYN for open stream {stream_id}")
            stream = self._accept_syn(stream_id)
        if stream is not None and flags & Flag.ACK and stream.outgoing and not stream.acked:
            stream.acked = True
            self._inflight -= 1
            self._events.append(StreamAcknowledged(stream_id))
        if header.type == FrameType.WINDOW_UPDATE:
            if stream is not None:
                if flags & Flag.RST:
                    self._end_flags(stream, flags, code=header.length)
                    return
                if header.length:
                    stream.send_window += header.length
                    stream.credited += header.length
                    if stream.state in (_S.OPEN, _S.HALF_CLOSED_REMOTE):
                        self._events.append(WindowUpdated(stream_id, header.length))
                self._end_flags(stream, flags)
            return
        # DATA
        length = header.length
        if stream is not None and length:
            if stream.state not in (_S.OPEN, _S.HALF_CLOSED_LOCAL):
                # Data after the peer's FIN: a stream error, not a session one.
                self._reset_for(stream, "protocol error: data after FIN")
                stream = None
            elif length > stream.credit:
                raise YamuxProtocolError(
                    f"stream {stream_id}: {length} bytes exceed the receive window "
                    f"({stream.credit} bytes of credit left)"
                )
            else:
                stream.credit -= length
                stream.unacked += length
                self._bytes_received += length
                if stream.credit < stream.window // 16:
                    stream.starved = True
        self._payload_stream = stream
        self._payload_flags = flags
        self._payload_left = length
        if not length:
            self._end_payload()

    def _on_payload(self, chunk: memoryview) -> None:
        stream = self._payload_stream
        if stream is None:
            return  # a stream we no longer know: skip the bytes (hashicorp does)
        if stream.delivered:
            self._events.append(DataReceived(stream.id, bytes(chunk)))
        else:
            stream.pending += chunk

    def _end_payload(self) -> None:
        stream, self._payload_stream = self._payload_stream, None
        if stream is not None and stream.state not in _GONE:
            self._end_flags(stream, self._payload_flags)

    def _end_flags(self, stream: _Stream, flags: int, code: int = 0) -> None:
        """FIN and RST take effect after the frame's payload (``code``: the RST's)."""
        if flags & Flag.FIN:
            try:
                stream.state = _next_state(stream.state, _I.RECV_FIN)
            except _IllegalTransition:
                self._reset_for(stream, "protocol error: second FIN")
                return
            if stream.delivered:
                self._events.append(StreamEnded(stream.id))
            else:
                stream.pending_fin = True
            if stream.state in _GONE:
                self._forget(stream)
        if flags & Flag.RST and stream.state not in _GONE:
            stream.state = _next_state(stream.state, _I.RECV_RST)
            if stream.delivered:
                self._events.append(StreamReset(stream.id, code=code))
            self._forget(stream)

    def _accept_syn(self, stream_id: int) -> _Stream | None:
        if stream_id == 0 or (stream_id % 2 == 1) == self.client:
            who = "server" if self.client else "client"
            raise YamuxProtocolError(f"the {who} opened stream {stream_id} with the wrong parity")
        refuse = self.local_go_away is not None or (
            self._incoming_open >= self.config.max_incoming_streams
            and len(self._backlog) >= self.config.accept_backlog
        )
        if refuse:
            self._out.append(_frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, 0))
            return None
        stream = _Stream(stream_id, outgoing=False, acked=True)
        self._streams[stream_id] = stream
        self._out.append(_frame(FrameType.WINDOW_UPDATE, Flag.ACK, stream_id, 0))
        if self._incoming_open < self.config.max_incoming_streams:
            self._incoming_open += 1
            self._events.append(StreamOpened(stream_id))
        else:
            stream.delivered = False
            self._backlog.append(stream_id)
        return stream

    # -- helpers ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.terminated:
            raise YamuxLocalError("session terminated")

    def _get(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise YamuxLocalError(f"stream {stream_id} is closed, reset or unknown")
        return stream

    def _local_transition(self, stream: _Stream, event: StreamInput) -> None:
        try:
            stream.state = _next_state(stream.state, event)
        except _IllegalTransition as exc:
            raise YamuxLocalError(f"stream {stream.id}: {exc}") from None

    def _reset_for(self, stream: _Stream, reason: str) -> None:
        stream.state = _next_state(stream.state, _I.SEND_RST)
        self._out.append(_frame(FrameType.WINDOW_UPDATE, Flag.RST, stream.id, 0))
        if stream.delivered:
            self._events.append(StreamReset(stream.id, reason))
        self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        del self._streams[stream.id]
        self._autotune_used -= stream.grown
        if stream.outgoing:
            if not stream.acked:
                self._inflight -= 1
            return
        if not stream.delivered:
            self._backlog.remove(stream.id)
            return
        self._incoming_open -= 1
        while self._backlog and self._incoming_open < self.config.max_incoming_streams:
            waiting = self._streams[self._backlog.popleft()]
            waiting.delivered = True
            self._incoming_open += 1
            self._events.append(StreamOpened(waiting.id))
            if waiting.pending:
                self._events.append(DataReceived(waiting.id, bytes(waiting.pending)))
                waiting.pending = bytearray()
            if waiting.pending_fin:
                self._events.append(StreamEnded(waiting.id))
