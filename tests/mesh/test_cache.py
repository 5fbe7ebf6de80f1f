"""The registry's key layout and cache (mesh/cache.py): sans-IO, hostile values ignored."""

from __future__ import annotations

import json
import logging

import pytest

from outrelay.relay.mesh import HalfRecord, ProviderRecord, RelayRecord
from outrelay.relay.mesh.cache import (
    MAX_VALUE_BYTES,
    EventKind,
    KeyLayout,
    MeshCache,
    Publisher,
    WatchEvent,
    decode_component,
    encode_component,
    half_value,
    parse_rule,
    provider_value,
    relay_value,
)
from outrelay.relay.policy import Decision, ProvideRule, Rule

L = KeyLayout()


def put(key: str, value: bytes | str, rev: int, create: int = 0) -> WatchEvent:
    raw = value.encode() if isinstance(value, str) else value
    return WatchEvent(EventKind.PUT, key.encode(), raw, rev, create or rev)


def delete(key: str, rev: int) -> WatchEvent:
    return WatchEvent(EventKind.DELETE, key.encode(), b"", rev)


def relay_put(relay_id: str, region: str, rev: int) -> WatchEvent:
    record = RelayRecord(relay_id, region, f"127.0.0.1:{rev}")
    return put(L.relay(relay_id), relay_value(record), rev)


def binding(
    relay_id: str, region: str, agent: str, ms: int, *, service: str = "echo"
) -> ProviderRecord:
    return ProviderRecord("acme", service, agent, relay_id, region, "127.0.0.1:9", ms)


def binding_put(record: ProviderRecord, rev: int) -> WatchEvent:
    key = L.service(record.tenant, record.service_name, record.relay_id, record.agent_uri)
    return put(key, provider_value(record), rev)


def cache(relay_id: str = "r1", region: str = "eu") -> MeshCache:
    c = MeshCache(L, relay_id, region)
    c.load_snapshot([], 1)
    return c


@pytest.mark.parametrize("value", ["", "a", "a/b", "%", "%2F", "a%25/b%2f", "/" * 3, "ü/€"])
def test_component_round_trip(value: str) -> None:
    encoded = encode_component(value)
    assert "/" not in encoded
    assert decode_component(encoded) == value


def test_layout() -> None:
    assert L.relay("r1") == "/outrelay/v1/relays/r1"
    assert (
        L.service("acme", "web/api", "r1", "outrelay://acme/agent/x")
        == "/outrelay/v1/services/acme/web%2Fapi/r1/outrelay://acme/agent/x"
    )
    assert L.half(7, "r/2") == "/outrelay/v1/halves/7/r%2F2"
    assert L.policy("acme", "allow-web") == "/outrelay/v1/policy/acme/allow-web"
    with pytest.raises(ValueError):
        KeyLayout("no-slash")


def test_relays_and_providers_resolution_order() -> None:
    c = cache()
    c.apply([relay_put("r1", "eu", 2), relay_put("r2", "eu", 3), relay_put("r3", "us", 4)])
    own = binding("r1", "eu", "outrelay://acme/agent/own", 9_000)
    eu_old = binding("r2", "eu", "outrelay://acme/agent/a", 1_000)
    eu_new = binding("r2", "eu", "outrelay://acme/agent/b", 2_000)
    us_newest = binding("r3", "us", "outrelay://acme/agent/c", 3_000)
    c.apply([binding_put(b, 5 + i) for i, b in enumerate([own, eu_old, us_newest, eu_new])])
    assert c.remote_providers("acme", "echo") == [eu_new, eu_old, us_newest]
    assert c.relay("r3") == RelayRecord("r3", "us", "127.0.0.1:4")
    # From a "us" relay, us first.
    c2 = MeshCache(L, "r9", "us")
    c2.load_snapshot(
        [relay_put("r2", "eu", 3), relay_put("r3", "us", 4)]
        + [binding_put(b, 5 + i) for i, b in enumerate([eu_old, us_newest, eu_new])],
        10,
    )
    assert c2.remote_providers("acme", "echo") == [us_newest, eu_new, eu_old]


def test_provider_of_a_relay_without_record_is_not_served() -> None:
    c = cache()
    b = binding("r2", "eu", "outrelay://acme/agent/a", 1)
    c.apply([binding_put(b, 2)])
    assert c.remote_providers("acme", "echo") == []  # relay r2 not (yet) live
    c.apply([relay_put("r2", "eu", 3)])
    assert c.remote_providers("acme", "echo") == [b]
    c.apply([delete(L.relay("r2"), 4)])  # lease expired: the relay first, say
    assert c.remote_providers("acme", "echo") == []


def test_delete_and_upsert() -> None:
    c = cache()
    c.apply([relay_put("r2", "eu", 2)])
    b = binding("r2", "eu", "outrelay://acme/agent/a", 1)
    c.apply([binding_put(b, 3)])
    newer = binding("r2", "eu", "outrelay://acme/agent/a", 50)
    c.apply([binding_put(newer, 4)])
    assert c.remote_providers("acme", "echo") == [newer]
    key = L.service("acme", "echo", "r2", "outrelay://acme/agent/a")
    c.apply([delete(key, 5)])
    assert c.remote_providers("acme", "echo") == []
    c.apply([delete(key, 6), delete("/outrelay/v1/relays/unknown", 7)])  # absent: no-op


def test_stale_events_are_skipped() -> None:
    c = MeshCache(L, "r1", "eu")
    c.load_snapshot([relay_put("r2", "eu", 5)], 10)
    c.apply([delete(L.relay("r2"), 9)])  # at/below the snapshot: already in it
    assert c.relay("r2") is not None
    c.apply([relay_put("r3", "eu", 12), relay_put("r4", "eu", 12)])  # one txn, same rev
    assert c.relay("r3") is not None and c.relay("r4") is not None
    c.apply([delete(L.relay("r3"), 11)])  # older than applied
    assert c.relay("r3") is not None
    assert c.revision == 12


def test_snapshot_replaces_and_reports_new_halves() -> None:
    c = MeshCache(L, "r1", "eu")
    h1 = put(L.half(7, "r2"), half_value(7, "r2", "outrelay://acme/agent/a", "x"), 3)
    first = c.load_snapshot([relay_put("r2", "eu", 2), h1], 5)
    assert [h.stream_id for h in first.halves_put] == [7]
    again = c.load_snapshot([relay_put("r2", "eu", 2), h1], 8)
    assert again.halves_put == []  # unchanged: not reported twice
    h2 = put(L.half(8, "r3"), half_value(8, "r3", "outrelay://acme/agent/b", ""), 9)
    third = c.load_snapshot([h2], 9)
    assert [h.stream_id for h in third.halves_put] == [8]
    assert c.relay("r2") is None and c.halves(7) == []


def test_halves_records_and_revision() -> None:
    c = cache()
    changes = c.apply(
        [
            put(L.half(7, "r2"), half_value(7, "r2", "outrelay://acme/agent/a", "p"), 3),
            put(L.half(7, "r1"), half_value(7, "r1", "outrelay://acme/agent/p", "a"), 4),
        ]
    )
    assert [(h.relay_id, h.revision) for h in changes.halves_put] == [("r2", 3), ("r1", 4)]
    assert c.halves(7) == [
        HalfRecord(7, "r2", "outrelay://acme/agent/a", "p", 3),
        HalfRecord(7, "r1", "outrelay://acme/agent/p", "a", 4),
    ]
    c.apply([delete(L.half(7, "r2"), 5)])
    assert [h.relay_id for h in c.halves(7)] == ["r1"]


RULE = {"id": "allow-web", "caller": "outrelay://acme/*", "target": "web", "decision": "allow"}
PROVIDE = {"id": "p", "provider": "outrelay://acme/agent/*", "service": "web", "decision": "deny"}


def test_policy_documents_in_creation_order() -> None:
    c = cache()
    other = dict(RULE, id="b-second")
    changes = c.apply(
        [
            put(L.policy("acme", "b-second"), json.dumps(other), 3),
            put(L.policy("acme", "allow-web"), json.dumps(RULE), 4),
            put(L.policy("acme", "p"), json.dumps(PROVIDE), 5),
            put(L.policy("beta", "x"), json.dumps(dict(RULE, id="x")), 6),
        ]
    )
    assert changes.policy_changed
    docs = c.policy_documents()
    assert [r.id for r in docs["acme"].rules] == ["b-second", "allow-web"]
    assert [r.id for r in docs["acme"].provide] == ["p"]
    assert [r.id for r in docs["beta"].rules] == ["x"]
    # Replacing a rule keeps its creation slot.
    denied = dict(other, decision="deny")
    c.apply([put(L.policy("acme", "b-second"), json.dumps(denied), 7, create=3)])
    rules = c.policy_documents()["acme"].rules
    assert [r.id for r in rules] == ["b-second", "allow-web"]
    assert rules[0].decision is Decision.DENY
    assert c.apply([delete(L.policy("beta", "x"), 8)]).policy_changed
    assert "beta" not in c.policy_documents()
    assert not c.apply([relay_put("r5", "eu", 9)]).policy_changed


def test_parse_rule() -> None:
    assert isinstance(parse_rule(RULE, "acme"), Rule)
    assert isinstance(parse_rule(PROVIDE, "acme"), ProvideRule)
    with pytest.raises(ValueError, match="another tenant"):
        parse_rule(PROVIDE, "beta")
    with pytest.raises(ValueError, match="decision"):
        parse_rule(dict(RULE, decision="maybe"), "acme")
    with pytest.raises(ValueError):
        parse_rule([], "acme")


HOSTILE = [
    ("/outrelay/v1/relays/r2", b"not json"),
    ("/outrelay/v1/relays/r2", b"\xff\xfe"),
    ("/outrelay/v1/relays/r2", b"[1,2]"),
    ("/outrelay/v1/relays/r2", b"null"),
    ("/outrelay/v1/relays/r2", b'{"relay_id":"r2","region":"eu"}'),
    ("/outrelay/v1/relays/r2", b'{"relay_id":"r2","region":"eu","endpoint":"x","more":1}'),
    ("/outrelay/v1/relays/r2", b'{"relay_id":"OTHER","region":"eu","endpoint":"x"}'),
    ("/outrelay/v1/relays/r2", b'{"relay_id":"r2","region":5,"endpoint":"x"}'),
    ("/outrelay/v1/relays/r2", b'{"relay_id":"","region":"eu","endpoint":"x"}'),
    ("/outrelay/v1/relays/r2", b"NaN"),
    ("/outrelay/v1/relays/r2", b"1" * (MAX_VALUE_BYTES + 1)),
    ("/outrelay/v1/services/acme/echo", b"{}"),
    ("/outrelay/v1/services/acme/echo/r2/outrelay://acme/agent/a", b"{}"),
    (
        "/outrelay/v1/services/acme/echo/r2/outrelay://acme/agent/a",
        provider_value(binding("r2", "eu", "outrelay://acme/agent/OTHER", 1)),
    ),
    (
        "/outrelay/v1/services/acme/echo/r2/outrelay://acme/agent/a",
        provider_value(binding("r2", "eu", "outrelay://acme/agent/a", 1)).replace(
            b'"registered_ms":1', b'"registered_ms":true'
        ),
    ),
    (
        "/outrelay/v1/services/acme/echo/r2/outrelay://acme/agent/a",
        provider_value(binding("r2", "eu", "outrelay://acme/agent/a", 1)).replace(
            b'"registered_ms":1', b'"registered_ms":-1'
        ),
    ),
    (
        "/outrelay/v1/halves/7/r2",
        b'{"stream_id":"7","relay_id":"r2","agent_uri":"a","expected_peer":""}',
    ),
    ("/outrelay/v1/halves/7/r2", half_value(8, "r2", "a", "")),
    ("/outrelay/v1/halves/x/r2", half_value(7, "r2", "a", "")),
    ("/outrelay/v1/halves/7/r2", half_value(1 << 64, "r2", "a", "")),
    ("/outrelay/v1/policy/acme", json.dumps(RULE).encode()),
    ("/outrelay/v1/policy/acme/allow-web/extra", json.dumps(RULE).encode()),
    ("/outrelay/v1/policy/acme/other-id", json.dumps(RULE).encode()),
    ("/outrelay/v1/policy/acme/allow-web", json.dumps(dict(RULE, decision="maybe")).encode()),
    ("/outrelay/v1/policy/beta/p", json.dumps(PROVIDE).encode()),
    ("/outrelay/v1/policy/acme/allow-web", b"{"),
    ("/outrelay/v1/unknown/x", b"{}"),
    ("/outrelay/v1/", b"{}"),
    ("/elsewhere/x", b"{}"),
]


@pytest.mark.parametrize(("key", "value"), HOSTILE)
def test_hostile_values_are_ignored_with_a_warning(
    key: str, value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    c = cache()
    with caplog.at_level(logging.WARNING, logger="outrelay.relay.mesh"):
        changes = c.apply([put(key, value, 2)])
        c.load_snapshot([put(key, value, 2)], 3)
    assert "ignored an invalid entry" in caplog.text
    assert c.ignored == 2
    assert changes.halves_put == []
    assert c.relays() == [] and c.providers() == [] and c.halves(7) == []
    assert c.policy_documents() == {}


def test_non_utf8_key_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    c = cache()
    with caplog.at_level(logging.WARNING, logger="outrelay.relay.mesh"):
        c.apply([WatchEvent(EventKind.PUT, b"/outrelay/v1/relays/\xff", b"{}", 2)])
        c.apply([WatchEvent(EventKind.DELETE, b"/outrelay/v1/relays/\xff", b"", 3)])
    assert "not UTF-8" in caplog.text
    assert c.ignored == 1


def test_garbage_over_a_valid_entry_removes_it() -> None:
    c = cache()
    c.apply([relay_put("r2", "eu", 2), put(L.policy("acme", "allow-web"), json.dumps(RULE), 3)])
    assert c.relay("r2") is not None
    c.apply([put(L.relay("r2"), b"garbage", 4)])
    assert c.relay("r2") is None
    changes = c.apply([put(L.policy("acme", "allow-web"), b"garbage", 5)])
    assert changes.policy_changed
    assert c.policy_documents() == {}


def test_publisher_coalesces_and_republishes() -> None:
    p = Publisher(max_pending=3)
    p.put("a", b"1")
    p.put("b", b"1")
    p.put("a", b"2")  # coalesced, moves to the end
    assert p.next_write() == ("b", b"1")
    write = p.next_write()
    assert write is not None
    p.written(*write)
    assert p.next_write() == ("a", b"2")
    p.delete("a")
    assert p.next_write() == ("a", None)
    p.written("a", b"2")  # an older write acknowledged: the delete stays
    assert p.next_write() == ("a", None)
    p.written("a", None)
    assert p.next_write() is None and p.pending == 0
    p.delete("never")  # unknown key: nothing queued
    assert p.pending == 0
    p.republish_all()
    assert p.next_write() == ("b", b"1")


def test_publisher_overflow_asks_for_a_new_lease() -> None:
    p = Publisher(max_pending=2)
    for key in "abc":
        p.put(key, b"v")
    assert p.overflowed and p.pending == 0
    p.republish_all()
    assert not p.overflowed and p.pending == 3
