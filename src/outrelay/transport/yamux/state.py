"""Per-stream state of a yamux session: the transition table, stream records, limits."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from outrelay.transport.yamux.frames import (
    ACCEPT_BACKLOG,
    AUTOTUNE_BUDGET,
    INITIAL_STREAM_WINDOW,
    MAX_INCOMING_STREAMS,
    MAX_INFLIGHT_OPENS,
    MAX_STREAM_WINDOW,
)

__all__ = [
    "GONE",
    "TRANSITIONS",
    "IllegalTransition",
    "StreamInput",
    "StreamRecord",
    "StreamState",
    "YamuxConfig",
    "YamuxStatistics",
    "next_state",
]


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
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
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
GONE = (_S.CLOSED, _S.RESET)


class IllegalTransition(Exception):
    pass


def next_state(state: StreamState, event: StreamInput) -> StreamState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"cannot {event.value} in state {state.value}") from None


@dataclass(slots=True)
class StreamRecord:
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
