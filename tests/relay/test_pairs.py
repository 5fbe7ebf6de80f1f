"""Tests for outrelay.relay.pairs: pair table and migrated cache (spec 02 §5, §6.1, §7.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrelay.relay.pairs import (
    CLOSED_PAIR_TTL_MS,
    ENDED_PAIR_TTL_MS,
    MIGRATED_CAPACITY,
    MIGRATION_TTL_MS,
    AgentInstances,
    EndedPairs,
    Member,
    MigratedCache,
    MigratedStream,
    PairTable,
    StreamPair,
)

C1 = "outrelay://acme/agent/c1"
P1 = "outrelay://acme/agent/p1"
C2 = "outrelay://acme/agent/c2"
P2 = "outrelay://acme/agent/p2"


# --- pair table ------------------------------------------------------------------------------


def test_record_pair_rejects_different_pair() -> None:
    """TestRecordPairRejectsDifferentPair."""
    table = PairTable()
    assert table.record(0xFEED, C1, P1)
    assert table.record(0xFEED, C1, P1)  # idempotent
    assert not table.record(0xFEED, C2, P2)  # collision -> 409
    assert table.get(0xFEED) == StreamPair(C1, P1)  # original intact
    assert table.forget(0xFEED, C1, P1)
    assert table.record(0xFEED, C2, P2)  # the slot is reusable


def test_record_pair_zero_stream_id_is_noop() -> None:
    """TestRecordPairZeroStreamIDIsNoop."""
    table = PairTable()
    assert table.record(0, "x", "")
    assert table.record(0, C1, P1)
    assert table.record(0, C2, P2)  # never collides
    assert len(table) == 0
    assert table.route(0, C1) is None


@pytest.mark.parametrize(("consumer", "provider"), [(C1, P2), (C2, P1)])
def test_half_different_pair_collides(consumer: str, provider: str) -> None:
    table = PairTable()
    table.record(7, C1, P1)
    assert not table.record(7, consumer, provider)


def test_forget_only_removes_that_pair() -> None:
    """A refused recorder's cleanup must not remove the live splice's entry."""
    table = PairTable()
    table.record(9, C1, P1)
    assert not table.record(9, C2, P2)
    assert not table.forget(9, C2, P2)
    assert table.get(9) == StreamPair(C1, P1)
    assert not table.forget(10, C1, P1)  # unknown id
    assert table.forget(9, C1, P1)
    assert len(table) == 0
    assert not table.forget(9, C1, P1)


def test_route() -> None:
    """Spec 02 §5 step 2: the other side's URI, None for a stranger or an unknown id."""
    table = PairTable()
    table.record(0xCAFEF00D, C1, P1)
    assert table.route(0xCAFEF00D, C1) == P1
    assert table.route(0xCAFEF00D, P1) == C1
    assert table.route(0xCAFEF00D, C2) is None
    assert table.route(0xDEAD, C1) is None


def test_a_forgotten_pair_routes_checkpoints_for_a_while() -> None:
    """Ours (orp.CAP_CLOSE_ACK): the agents' last checkpoints come after the splice ended."""
    table = PairTable()
    table.record(5, C1, P1)
    assert table.forget(5, C1, P1, now_ms=1_000)
    assert table.route(5, C1) is None  # no longer live: candidates are not forwarded
    assert table.route_closed(5, C1, 1_000 + CLOSED_PAIR_TTL_MS - 1) == P1
    assert table.route_closed(5, P1, 1_000) == C1
    assert table.route_closed(5, C2, 1_000) is None  # a stranger
    assert table.route_closed(5, C1, 1_000 + CLOSED_PAIR_TTL_MS) is None  # expired
    assert table.route_closed(5, P1, 1_000) is None  # and gone
    table.record(6, C1, P1)
    assert table.forget(6, C1, P1)  # without a clock: not remembered
    assert table.route_closed(6, C1, 0) is None


def test_closed_pairs_are_capped_oldest_first() -> None:
    table = PairTable(closed_capacity=2)
    for sid in (1, 2, 3):
        table.record(sid, C1, P1)
        table.forget(sid, C1, P1, now_ms=sid)
    assert table.route_closed(1, C1, 3) is None
    assert table.route_closed(2, C1, 3) == P1
    assert table.route_closed(3, C1, 3) == P1


def test_stream_pair_unpacks() -> None:
    consumer, provider = StreamPair(C1, P1)
    assert (consumer, provider) == (C1, P1)


@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["record", "forget"]),
            st.integers(min_value=0, max_value=3),
            st.sampled_from([(C1, P1), (C2, P2), (C1, P2)]),
        ),
        max_size=40,
    )
)
def test_pair_table_matches_dict_model(ops: list[tuple[str, int, tuple[str, str]]]) -> None:
    table = PairTable()
    model: dict[int, tuple[str, str]] = {}
    for op, sid, pair in ops:
        if op == "record":
            ok = sid == 0 or model.setdefault(sid, pair) == pair
            assert table.record(sid, *pair) is ok
        else:
            removed = model.get(sid) == pair
            if removed:
                del model[sid]
            assert table.forget(sid, *pair) is removed
        assert len(table) == len(model)
        for key, (c, p) in model.items():
            assert table.route(key, c) == p
            assert table.route(key, p) == c


# --- migrated cache --------------------------------------------------------------------------

T0 = 1_000_000


def test_migrated_note_and_lookup() -> None:
    """TestMigratedLRUNoteAndLookup."""
    cache = MigratedCache()
    cache.note(0xC0FFEE, C1, P1, T0)
    assert cache.lookup(0xC0FFEE, T0 + 1) == MigratedStream(0xC0FFEE, C1, P1, T0)
    cache.discard(0xC0FFEE)
    assert cache.lookup(0xC0FFEE, T0 + 1) is None
    assert len(cache) == 0
    cache.discard(0xC0FFEE)  # no-op


def test_migrated_expires_after_ttl() -> None:
    """TestMigratedLRUExpiresAfterTTL: age >= 60 s is absent."""
    assert MIGRATION_TTL_MS == 60_000
    cache = MigratedCache()
    cache.note(1, C1, P1, T0)
    assert cache.lookup(1, T0 + 59_999) is not None
    assert cache.lookup(1, T0 + 60_000) is None
    assert len(cache) == 0  # removed lazily by the lookup


def test_migrated_repeat_overwrites_and_refreshes() -> None:
    """Spec 02 §7.3: repeats from either side overwrite the entry and refresh its time."""
    cache = MigratedCache()
    cache.note(1, C1, P1, T0)
    cache.note(1, P1, "", T0 + 50_000)
    entry = cache.lookup(1, T0 + 100_000)
    assert entry == MigratedStream(1, P1, "", T0 + 50_000)
    assert len(cache) == 1


def test_migrated_purges_expired_on_note() -> None:
    cache = MigratedCache()
    cache.note(1, C1, P1, T0)
    cache.note(2, C1, P1, T0 + 30_000)
    cache.note(3, C1, P1, T0 + 60_000)  # entry 1 is exactly 60 s old: purged
    assert len(cache) == 2
    cache.note(4, C1, P1, T0 + 90_000)  # entry 2 purged
    assert len(cache) == 2
    assert cache.lookup(3, T0 + 90_000) is not None


def test_migrated_refresh_moves_entry_behind_younger_ones() -> None:
    cache = MigratedCache()
    cache.note(1, C1, P1, T0)
    cache.note(2, C1, P1, T0 + 10_000)
    cache.note(1, C1, P1, T0 + 20_000)  # refreshed: now younger than 2
    cache.note(3, C1, P1, T0 + 70_000)  # 2 is 60 s old and goes; 1 (50 s) stays
    assert cache.lookup(2, T0 + 70_000) is None
    assert cache.lookup(1, T0 + 70_000) is not None
    assert len(cache) == 2


def test_migrated_cap_drops_oldest() -> None:
    """[REC] The cache is capped (the reference's is not)."""
    assert MIGRATED_CAPACITY == 65_536
    cache = MigratedCache(capacity=3)
    for sid in range(1, 6):
        cache.note(sid, C1, P1, T0 + sid)
    assert len(cache) == 3
    assert [cache.lookup(sid, T0 + 10) is not None for sid in range(1, 6)] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_migrated_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        MigratedCache(capacity=0)
    with pytest.raises(ValueError):
        MigratedCache(ttl_ms=0)


# --- ended pairs and agent instances (ours) ---------------------------------------------------


def test_ended_pairs_name_the_other_end_until_they_expire() -> None:
    ended = EndedPairs(capacity=2)
    c, p = Member(C1, "c-1"), Member(P1, "p-1")
    ended.note(7, c, p, now_ms=0)
    ended.note(0, c, p, now_ms=0)  # id 0 is never recorded
    assert ended.peer_of(7, C1, 10) == p
    assert ended.peer_of(7, P1, 10) == c
    assert ended.peer_of(7, C2, 10) is None  # a third agent learns nothing
    assert ended.peer_of(7, C1, ENDED_PAIR_TTL_MS) is None  # expired and dropped
    assert len(ended) == 0
    for sid in (1, 2, 3):
        ended.note(sid, c, p, now_ms=sid)
    assert len(ended) == 2 and ended.peer_of(1, C1, 5) is None  # the oldest went


def test_agent_instances_tell_a_gone_process() -> None:
    inst = AgentInstances()
    assert inst.hello(P1, "one") == ""
    assert not inst.is_gone(Member(P1, "one"))
    assert inst.hello(P1, "one") == ""  # a reconnect of the same process
    assert inst.hello(P1, "two") == "one"  # a restart: the old one is gone
    assert inst.is_gone(Member(P1, "one")) and not inst.is_gone(Member(P1, "two"))
    inst.departed(Member(P1, "one"))  # not the latest: changes nothing
    assert not inst.is_gone(Member(P1, "two"))
    inst.departed(Member(P1, "two"))
    assert inst.is_gone(Member(P1, "two"))
    # Reference agents send no instance: never known to be gone.
    assert inst.hello(C1, "") == "" and inst.hello(C1, "x") == ""
    assert not inst.is_gone(Member(C1, ""))
    assert not inst.is_gone(Member(C2, "never-seen"))
