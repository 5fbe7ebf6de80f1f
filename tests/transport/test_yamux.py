"""The sans-IO yamux core: two sessions wired back to back, no sockets (STYLE.md §4).

Covers the codec (golden bytes, whole / byte-by-byte / trailing feeding), the
stream state machine (half-close, RST, illegal inputs), GO_AWAY and PING,
the incoming-stream limit and backlog, window accounting (never negative,
never overrun; property-tested), auto-tuning, and the module's promise that
arbitrary input yields events or a YamuxError, nothing else.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outrelay.transport import yamux
from outrelay.transport.yamux import (
    INITIAL_STREAM_WINDOW,
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
    StreamInput,
    StreamOpened,
    StreamReset,
    StreamState,
    WindowUpdated,
    YamuxConfig,
    YamuxError,
    YamuxLocalError,
    YamuxProtocolError,
    YamuxSession,
)
from outrelay.transport.yamux import state as yamux_state

# --------------------------------------------------------------------------- helpers


def drain(session: YamuxSession) -> list[Event]:
    events = []
    while (event := session.next_event()) is not None:
        events.append(event)
    return events


def frame(type_: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BBHII", 0, type_, flags, stream_id, length) + payload


class Pair:
    """A client and a server session and the wire between them."""

    def __init__(
        self, client: YamuxConfig | None = None, server: YamuxConfig | None = None
    ) -> None:
        self.client = YamuxSession(client=True, config=client)
        self.server = YamuxSession(client=False, config=server)

    def to_server(self) -> list[Event]:
        data = self.client.data_to_send()
        if data:
            self.server.receive_data(data)
        return drain(self.server)

    def to_client(self) -> list[Event]:
        data = self.server.data_to_send()
        if data:
            self.client.receive_data(data)
        return drain(self.client)

    def settle(self) -> tuple[list[Event], list[Event]]:
        """Exchange until both sides are quiet; returns (client events, server events)."""
        client_events: list[Event] = []
        server_events: list[Event] = []
        for _ in range(100):
            s = self.to_server()
            c = self.to_client()
            server_events += s
            client_events += c
            quiet = not self.client.has_data_to_send and not self.server.has_data_to_send
            if not s and not c and quiet:
                break
        return client_events, server_events

    def open(self) -> int:
        stream_id = self.client.open_stream()
        self.settle()
        return stream_id


def received(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


# --------------------------------------------------------------------------- codec


def test_header_golden_bytes() -> None:
    # hashicorp spec.md: version, type, flags, stream id, length; big-endian.
    syn = Header(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0).encode()
    assert syn == bytes.fromhex("00 01 0001 00000001 00000000")
    data = Header(FrameType.DATA, 0, 2, 5).encode()
    assert data == bytes.fromhex("00 00 0000 00000002 00000005")
    go_away = Header(FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR).encode()
    assert go_away == bytes.fromhex("00 03 0000 00000000 00000001")
    assert yamux.HEADER_SIZE == len(syn) == 12


@given(
    st.sampled_from(list(FrameType)),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF_FFFF),
    st.integers(0, 0xFFFF_FFFF),
)
def test_header_round_trip(type_: FrameType, flags: int, stream_id: int, length: int) -> None:
    header = Header(type_, flags, stream_id, length)
    assert Header.decode(header.encode()) == header


@pytest.mark.parametrize(
    "raw",
    [
        bytes.fromhex("01 00 0000 00000001 00000000"),  # version 1
        bytes.fromhex("00 04 0000 00000001 00000000"),  # type 4
    ],
)
def test_bad_header_is_a_protocol_error_and_queues_go_away(raw: bytes) -> None:
    server = YamuxSession(client=False)
    with pytest.raises(YamuxProtocolError):
        server.receive_data(raw)
    assert server.terminated
    assert server.data_to_send() == frame(FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR)
    with pytest.raises(YamuxLocalError):
        server.receive_data(b"more")


def _scripted_wire() -> bytes:
    return b"".join(
        [
            frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0),
            frame(FrameType.DATA, 0, 1, 5, b"hello"),
            frame(FrameType.PING, Flag.SYN, 0, 42),
            frame(FrameType.DATA, Flag.SYN, 3, 3, b"abc"),
            frame(FrameType.DATA, Flag.FIN, 1, 6, b" world"),
            frame(FrameType.WINDOW_UPDATE, 0, 1, 1000),
            frame(FrameType.WINDOW_UPDATE, Flag.RST, 3, 0),
            frame(FrameType.GO_AWAY, 0, 0, 0),
        ]
    )


def _normalise(events: list[Event]) -> list[Event]:
    """Merge adjacent DataReceived of one stream: splits differ, bytes must not."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if (
            isinstance(event, DataReceived)
            and isinstance(last, DataReceived)
            and last.stream_id == event.stream_id
        ):
            out[-1] = DataReceived(event.stream_id, last.data + event.data)
        else:
            out.append(event)
    return out


def test_whole_byte_by_byte_and_random_splits_agree() -> None:
    wire = _scripted_wire()
    whole = YamuxSession(client=False)
    whole.receive_data(wire)
    expected = drain(whole)
    assert expected == [
        StreamOpened(1),
        DataReceived(1, b"hello"),
        PingReceived(42),
        StreamOpened(3),
        DataReceived(3, b"abc"),
        DataReceived(1, b" world"),
        StreamEnded(1),
        WindowUpdated(1, 1000),
        StreamReset(3),
        GoAwayReceived(0),
    ]
    byte_wise = YamuxSession(client=False)
    events: list[Event] = []
    for i in range(len(wire)):
        byte_wise.receive_data(wire[i : i + 1])
        events += drain(byte_wise)
    assert _normalise(events) == expected
    assert byte_wise.data_to_send() == whole.data_to_send()
    rng = random.Random(7)
    for _ in range(50):
        split = YamuxSession(client=False)
        cuts = sorted(rng.sample(range(1, len(wire)), 6))
        events = []
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            split.receive_data(wire[a:b])
            events += drain(split)
        assert _normalise(events) == expected


def test_eof_clean_at_frame_boundary_unclean_inside_one() -> None:
    clean = YamuxSession(client=False)
    clean.receive_data(frame(FrameType.PING, Flag.SYN, 0, 1))
    clean.receive_data(b"")
    assert drain(clean)[-1] == ConnectionEnded(clean=True)
    torn = YamuxSession(client=False)
    torn.receive_data(
        frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0) + frame(FrameType.DATA, 0, 1, 9, b"abc")
    )
    torn.receive_data(b"")
    assert drain(torn)[-1] == ConnectionEnded(clean=False)
    half_header = YamuxSession(client=False)
    half_header.receive_data(b"\x00\x01")
    half_header.receive_data(b"")
    assert drain(half_header) == [ConnectionEnded(clean=False)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.binary(max_size=200), st.lists(st.binary(max_size=40), max_size=8))
def test_arbitrary_bytes_give_events_or_yamux_error(
    client: bool, prefix: bytes, chunks: list[bytes]
) -> None:
    """h11's promise, held by fuzzing: nothing but YamuxError ever escapes."""
    session = YamuxSession(client=client)
    # Start from a state with live streams so the fuzz reaches stream logic.
    opener = 2 if client else 1
    session.receive_data(frame(FrameType.WINDOW_UPDATE, Flag.SYN, opener, 0))
    session.open_stream()
    try:
        for chunk in [prefix, *chunks]:
            session.receive_data(chunk)
            drain(session)
            session.data_to_send()
    except YamuxError:
        pass


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(FrameType)),
            st.sampled_from([0, 1, 2, 4, 8, 3, 5, 12, 0xFFFF]),
            st.integers(0, 6),
            st.integers(0, 300_000),
        ),
        max_size=25,
    )
)
def test_structured_garbage_gives_events_or_yamux_error(
    frames: list[tuple[FrameType, int, int, int]],
) -> None:
    session = YamuxSession(
        client=False, config=YamuxConfig(max_incoming_streams=2, accept_backlog=1)
    )
    try:
        for type_, flags, stream_id, length in frames:
            payload = b"x" * min(length, 64) if type_ == FrameType.DATA else b""
            session.receive_data(frame(type_, flags, stream_id, length, payload))
            for event in drain(session):
                if isinstance(event, DataReceived):
                    session.acknowledge_received(event.stream_id, len(event.data))
    except YamuxError:
        pass


# --------------------------------------------------------------------------- streams


def test_open_accept_and_data_both_ways() -> None:
    pair = Pair()
    sid = pair.client.open_stream()
    assert sid == 1
    assert pair.to_server() == [StreamOpened(1)]
    assert pair.to_client() == [StreamAcknowledged(1)]
    assert pair.client.statistics().inflight_opens == 0
    assert pair.client.send_data(1, b"ping") == 4
    assert pair.to_server() == [DataReceived(1, b"ping")]
    assert pair.server.send_data(1, b"pong") == 4
    assert pair.to_client() == [DataReceived(1, b"pong")]
    # The server's own streams are even.
    assert pair.server.open_stream() == 2
    assert pair.to_client() == [StreamOpened(2)]


def test_half_close_keeps_the_other_direction() -> None:
    pair = Pair()
    sid = pair.open()
    pair.client.send_data(sid, b"request")
    pair.client.end_stream(sid)
    assert pair.to_server() == [DataReceived(sid, b"request"), StreamEnded(sid)]
    assert pair.client.stream_state(sid) is StreamState.HALF_CLOSED_LOCAL
    assert pair.server.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE
    with pytest.raises(YamuxLocalError):
        pair.client.send_data(sid, b"more")
    with pytest.raises(YamuxLocalError):
        pair.client.end_stream(sid)
    # The server answers after our FIN, then finishes too.
    pair.server.send_data(sid, b"reply")
    pair.server.end_stream(sid)
    assert pair.server.stream_state(sid) is None  # both halves done: forgotten
    assert pair.to_client() == [DataReceived(sid, b"reply"), StreamEnded(sid)]
    assert pair.client.stream_state(sid) is None
    assert pair.client.statistics().open_streams == pair.server.statistics().open_streams == 0


def test_reset_reaches_the_peer_and_late_frames_are_skipped() -> None:
    pair = Pair()
    sid = pair.open()
    pair.server.send_data(sid, b"in flight")
    pair.client.reset_stream(sid)
    assert pair.client.stream_state(sid) is None
    pair.client.reset_stream(sid)  # idempotent
    # The server's data crosses our RST: skipped, no event, no error.
    assert pair.to_client() == []
    assert pair.to_server() == [StreamReset(sid)]
    with pytest.raises(YamuxLocalError):
        pair.server.send_data(sid, b"x")


def test_reset_carries_our_end_code_in_the_length_field() -> None:
    """Ours (orp.extensions): the RST's WINDOW_UPDATE length is the end code; it is
    never added to the send window (hashicorp sends 0 and adds it harmlessly)."""
    pair = Pair()
    sid = pair.open()
    pair.client.reset_stream(sid, 0x4F01)
    wire = pair.client.data_to_send()
    assert wire[-12:] == frame(FrameType.WINDOW_UPDATE, Flag.RST, sid, 0x4F01)
    pair.server.receive_data(wire)
    assert drain(pair.server) == [StreamReset(sid, code=0x4F01)]


def test_data_after_fin_resets_only_that_stream() -> None:
    server = YamuxSession(client=False)
    server.receive_data(frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0))
    server.receive_data(frame(FrameType.WINDOW_UPDATE, Flag.SYN, 3, 0))
    server.receive_data(frame(FrameType.DATA, Flag.FIN, 1, 2, b"ok"))
    server.receive_data(frame(FrameType.DATA, 0, 1, 3, b"bad"))
    events = drain(server)
    assert events[-1] == StreamReset(1, "protocol error: data after FIN")
    assert DataReceived(1, b"bad") not in events
    assert server.data_to_send().endswith(frame(FrameType.WINDOW_UPDATE, Flag.RST, 1, 0))
    assert not server.terminated
    assert server.stream_state(3) is StreamState.OPEN
    # A second FIN is a stream error too.
    server.receive_data(frame(FrameType.WINDOW_UPDATE, Flag.FIN, 3, 0))
    server.receive_data(frame(FrameType.WINDOW_UPDATE, Flag.FIN, 3, 0))
    assert drain(server)[-1] == StreamReset(3, "protocol error: second FIN")


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (frame(FrameType.WINDOW_UPDATE, Flag.SYN, 2, 0), "wrong parity"),
        (frame(FrameType.WINDOW_UPDATE, Flag.SYN, 0, 0), "wrong parity"),
        (frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0) * 2, "duplicate SYN"),
        (
            frame(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0)
            + frame(FrameType.DATA, 0, 1, INITIAL_STREAM_WINDOW + 1),
            "exceed the receive window",
        ),
    ],
)
def test_connection_errors(wire: bytes, message: str) -> None:
    server = YamuxSession(client=False)
    with pytest.raises(YamuxProtocolError, match=message):
        server.receive_data(wire)
    assert server.data_to_send().endswith(frame(FrameType.GO_AWAY, 0, 0, 1))


def test_frames_for_unknown_streams_are_skipped() -> None:
    server = YamuxSession(client=False)
    server.receive_data(
        frame(FrameType.DATA, 0, 9, 4, b"gone") + frame(FrameType.WINDOW_UPDATE, Flag.ACK, 9, 5)
    )
    assert drain(server) == []
    assert server.data_to_send() == b""


def test_local_misuse_raises_local_errors() -> None:
    pair = Pair()
    with pytest.raises(YamuxLocalError):
        pair.client.send_data(99, b"x")
    with pytest.raises(YamuxLocalError):
        pair.client.end_stream(99)
    sid = pair.open()
    pair.server.send_data(sid, b"abc")
    pair.to_client()
    with pytest.raises(YamuxLocalError):
        pair.client.acknowledge_received(sid, 4)
    pair.client.acknowledge_received(99, 10)  # ids already gone are ignored


def test_transition_table_is_total_for_legal_inputs_and_raises_otherwise() -> None:
    """Every (state, input) pair either is in the table or is rejected unchanged."""
    for state in StreamState:
        for event in StreamInput:
            key = (state, event)
            if key in yamux_state.TRANSITIONS:
                assert yamux_state.next_state(state, event) in StreamState
            else:
                with pytest.raises(yamux_state.IllegalTransition):
                    yamux_state.next_state(state, event)
    # No way out of CLOSED or RESET.
    assert not any(state in yamux_state.GONE for state, _ in yamux_state.TRANSITIONS)


# --------------------------------------------------------------------------- session


def test_ping_is_answered() -> None:
    pair = Pair()
    pair.client.ping(7)
    assert pair.to_server() == [PingReceived(7)]
    assert pair.to_client() == [PingAcknowledged(7)]


def test_go_away_stops_new_streams_not_old_ones() -> None:
    pair = Pair()
    sid = pair.open()
    pair.server.go_away()
    pair.server.go_away()  # only the first is sent
    assert pair.to_client() == [GoAwayReceived(GoAwayCode.NORMAL)]
    assert not pair.client.can_open_stream
    with pytest.raises(YamuxLocalError, match="GO_AWAY"):
        pair.client.open_stream()
    pair.client.send_data(sid, b"still fine")
    assert pair.to_server() == [DataReceived(sid, b"still fine")]
    # A SYN that crossed our GO_AWAY is refused with RST.
    pair.server.receive_data(frame(FrameType.WINDOW_UPDATE, Flag.SYN, 5, 0))
    assert drain(pair.server) == []
    assert pair.server.data_to_send() == frame(FrameType.WINDOW_UPDATE, Flag.RST, 5, 0)


def test_go_away_with_error_code_is_reported() -> None:
    client = YamuxSession(client=True)
    client.receive_data(frame(FrameType.GO_AWAY, 0, 0, GoAwayCode.INTERNAL_ERROR))
    assert drain(client) == [GoAwayReceived(2)]
    assert client.remote_go_away == 2


def test_incoming_limit_backlog_and_refusal() -> None:
    config = YamuxConfig(max_incoming_streams=2, accept_backlog=1)
    pair = Pair(server=config)
    for _ in range(4):
        pair.client.open_stream()
    pair.client.send_data(5, b"early bytes")
    pair.client.end_stream(5)
    client_events, server_events = pair.settle()
    # Streams 1 and 3 are announced; 5 waits (ACKed, data held); 7 is refused.
    assert server_events == [StreamOpened(1), StreamOpened(3)]
    assert StreamAcknowledged(5) in client_events
    assert StreamReset(7) in client_events
    assert pair.server.statistics().accept_backlog == 1
    # Finishing stream 1 both ways lets stream 5 through, with its bytes and FIN.
    pair.client.end_stream(1)
    pair.server.end_stream(1)
    _, server_events = pair.settle()
    assert server_events == [
        StreamEnded(1),
        StreamOpened(5),
        DataReceived(5, b"early bytes"),
        StreamEnded(5),
    ]
    assert pair.server.statistics().incoming_open == 2


def test_backlogged_stream_reset_by_peer_is_never_announced() -> None:
    pair = Pair(server=YamuxConfig(max_incoming_streams=1))
    pair.client.open_stream()
    pair.client.open_stream()
    pair.settle()
    pair.client.reset_stream(3)
    pair.client.reset_stream(1)
    _, server_events = pair.settle()
    assert server_events == [StreamReset(1)]
    assert pair.server.statistics().open_streams == 0


def test_opens_wait_for_acks_beyond_the_inflight_limit() -> None:
    pair = Pair(client=YamuxConfig(max_inflight_opens=2))
    pair.client.open_stream()
    pair.client.open_stream()
    assert not pair.client.can_open_stream
    with pytest.raises(YamuxLocalError, match="ACK"):
        pair.client.open_stream()
    pair.settle()
    assert pair.client.can_open_stream


# --------------------------------------------------------------------------- flow control


def test_sender_never_exceeds_the_window_and_credit_follows_consumption() -> None:
    pair = Pair()
    sid = pair.open()
    blob = b"z" * (INITIAL_STREAM_WINDOW + 1000)
    assert pair.client.send_data(sid, blob) == INITIAL_STREAM_WINDOW
    assert pair.client.send_window(sid) == 0
    assert pair.client.send_data(sid, b"more") == 0
    assert pair.client.unacknowledged_bytes(sid) == INITIAL_STREAM_WINDOW
    events = pair.to_server()
    assert len(received(events, sid)) == INITIAL_STREAM_WINDOW
    # Arrival alone returns nothing: the reader has not consumed yet.
    assert pair.server.data_to_send() == b""
    pair.server.acknowledge_received(sid, INITIAL_STREAM_WINDOW // 2 - 1)
    assert pair.server.data_to_send() == b""  # batched: less than half a window
    pair.server.acknowledge_received(sid, 1)
    assert pair.to_client() == [WindowUpdated(sid, INITIAL_STREAM_WINDOW // 2)]
    assert pair.client.send_window(sid) == INITIAL_STREAM_WINDOW // 2
    assert pair.client.unacknowledged_bytes(sid) == INITIAL_STREAM_WINDOW // 2


def _lockstep_rounds(pair: Pair, sid: int, rounds: int, read_step: int) -> list[int]:
    """Each round: the client sends all its credit; the server reads it all."""
    per_round = []
    for _ in range(rounds):
        sent = pair.client.send_data(sid, b"\0" * pair.client.send_window(sid))
        per_round.append(sent)
        unread = len(received(pair.to_server(), sid))
        while unread:
            step = min(read_step, unread)
            pair.server.acknowledge_received(sid, step)
            unread -= step
        pair.to_client()
    return per_round


def test_auto_tuning_grows_the_window_when_the_reader_keeps_up() -> None:
    pair = Pair()
    sid = pair.open()
    per_round = _lockstep_rounds(pair, sid, rounds=10, read_step=64 * 1024)
    assert per_round[0] == INITIAL_STREAM_WINDOW
    assert per_round[1] > per_round[0]
    assert per_round[-1] == yamux.MAX_STREAM_WINDOW  # doubled up to the cap, no further
    assert pair.server.receive_window(sid) == yamux.MAX_STREAM_WINDOW
    assert pair.server.statistics().autotune_used == yamux.MAX_STREAM_WINDOW - INITIAL_STREAM_WINDOW
    # The budget comes back when the stream ends.
    pair.client.reset_stream(sid)
    pair.settle()
    assert pair.server.statistics().autotune_used == 0


def test_no_growth_for_a_reader_that_lags() -> None:
    pair = Pair()
    sid = pair.open()
    for _ in range(20):
        pair.client.send_data(sid, b"\0" * pair.client.send_window(sid))
        pair.to_server()
        # Consume only half of what is buffered: the reader never catches up.
        backlog = pair.server.unread_bytes(sid)
        pair.server.acknowledge_received(sid, backlog // 2 + 1)
        pair.to_client()
    assert pair.server.receive_window(sid) == INITIAL_STREAM_WINDOW
    assert pair.server.unread_bytes(sid) <= INITIAL_STREAM_WINDOW


def test_auto_tuning_respects_the_session_budget() -> None:
    budget = 512 * 1024
    pair = Pair(server=YamuxConfig(autotune_budget=budget))
    first, second = pair.open(), pair.open()
    _lockstep_rounds(pair, first, rounds=8, read_step=1 << 20)
    _lockstep_rounds(pair, second, rounds=8, read_step=1 << 20)
    assert pair.server.receive_window(first) == INITIAL_STREAM_WINDOW + budget
    assert pair.server.receive_window(second) == INITIAL_STREAM_WINDOW
    assert pair.server.statistics().autotune_used == budget


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["send", "wire", "wire_back", "read"]), st.integers(1, 400_000)),
        max_size=60,
    ),
    st.booleans(),
)
def test_window_accounting_never_negative_never_overrun(
    ops: list[tuple[str, int]], small_cap: bool
) -> None:
    """Random interleavings of writes, partial delivery, reads and updates."""
    cap = 1 << 20 if small_cap else yamux.MAX_STREAM_WINDOW
    pair = Pair(server=YamuxConfig(max_stream_window=cap))
    sid = pair.open()
    to_server = bytearray()
    to_client = bytearray()
    unread = 0
    sent_total = 0
    got_total = 0
    for op, n in ops:
        if op == "send":
            sent = pair.client.send_data(sid, b"\1" * n)
            assert 0 <= sent <= n
            sent_total += sent
            to_server += pair.client.data_to_send()
        elif op == "wire":  # deliver a prefix of what is on the wire
            chunk, to_server[:] = bytes(to_server[:n]), to_server[n:]
            if chunk:
                pair.server.receive_data(chunk)
            got = len(received(drain(pair.server), sid))
            got_total += got
            unread += got
            to_client += pair.server.data_to_send()
        elif op == "wire_back":
            chunk, to_client[:] = bytes(to_client[:n]), to_client[n:]
            if chunk:
                pair.client.receive_data(chunk)
            drain(pair.client)
        else:
            take = min(n, unread)
            pair.server.acknowledge_received(sid, take)
            unread -= take
            to_client += pair.server.data_to_send()
        stream = pair.server._streams[sid]
        assert stream.credit >= 0
        # Credit is taken when a DATA header arrives; its payload may still be on the way.
        in_flight = pair.server._payload_left if pair.server._payload_stream is stream else 0
        assert stream.unacked == unread + in_flight
        assert stream.credit + stream.unacked <= stream.window <= cap
        assert pair.client.send_window(sid) >= 0
        assert got_total <= sent_total
    assert not pair.server.terminated and not pair.client.terminated
