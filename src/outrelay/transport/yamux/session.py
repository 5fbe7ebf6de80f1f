"""The yamux session: bytes in, events out, flow control (sans-IO; see the package docstring)."""

from __future__ import annotations

from collections import deque

from outrelay.transport.yamux.frames import (
    HEADER_SIZE,
    MAX_STREAM_ID,
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
    YamuxLocalError,
    YamuxProtocolError,
    YamuxRemoteError,
    encode_frame,
)
from outrelay.transport.yamux.state import (
    GONE,
    IllegalTransition,
    StreamInput,
    StreamRecord,
    StreamState,
    YamuxConfig,
    YamuxStatistics,
    next_state,
)

__all__ = ["YamuxSession"]


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
        self._streams: dict[int, StreamRecord] = {}
        self._next_id = 1 if client else 2
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        # decoder: a partial header, or the rest of a DATA payload
        self._header_buf = bytearray()
        self._payload_left = 0
        self._payload_stream: StreamRecord | None = None
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
                self._out.append(encode_frame(FrameType.GO_AWAY, 0, 0, exc.error_code))
            self.terminated = True
            raise

    def next_event(self) -> Event | None:
        """Return the next event, or ``None`` when there is none."""
        return self._events.popleft() if self._events else None

    @property
    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` would return bytes now."""
        return bool(self._out)

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
        self._streams[stream_id] = StreamRecord(stream_id, outgoing=True)
        self._inflight += 1
        self._out.append(encode_frame(FrameType.WINDOW_UPDATE, Flag.SYN, stream_id, 0))
        return stream_id

    def send_window(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` would accept now on ``stream_id``."""
        stream = self._get(stream_id)
        if stream.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
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
        self._local_transition(stream, StreamInput.SEND_DATA)
        n = min(len(data), stream.send_window)
        if n <= 0:
            return 0
        self._out.append(encode_frame(FrameType.DATA, 0, stream_id, n))
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
        self._local_transition(stream, StreamInput.SEND_FIN)
        self._out.append(encode_frame(FrameType.WINDOW_UPDATE, Flag.FIN, stream_id, 0))
        if stream.state in GONE:
            self._forget(stream)

    def reset_stream(self, stream_id: int, code: int = 0) -> None:
        """Queue RST and forget the stream. A no-op for ids already gone.

        ``code`` (0 to 2**32-1) rides in the WINDOW_UPDATE|RST frame's length field;
        hashicorp adds it to a send window that the RST made useless.
        """
        stream = self._streams.get(stream_id)
        if stream is None or self.terminated:
            return
        self._local_transition(stream, StreamInput.SEND_RST)
        self._out.append(encode_frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, code))
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
        if stream.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
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
            self._out.append(encode_frame(FrameType.WINDOW_UPDATE, 0, stream_id, delta))

    # -- intent: session ----------------------------------------------------------

    def ping(self, opaque: int) -> None:
        """Queue a PING (SYN); the reply is :class:`PingAcknowledged` with ``opaque``."""
        self._check_usable()
        self._out.append(encode_frame(FrameType.PING, Flag.SYN, 0, opaque & 0xFFFF_FFFF))

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Queue GO_AWAY: the peer may open no more streams; later SYNs get RST.

        Existing streams go on. Idempotent: only the first call sends.
        """
        if self.local_go_away is not None:
            return
        self.local_go_away = int(code)
        self._out.append(encode_frame(FrameType.GO_AWAY, 0, 0, int(code) & 0xFFFF_FFFF))

    # -- introspection ------------------------------------------------------------

    def stream_state(self, stream_id: int) -> StreamState | None:
        """The stream's state, or ``None`` once it is closed, reset or unknown."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else None

    def receive_window(self, stream_id: int) -> int:
        """The stream's current receive window target (grows with auto-tuning)."""
        return self._get(stream_id).window

    def unacknowledged_bytes(self, stream_id: int) -> int:
        """Bytes we sent that the peer has not credited back (read) yet.

        Credit beyond what we sent (a peer growing its window) counts as
        covering everything; 0 for streams already gone.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return max(0, stream.sent - stream.credited)

    def unread_bytes(self, stream_id: int) -> int:
        """Bytes received on the stream that :meth:`acknowledge_received` has not
        credited back yet (the application has not read them); 0 for streams gone."""
        stream = self._streams.get(stream_id)
        return stream.unacked if stream is not None else 0

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
                self._out.append(encode_frame(FrameType.PING, Flag.ACK, 0, header.length))
                self._events.append(PingReceived(header.length))
            else:
                self._events.append(PingAcknowledged(header.length))
        elif header.type == FrameType.GO_AWAY:
            self.remote_go_away = header.length
            self._events.append(GoAwayReceived(header.length))
        else:
            self._on_streamencode_frame(header)

    def _on_streamencode_frame(self, header: Header) -> None:
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
                    if stream.state in (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE):
                        self._events.append(WindowUpdated(stream_id, header.length))
                self._end_flags(stream, flags)
            return
        # DATA
        length = header.length
        if stream is not None and length:
            if stream.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
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
        if stream is not None and stream.state not in GONE:
            self._end_flags(stream, self._payload_flags)

    def _end_flags(self, stream: StreamRecord, flags: int, code: int = 0) -> None:
        """FIN and RST take effect after the frame's payload (``code``: the RST's)."""
        if flags & Flag.FIN:
            try:
                stream.state = next_state(stream.state, StreamInput.RECV_FIN)
            except IllegalTransition:
                self._reset_for(stream, "protocol error: second FIN")
                return
            if stream.delivered:
                self._events.append(StreamEnded(stream.id))
            else:
                stream.pending_fin = True
            if stream.state in GONE:
                self._forget(stream)
        if flags & Flag.RST and stream.state not in GONE:
            stream.state = next_state(stream.state, StreamInput.RECV_RST)
            if stream.delivered:
                self._events.append(StreamReset(stream.id, code=code))
            self._forget(stream)

    def _accept_syn(self, stream_id: int) -> StreamRecord | None:
        if stream_id == 0 or (stream_id % 2 == 1) == self.client:
            who = "server" if self.client else "client"
            raise YamuxProtocolError(f"the {who} opened stream {stream_id} with the wrong parity")
        refuse = self.local_go_away is not None or (
            self._incoming_open >= self.config.max_incoming_streams
            and len(self._backlog) >= self.config.accept_backlog
        )
        if refuse:
            self._out.append(encode_frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id, 0))
            return None
        stream = StreamRecord(stream_id, outgoing=False, acked=True)
        self._streams[stream_id] = stream
        self._out.append(encode_frame(FrameType.WINDOW_UPDATE, Flag.ACK, stream_id, 0))
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

    def _get(self, stream_id: int) -> StreamRecord:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise YamuxLocalError(f"stream {stream_id} is closed, reset or unknown")
        return stream

    def _local_transition(self, stream: StreamRecord, event: StreamInput) -> None:
        try:
            stream.state = next_state(stream.state, event)
        except IllegalTransition as exc:
            raise YamuxLocalError(f"stream {stream.id}: {exc}") from None

    def _reset_for(self, stream: StreamRecord, reason: str) -> None:
        stream.state = next_state(stream.state, StreamInput.SEND_RST)
        self._out.append(encode_frame(FrameType.WINDOW_UPDATE, Flag.RST, stream.id, 0))
        if stream.delivered:
            self._events.append(StreamReset(stream.id, reason))
        self._forget(stream)

    def _forget(self, stream: StreamRecord) -> None:
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
