"""Per-stream state machine (spec 01, "Per-stream state machine").

Everything that decides a transition lives in this file, and the file does not know which
role we play (initiator, responder or relay), as in h11's ``_state.py``. Inputs are what
the caller has seen or done on the stream:

* ``OPEN``: the initiator sent OPEN_STREAM, or the responder received INCOMING_STREAM;
* ``ACCEPT``: STREAM_ACCEPT was seen;
* ``SPLICE``: the relay paired the two halves;
* ``FIN``: a graceful half-close (one per direction: the first moves to CLOSING, the
  second to CLOSED);
* ``RESET``: STREAM_REJECT or a reset; legal in every state, always ends in CLOSED.

An illegal input raises :class:`InvalidTransition` and changes nothing (the h11 behaviour,
which spec 01 asks for; h2 instead moves to CLOSED).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType
from typing import Final

from .errors import InvalidTransition

__all__ = ["STREAM_TRANSITIONS", "StreamInput", "StreamState", "StreamStateMachine"]


class StreamState(Enum):
    """States of one ORP stream."""

    INIT = "init"
    OPENING = "opening"
    ACCEPTED = "accepted"
    SPLICED = "spliced"
    CLOSING = "closing"
    CLOSED = "closed"


class StreamInput(Enum):
    """Inputs (events) that drive :class:`StreamStateMachine`."""

    OPEN = "open"
    ACCEPT = "accept"
    SPLICE = "splice"
    FIN = "fin"
    RESET = "reset"


# Spec 01 (reference lib/orp):
#
#              Open             Accept             Splice
#     INIT ----------> OPENING --------> ACCEPTED --------> SPLICED
#                                            |                 |
#                                            | Fin             | Fin
#                                            v                 |
#                                         CLOSING <------------+
#                                            |
#                                            | Fin
#                                            v
#                                         CLOSED
#
#     any state --Reset--> CLOSED   (including CLOSED itself)
#
# Every pair missing from the table is illegal.
_S = StreamState
_I = StreamInput
_TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (_S.INIT, _I.OPEN): _S.OPENING,
    (_S.OPENING, _I.ACCEPT): _S.ACCEPTED,
    (_S.ACCEPTED, _I.SPLICE): _S.SPLICED,
    (_S.ACCEPTED, _I.FIN): _S.CLOSING,
    (_S.SPLICED, _I.FIN): _S.CLOSING,
    (_S.CLOSING, _I.FIN): _S.CLOSED,
}
_TRANSITIONS.update({(state, _I.RESET): _S.CLOSED for state in StreamState})
del _S, _I

STREAM_TRANSITIONS: Final[Mapping[tuple[StreamState, StreamInput], StreamState]] = MappingProxyType(
    _TRANSITIONS
)
"""The legal transitions, ``(state, input) -> next state`` (read-only)."""


class StreamStateMachine:
    """The state of one stream, advanced by :meth:`process`.

    Attributes:
        state: the current :class:`StreamState` (starts at ``INIT``).
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: StreamState = StreamState.INIT

    def process(self, input: StreamInput) -> StreamState:
        """Apply ``input`` and return the new state.

        Args:
            input: what happened on the stream.

        Returns:
            The new state (also stored in :attr:`state`).

        Raises:
            InvalidTransition: ``input`` is not legal in the current state; :attr:`state`
                is unchanged.
        """
        try:
            new_state = STREAM_TRANSITIONS[(self.state, input)]
        except KeyError:
            raise InvalidTransition(
                f"stream input {input.name} is not legal in state {self.state.name}",
                state=self.state,
                input=input,
            ) from None
        self.state = new_state
        return new_state

    def __repr__(self) -> str:
        return f"<StreamStateMachine state={self.state.name}>"
