"""Pure admission logic: token buckets, half-open accounting, the QUIC Retry policy."""

from __future__ import annotations

import pytest

from outrelay.transport.admission import (
    HalfOpen,
    QuicAdmission,
    RetryMode,
    SourceBuckets,
    TokenBucket,
    Verdict,
)


def test_token_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 of a token
    assert bucket.take(0.5)  # 1.0
    assert not bucket.take(0.5)
    assert bucket.is_full(100.0)
    assert bucket.tokens == 3.0  # capped at the burst


def test_token_bucket_ignores_a_clock_that_goes_back() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1.0, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_source_buckets_are_per_source_and_bounded() -> None:
    buckets = SourceBuckets(rate=1.0, burst=2.0, max_sources=2)
    assert buckets.take("a", 0.0) and buckets.take("a", 0.0)
    assert not buckets.take("a", 0.0)
    assert buckets.take("b", 0.0)  # b has its own bucket
    # The table is full of busy sources: a third one is refused, not added.
    assert not buckets.take("c", 0.0)
    assert len(buckets) == 2
    # Once a and b are quiet (full again) they are pruned and c fits.
    assert buckets.take("c", 10.0)
    assert len(buckets) == 1


def test_half_open_caps_total_and_per_source() -> None:
    table = HalfOpen(total_cap=3, per_source_cap=2)
    table.open("a")
    table.open("a")
    assert not table.fits("a")
    assert table.fits("b")
    table.open("b")
    assert not table.fits("c")  # total cap
    table.close("a")
    assert table.fits("a") and table.fits("c")
    assert (table.total, table.of("a"), table.sources) == (2, 1, 2)
    table.close("a")
    table.close("b")
    assert (table.total, table.sources) == (0, 0)
    with pytest.raises(ValueError):
        table.close("a")  # more closes than opens is a bug, not silently negative


def _admission(mode: RetryMode = RetryMode.AUTO, **kwargs: float) -> QuicAdmission:
    defaults: dict[str, float] = {
        "max_half_open": 10,
        "max_half_open_per_source": 4,
        "retry_threshold": 6,
        "unvalidated_per_source": 2,
        "rate": 100.0,
        "burst": 100.0,
        "total_rate": 1000.0,
        "total_burst": 1000.0,
        "retry_hold": 5.0,
    }
    defaults.update(kwargs)
    return QuicAdmission(
        mode,
        max_half_open=int(defaults["max_half_open"]),
        max_half_open_per_source=int(defaults["max_half_open_per_source"]),
        retry_threshold=int(defaults["retry_threshold"]),
        unvalidated_per_source=int(defaults["unvalidated_per_source"]),
        rate=defaults["rate"],
        burst=defaults["burst"],
        total_rate=defaults["total_rate"],
        total_burst=defaults["total_burst"],
        retry_hold=defaults["retry_hold"],
    )


def _admit_new(adm: QuicAdmission, source: str, now: float) -> Verdict:
    verdict = adm.check_new(source, now)
    if verdict is Verdict.ADMIT:
        adm.opened(source, validated=False)
    return verdict


def test_auto_admits_while_quiet_then_retries_for_the_hold() -> None:
    adm = _admission()
    assert _admit_new(adm, "a", 0.0) is Verdict.ADMIT
    assert _admit_new(adm, "a", 0.0) is Verdict.ADMIT
    assert not adm.retry_active(0.0)
    # a's third unvalidated handshake: pressure, Retry for everyone.
    assert _admit_new(adm, "a", 0.0) is Verdict.RETRY
    assert adm.retry_active(0.1)
    assert _admit_new(adm, "b", 1.0) is Verdict.RETRY
    # The pressure ends (the handshakes expired), but Retry holds for 5 s.
    adm.closed("a", validated=False)
    adm.closed("a", validated=False)
    assert _admit_new(adm, "b", 4.9) is Verdict.RETRY
    assert not adm.retry_active(5.0)
    assert _admit_new(adm, "b", 5.0) is Verdict.ADMIT
    assert adm.stats == {"admit": 3, "retry": 3, "drop": 0}


def test_auto_retries_when_unvalidated_total_reaches_the_threshold() -> None:
    adm = _admission()
    for i in range(6):
        assert _admit_new(adm, f"s{i}", 0.0) is Verdict.ADMIT
    assert _admit_new(adm, "s7", 0.0) is Verdict.RETRY


def test_auto_retries_a_source_over_its_rate() -> None:
    adm = _admission(rate=1.0, burst=1.0)
    assert _admit_new(adm, "a", 0.0) is Verdict.ADMIT
    adm.closed("a", validated=False)
    assert _admit_new(adm, "a", 0.1) is Verdict.RETRY


def test_total_rate_bounds_many_sources_with_full_buckets() -> None:
    adm = _admission(total_rate=1.0, total_burst=3.0, mode=RetryMode.NEVER)
    verdicts = []
    for i in range(5):
        verdicts.append(adm.check_new(f"s{i}", 0.0))
    assert verdicts == [Verdict.ADMIT] * 3 + [Verdict.DROP] * 2


def test_validated_clients_get_in_under_pressure_up_to_the_hard_caps() -> None:
    adm = _admission()
    for _ in range(2):
        _admit_new(adm, "flood", 0.0)
    assert _admit_new(adm, "flood", 0.0) is Verdict.RETRY
    # Same host, but the client echoed a token: only the hard caps count.
    for _ in range(2):
        assert adm.check_validated("flood") is Verdict.ADMIT
        adm.opened("flood", validated=True)
    assert adm.check_validated("flood") is Verdict.DROP  # 4 per source
    assert adm.half_open.total == 4 and adm.unvalidated.total == 2
    adm.closed("flood", validated=True)
    assert adm.half_open.total == 3 and adm.unvalidated.total == 2


def test_always_retries_every_tokenless_initial() -> None:
    adm = _admission(RetryMode.ALWAYS)
    assert all(adm.check_new("a", float(t)) is Verdict.RETRY for t in range(20))
    assert adm.half_open.total == 0


def test_never_drops_beyond_the_caps_instead_of_retrying() -> None:
    adm = _admission(RetryMode.NEVER)
    verdicts = [_admit_new(adm, "a", 0.0) for _ in range(6)]
    # The per-source hard cap is 4; the Retry thresholds do not apply.
    assert verdicts == [Verdict.ADMIT] * 4 + [Verdict.DROP] * 2
    assert not adm.retry_active(0.0)


def test_version_negotiation_replies_spend_the_sources_tokens() -> None:
    adm = _admission(rate=1.0, burst=2.0)
    assert [adm.allow_reply("a", 0.0) for _ in range(3)] == [True, True, False]
    assert adm.allow_reply("b", 0.0)
