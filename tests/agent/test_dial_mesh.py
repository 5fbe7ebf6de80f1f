"""Which relay the agent takes when several answer (``RelayDialer._connect_ordered``).

Without a mesh the earliest relay of the list wins even if a later one answered first: the
agents must meet on one relay. After a relay of a mesh (``orp.CAP_MESH``) the agent takes a
later relay that answered once :data:`MESH_PREFERENCE_GRACE` passed, instead of waiting out a
dead relay's handshake timeout. The dials are scripted; no network.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from outrelay.agent.dial import Link, RelayDialer, SessionConfig
from outrelay.orp import CAP_MESH

DEAD_FAILS_AFTER = 2.0
"""How long the scripted dead relay takes to fail (its handshake timeout)."""


class _Conn:
    def __init__(self) -> None:
        self.closed = False

    def close(self, code: int, reason: str) -> None:
        self.closed = True


def _link(address: str, accepted: frozenset[str] = frozenset()) -> Link:
    return Link(address, cast(Any, _Conn()), cast(Any, None), cast(Any, None), accepted=accepted)


class _ScriptedDialer(RelayDialer):
    """``_connect_one`` answers per address: ("ok", delay) or ("dead", delay)."""

    def __init__(self, script: dict[int, tuple[str, float]], accepted: frozenset[str]) -> None:
        relays = tuple(("127.0.0.1", port) for port in script)
        config = SessionConfig(relays=relays, uri="outrelay://acme/agent/a", tls=cast(Any, None))
        super().__init__(config, instance="i", connect_quic=cast(Any, None), endpoint=lambda: None)
        self.script = script
        self.accepted = accepted
        self.cancelled: list[int] = []

    async def _connect_one(self, host: str, port: int, kind: str, handshake_timeout: float) -> Link:
        outcome, delay = self.script[port]
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.cancelled.append(port)
            raise
        if outcome == "dead":
            raise TimeoutError("handshake timed out")
        return _link(f"{host}:{port}", self.accepted)


async def _connect_twice(dialer: _ScriptedDialer) -> tuple[Link, Link, float]:
    """The first connect (all relays healthy and quick), then the reconnect after the first
    relay died; returns both links and the reconnect's duration."""
    first_script = dict(dialer.script)
    dialer.script = {port: ("ok", 0.01 * (i + 1)) for i, port in enumerate(first_script)}
    first = await dialer.connect_any()
    dialer.script = first_script
    dialer.cancelled.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    second = await dialer.connect_any()
    return first, second, loop.time() - started


@pytest.mark.timeout(10)
async def test_after_a_mesh_relay_a_later_answer_wins_without_waiting_for_a_dead_one() -> None:
    dialer = _ScriptedDialer(
        {1: ("dead", DEAD_FAILS_AFTER), 2: ("ok", 0.01)}, frozenset({CAP_MESH})
    )
    first, second, _ = await _connect_twice(dialer)
    assert first.address == "127.0.0.1:1"  # all healthy: the list order holds
    assert second.address == "127.0.0.1:2"
    assert dialer.cancelled == [1], "the dead relay's dial should have been abandoned"


@pytest.mark.timeout(10)
async def test_without_a_mesh_the_first_relay_is_waited_for() -> None:
    dialer = _ScriptedDialer({1: ("dead", DEAD_FAILS_AFTER), 2: ("ok", 0.01)}, frozenset())
    _, second, waited = await _connect_twice(dialer)
    assert second.address == "127.0.0.1:2"
    assert dialer.cancelled == [], "the first relay must be waited for until it fails"
    assert waited >= DEAD_FAILS_AFTER  # a lower bound: what was waited for, not a speed claim


@pytest.mark.timeout(10)
async def test_in_a_mesh_an_earlier_relay_answering_within_the_grace_still_wins() -> None:
    dialer = _ScriptedDialer({1: ("ok", 0.1), 2: ("ok", 0.01)}, frozenset({CAP_MESH}))
    _, second, _ = await _connect_twice(dialer)
    assert second.address == "127.0.0.1:1"
    assert dialer.cancelled == []
