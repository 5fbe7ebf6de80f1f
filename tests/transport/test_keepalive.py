"""KeepAlive's liveness rules, on a fake clock (no sockets, no sleeping)."""

from __future__ import annotations

from typing import Any

from outrelay.transport.quic import settings
from outrelay.transport.quic.keepalive import KeepAlive


class FakeLoop:
    """Just enough of an event loop: a settable clock; timers are not run."""

    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any) -> Any:
        class Handle:
            def cancel(self) -> None:
                pass

        return Handle()


class FakePinger:
    def __init__(self) -> None:
        self.connected = True
        self.terminated = False
        self.in_flight = False
        self.closed: str | None = None

    def send_ping(self) -> None:
        self.in_flight = True

    def probe_timeout_in_flight(self) -> float | None:
        return 0.01 if self.in_flight else None

    def close_silent(self, reason: str) -> None:
        self.closed = reason


def _keepalive() -> tuple[FakeLoop, FakePinger, KeepAlive]:
    loop = FakeLoop()
    pinger = FakePinger()
    keepalive = KeepAlive(
        loop,  # type: ignore[arg-type]
        pinger,
        interval=settings.KEEPALIVE_INTERVAL,
        silence_timeout=settings.PEER_SILENCE_TIMEOUT,
    )
    return loop, pinger, keepalive


def test_a_keepalive_after_an_idle_spell_gets_the_whole_floor_to_be_answered() -> None:
    """Heard 2.9 s ago (the previous keep-alive), PING now: a slow answer is not death."""
    loop, pinger, keepalive = _keepalive()
    keepalive.received()
    loop.now += 2.9
    assert not keepalive.peer_gone()  # idle: nothing in flight
    keepalive.on_keepalive_timer()  # the PING puts bytes in flight
    loop.now += 0.5
    assert not keepalive.peer_gone(), pinger.closed  # 3.4 s since the last packet
    loop.now += settings.BUSY_SILENCE_FLOOR - 0.5 - 0.01
    assert not keepalive.peer_gone()
    loop.now += 0.1
    assert keepalive.peer_gone()
    assert pinger.closed is not None and "peer silent for" in pinger.closed


def test_bytes_in_flight_to_a_dead_peer_give_up_after_the_floor() -> None:
    """A transfer in progress (busy for long) stops hearing its peer: the floor counts from
    the last packet received, as before."""
    loop, pinger, keepalive = _keepalive()
    pinger.in_flight = True
    assert not keepalive.peer_gone()  # busy from now on
    for _ in range(20):  # 10 s of a busy, live connection
        loop.now += 0.5
        keepalive.received()
        assert not keepalive.peer_gone()
    loop.now += settings.BUSY_SILENCE_FLOOR - 0.01
    assert not keepalive.peer_gone()
    loop.now += 0.1
    assert keepalive.peer_gone()


def test_an_idle_peer_is_gone_after_the_silence_timeout() -> None:
    loop, _pinger, keepalive = _keepalive()
    keepalive.received()
    loop.now += settings.PEER_SILENCE_TIMEOUT - 0.01
    assert not keepalive.peer_gone()
    loop.now += 0.1
    assert keepalive.peer_gone()
