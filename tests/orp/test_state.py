"""Per-stream state machine (spec 01): the table, exhaustively and by property."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrelay.orp import (
    STREAM_TRANSITIONS,
    InvalidTransition,
    LocalProtocolError,
    StreamInput,
    StreamState,
    StreamStateMachine,
)

S = StreamState
I = StreamInput  # noqa: E741

# Spec 01, spelled out independently of the implementation's table.
LEGAL = {
    (S.INIT, I.OPEN): S.OPENING,
    (S.OPENING, I.ACCEPT): S.ACCEPTED,
    (S.ACCEPTED, I.SPLICE): S.SPLICED,
    (S.ACCEPTED, I.FIN): S.CLOSING,
    (S.SPLICED, I.FIN): S.CLOSING,
    (S.CLOSING, I.FIN): S.CLOSED,
    **{(state, I.RESET): S.CLOSED for state in S},
}


def machine_in(state: StreamState) -> StreamStateMachine:
    machine = StreamStateMachine()
    machine.state = state
    return machine


def test_table_is_the_spec() -> None:
    assert dict(STREAM_TRANSITIONS) == LEGAL
    assert len(StreamState) == 6
    assert len(StreamInput) == 5


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        STREAM_TRANSITIONS[(S.INIT, I.FIN)] = S.CLOSED  # type: ignore[index]


def test_starts_in_init() -> None:
    assert StreamStateMachine().state is S.INIT


@pytest.mark.parametrize(
    ("state", "event"), list(itertools.product(StreamState, StreamInput)), ids=str
)
def test_every_pair(state: StreamState, event: StreamInput) -> None:
    machine = machine_in(state)
    if (state, event) in LEGAL:
        assert machine.process(event) is LEGAL[(state, event)]
        assert machine.state is LEGAL[(state, event)]
    else:
        with pytest.raises(InvalidTransition) as info:
            machine.process(event)
        assert machine.state is state  # nothing happens (h11)
        assert info.value.state is state
        assert info.value.input is event
        assert isinstance(info.value, LocalProtocolError)


def test_happy_path() -> None:
    machine = StreamStateMachine()
    for event, expected in [
        (I.OPEN, S.OPENING),
        (I.ACCEPT, S.ACCEPTED),
        (I.SPLICE, S.SPLICED),
        (I.FIN, S.CLOSING),
        (I.FIN, S.CLOSED),
    ]:
        assert machine.process(event) is expected
    assert "CLOSED" in repr(machine)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.sampled_from(StreamInput), max_size=12))
def test_random_sequences_follow_the_table(events: list[StreamInput]) -> None:
    machine = StreamStateMachine()
    state = S.INIT
    for event in events:
        before = machine.state
        try:
            result = machine.process(event)
        except InvalidTransition:
            assert (state, event) not in LEGAL
            assert machine.state is before
        else:
            state = LEGAL[(state, event)]
            assert result is state
        assert machine.state is state
