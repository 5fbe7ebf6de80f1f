"""The relay's resume matcher (spec 02 §7.4): sans-IO, driven with explicit ``now_ms``."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outrelay.relay.resume_matcher import RESUME_WINDOW_MS, Half, HalfKind, ResumeMatcher

pytestmark = pytest.mark.timeout(20)


def half(
    stream_id: int,
    kind: HalfKind = HalfKind.RESUME,
    *,
    my_position: int = 0,
    peer_ack_position: int = 0,
    uri: str = "spiffe://acme/agent/a",
    handle: str = "",
) -> Half[str]:
    return Half(stream_id, kind, my_position, peer_ack_position, uri, handle or f"h{stream_id}")


def test_default_window_is_30_s() -> None:
    assert RESUME_WINDOW_MS == 30_000
    assert ResumeMatcher[str]().window_ms == 30_000


def test_first_half_is_pending_until_its_peer_arrives() -> None:
    m: ResumeMatcher[str] = ResumeMatcher(window_ms=1000)
    first = half(42, my_position=10, peer_ack_position=5, handle="first")
    assert m.submit(first, now_ms=100) is None
    assert m.pending(42) is first
    assert first.deadline_ms == 1100
    assert len(m) == 1
    second = half(42, my_position=5, peer_ack_position=10, handle="second")
    assert m.submit(second, now_ms=200) is first  # matched: the caller gets the peer
    assert m.pending(42) is None
    assert len(m) == 0


def test_pairs_by_id_only() -> None:
    m: ResumeMatcher[str] = ResumeMatcher(window_ms=1000)
    a7, a8 = half(7, handle="a7"), half(8, handle="a8")
    assert m.submit(a7, 0) is None
    assert m.submit(a8, 0) is None
    # No identity checks: a half from any agent with the same id matches.
    b8 = half(8, uri="spiffe://other/agent/z", handle="b8")
    assert m.submit(b8, 1) is a8
    assert m.pending(7) is a7
    b7 = half(7, HalfKind.MIGRATE, handle="b7")  # RESUME and MIGRATE pair with each other
    assert m.submit(b7, 2) is a7
    assert len(m) == 0


def test_id_zero_is_allowed() -> None:
    m: ResumeMatcher[str] = ResumeMatcher()
    z1, z2 = half(0, handle="z1"), half(0, handle="z2")
    assert m.submit(z1, 0) is None
    assert m.submit(z2, 0) is z1


def test_third_half_starts_a_new_entry() -> None:
    m: ResumeMatcher[str] = ResumeMatcher(window_ms=1000)
    h1, h2, h3, h4 = (half(5, handle=f"h{i}") for i in range(1, 5))
    assert m.submit(h1, 0) is None
    assert m.submit(h2, 10) is h1
    assert m.submit(h3, 20) is None
    assert m.pending(5) is h3
    assert h3.deadline_ms == 1020  # a fresh window
    assert m.submit(h4, 30) is h3


def test_expire_returns_halves_whose_window_ended() -> None:
    m: ResumeMatcher[str] = ResumeMatcher(window_ms=1000)
    early, late = half(1, handle="early"), half(2, handle="late")
    m.submit(early, now_ms=0)
    m.submit(late, now_ms=500)
    assert m.expire(999) == []
    assert m.expire(1000) == [early]  # the deadline itself is expired
    assert m.pending(1) is None
    assert m.pending(2) is late
    assert m.expire(1499) == []
    assert m.expire(10_000) == [late]
    assert len(m) == 0
    assert m.expire(20_000) == []


def test_after_expiry_the_next_half_is_parked_not_matched() -> None:
    m: ResumeMatcher[str] = ResumeMatcher(window_ms=1000)
    old, new = half(3, handle="old"), half(3, handle="new")
    m.submit(old, 0)
    assert m.expire(1000) == [old]
    assert m.submit(new, 1001) is None
    assert m.pending(3) is new


def test_withdraw_only_removes_the_same_half() -> None:
    m: ResumeMatcher[str] = ResumeMatcher(window_ms=1000)
    mine, impostor = half(9, handle="mine"), half(9, handle="impostor")
    m.submit(mine, 0)
    assert not m.withdraw(impostor)  # same id, another half: untouched
    assert m.pending(9) is mine
    assert m.withdraw(mine)
    assert m.pending(9) is None
    assert not m.withdraw(mine)  # already gone


def test_withdraw_after_a_match_does_nothing() -> None:
    m: ResumeMatcher[str] = ResumeMatcher(window_ms=1000)
    first, second, third = half(4, handle="1"), half(4, handle="2"), half(4, handle="3")
    m.submit(first, 0)
    assert m.submit(second, 1) is first
    m.submit(third, 2)
    assert not m.withdraw(first)  # its timer fired late: it must not evict "third"
    assert m.pending(4) is third


def test_next_deadline() -> None:
    m: ResumeMatcher[str] = ResumeMatcher(window_ms=1000)
    assert m.next_deadline() is None
    a, b = half(1), half(2)
    m.submit(b, now_ms=300)
    m.submit(a, now_ms=100)
    assert m.next_deadline() == 1100
    m.withdraw(a)
    assert m.next_deadline() == 1300
    m.expire(1300)
    assert m.next_deadline() is None


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["submit", "expire", "withdraw"]), st.integers(0, 3)),
        max_size=40,
    )
)
def test_matches_a_naive_model(ops: list[tuple[str, int]]) -> None:
    """Against a dict model: at most one pending half per id; matches clear the entry."""
    window = 50
    m: ResumeMatcher[int] = ResumeMatcher(window_ms=window)
    model: dict[int, tuple[Half[int], int]] = {}  # id -> (half, deadline)
    made: list[Half[int]] = []
    now = 0
    for step, (op, sid) in enumerate(ops):
        now += 17
        if op == "submit":
            h: Half[int] = Half(sid, HalfKind.RESUME, 0, 0, "u", step)
            made.append(h)
            got = m.submit(h, now)
            if sid in model:
                assert got is model.pop(sid)[0]
            else:
                assert got is None
                model[sid] = (h, now + window)
        elif op == "expire":
            gone = m.expire(now)
            expected = [h for h, d in model.values() if d <= now]
            assert sorted(x.handle for x in gone) == sorted(x.handle for x in expected)
            model = {k: v for k, v in model.items() if v[1] > now}
        elif made:
            target = made[sid % len(made)]
            expected_hit = model.get(target.stream_id, (None, 0))[0] is target
            assert m.withdraw(target) is expected_hit
            if expected_hit:
                del model[target.stream_id]
        assert len(m) == len(model)
        for k, (h, _) in model.items():
            assert m.pending(k) is h
        assert m.next_deadline() == min((d for _, d in model.values()), default=None)
