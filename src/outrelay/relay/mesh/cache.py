"""The registry's key layout and the relay's watched cache of it (sans-IO; issue 18).

Layout in etcd (prefix ``P``, default ``/outrelay/v1/``; values are compact UTF-8 JSON):

* ``P relays/<relay_id>`` -> ``{"relay_id","region","endpoint"}``, under the relay's lease;
* ``P services/<tenant>/<service_name>/<relay_id>/<agent_uri>`` ->
  ``{"tenant","service_name","agent_uri","relay_id","region","local_addr","registered_ms"}``,
  under the owning relay's lease (the reference controller's binding, spec 02 §4, §10.3);
* ``P policy/<tenant>/<rule_id>`` -> one rule, the JSON of a policy file rule
  (:mod:`outrelay.relay.policy.file`), no lease;
* ``P halves/<stream_id>/<relay_id>`` -> ``{"stream_id","relay_id","agent_uri","expected_peer"}``,
  under the lease: a resume half (spec 02 §7.4) parked on that relay.

Key components other than the agent URI have ``%`` and ``/`` escaped (``%25``, ``%2F``), so
any name fits; a key is split into a fixed number of leading components and the agent URI is
the rest (URIs contain ``/``). The value is authoritative and must agree with its key.

:class:`MeshCache` is a relay's copy of everything under the prefix. The shell
(:mod:`.etcd`) feeds it the initial range (:meth:`MeshCache.load_snapshot`, which replaces
everything: also the re-sync after a lost watch or a compaction) and the watch events from
the snapshot's revision + 1 (:meth:`MeshCache.apply`); both return what changed that the
relay acts on (half records put, policy changed). Events at or below the applied revision
are ignored (a re-delivered event never undoes a newer state).

Hostile values are never a crash: a key of the wrong shape, a value that is not JSON, an
object with missing, extra or mistyped fields, a record disagreeing with its key, an invalid
policy rule: each is logged once per put as a warning and ignored (a put of garbage over a
valid entry removes the entry: the key no longer holds a valid record).

:class:`Publisher` is this relay's authoritative set of its own leased keys and the bounded
queue of writes still to send (coalesced per key: only the latest intent per key is sent).

Sans-IO: no I/O, no clock, no tasks.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from outrelay.relay.mesh.records import HalfRecord, ProviderRecord, RelayRecord, best_first
from outrelay.relay.policy import (
    PolicyDocument,
    PolicyFileError,
    ProvideRule,
    Rule,
    parse_policy_document,
    provider_pattern_tenant,
)

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_PENDING_WRITES",
    "MAX_VALUE_BYTES",
    "Changes",
    "DuplicateRelayId",
    "EventKind",
    "KeyLayout",
    "MeshCache",
    "Publisher",
    "RegistryError",
    "RegistryOptions",
    "RegistryUnavailable",
    "WatchEvent",
    "decode_component",
    "encode_component",
    "half_value",
    "parse_registry_url",
    "parse_rule",
    "provider_value",
    "relay_value",
]

log = logging.getLogger("outrelay.relay.mesh")

DEFAULT_PREFIX: Final = "/outrelay/v1/"
MAX_VALUE_BYTES: Final = 64 * 1024
"""Values larger than this are ignored: our records are < 1 KiB; a policy rule a few hundred
bytes. Bounds the memory one hostile key can take in every relay's cache."""
MAX_PENDING_WRITES: Final = 65_536
"""Distinct keys with an unsent write. Writes coalesce per key, so this bounds the relay's own
leased keys awaiting etcd (256 registrations x 256 agents); beyond it the queue is dropped and
the shell starts a new lease and re-publishes everything (:attr:`Publisher.overflowed`)."""
MAX_STREAM_ID: Final = (1 << 64) - 1

_ESCAPED: Final = re.compile(r"%(25|2F)", re.IGNORECASE)


def encode_component(value: str) -> str:
    """Escape ``%`` and ``/`` so that ``value`` is one key component."""
    return value.replace("%", "%25").replace("/", "%2F")


def decode_component(value: str) -> str:
    """The inverse of :func:`encode_component`."""
    return _ESCAPED.sub(lambda m: "%" if m.group(1) == "25" else "/", value)


def _compact(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def relay_value(record: RelayRecord) -> bytes:
    return _compact(
        {"relay_id": record.relay_id, "region": record.region, "endpoint": record.endpoint}
    )


def provider_value(record: ProviderRecord) -> bytes:
    return _compact(
        {
            "tenant": record.tenant,
            "service_name": record.service_name,
            "agent_uri": record.agent_uri,
            "relay_id": record.relay_id,
            "region": record.region,
            "local_addr": record.local_addr,
            "registered_ms": record.registered_ms,
        }
    )


def half_value(stream_id: int, relay_id: str, agent_uri: str, expected_peer: str) -> bytes:
    return _compact(
        {
            "stream_id": stream_id,
            "relay_id": relay_id,
            "agent_uri": agent_uri,
            "expected_peer": expected_peer,
        }
    )


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Builds the keys under ``prefix`` (module docstring)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ValueError(f"registry prefix must start and end with '/': {self.prefix!r}")

    def relay(self, relay_id: str) -> str:
        return f"{self.prefix}relays/{encode_component(relay_id)}"

    def service(self, tenant: str, service_name: str, relay_id: str, agent_uri: str) -> str:
        parts = (encode_component(p) for p in (tenant, service_name, relay_id))
        return f"{self.prefix}services/{'/'.join(parts)}/{agent_uri}"

    def half(self, stream_id: int, relay_id: str) -> str:
        return f"{self.prefix}halves/{stream_id}/{encode_component(relay_id)}"

    def policy(self, tenant: str, rule_id: str) -> str:
        return f"{self.prefix}policy/{encode_component(tenant)}/{encode_component(rule_id)}"

    def policy_tenant(self, tenant: str) -> str:
        """The prefix of one tenant's rules."""
        return f"{self.prefix}policy/{encode_component(tenant)}/"

    @property
    def policy_all(self) -> str:
        return f"{self.prefix}policy/"


class EventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One key-value change (or one key of a range snapshot, as a PUT)."""

    kind: EventKind
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int = 0


@dataclass(slots=True)
class Changes:
    """What an update changed that the relay acts on."""

    halves_put: list[HalfRecord] = field(default_factory=list)
    """Half records put (new, or with a new revision), in revision order."""
    policy_changed: bool = False


@dataclass(frozen=True, slots=True)
class _PolicyEntry:
    tenant: str
    rule: Rule | ProvideRule
    create_revision: int


_Record = RelayRecord | ProviderRecord | HalfRecord | _PolicyEntry


class _Invalid(ValueError):
    """A key or value is not a valid record (logged and ignored)."""


def _obj(value: bytes, keys: frozenset[str]) -> dict[str, Any]:
    if len(value) > MAX_VALUE_BYTES:
        raise _Invalid(f"value of {len(value)} bytes exceeds {MAX_VALUE_BYTES}")
    try:
        obj = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Invalid(f"value is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _Invalid("value is not a JSON object")
    if set(obj) != keys:
        raise _Invalid(f"value fields {sorted(obj)} != {sorted(keys)}")
    return obj


def _str(obj: Mapping[str, Any], name: str, *, empty: bool = False) -> str:
    value = obj[name]
    if not isinstance(value, str) or (not empty and not value):
        raise _Invalid(f"field {name!r} must be a {'' if empty else 'non-empty '}string")
    return value


def _int(obj: Mapping[str, Any], name: str, maximum: int) -> int:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise _Invalid(f"field {name!r} must be an integer in [0, {maximum}]")
    return value


_RELAY_KEYS: Final = frozenset({"relay_id", "region", "endpoint"})
_PROVIDER_KEYS: Final = frozenset(
    {"tenant", "service_name", "agent_uri", "relay_id", "region", "local_addr", "registered_ms"}
)
_HALF_KEYS: Final = frozenset({"stream_id", "relay_id", "agent_uri", "expected_peer"})


class MeshCache:
    """A relay's cache of the registry (module docstring). ``relay_id``: this relay (its own
    bindings are not "remote")."""

    def __init__(self, layout: KeyLayout, relay_id: str, region: str) -> None:
        self.layout = layout
        self.relay_id = relay_id
        self.region = region
        self.revision = 0
        """The highest revision applied (the snapshot's, then each event's)."""
        self.synced = False
        """A snapshot was loaded."""
        self._snapshot_revision = 0
        self.ignored = 0
        """Puts ignored because the key or value was invalid."""
        self._entries: dict[str, _Record] = {}
        self._relays: dict[str, RelayRecord] = {}
        self._providers: dict[tuple[str, str], dict[str, ProviderRecord]] = {}
        self._halves: dict[int, dict[str, HalfRecord]] = {}
        self._policy: dict[str, dict[str, _PolicyEntry]] = {}

    # -- feeding -------------------------------------------------------------------------

    def load_snapshot(self, kvs: Iterable[WatchEvent], revision: int) -> Changes:
        """Replace everything with a range read at ``revision`` (start and every re-sync).

        Returns the half records that are new or changed against the previous contents and
        whether the policy changed, so the relay misses nothing that happened while away.
        """
        old_halves = {(h.stream_id, h.relay_id): h.revision for h in self._all_halves()}
        old_policy = self._policy_signature()
        self._entries.clear()
        self._relays.clear()
        self._providers.clear()
        self._halves.clear()
        self._policy.clear()
        for item in kvs:
            self._put(item.key, item.value, item.mod_revision, item.create_revision)
        self.revision = revision
        self._snapshot_revision = revision
        self.synced = True
        changes = Changes(policy_changed=self._policy_signature() != old_policy)
        changes.halves_put = sorted(
            (
                h
                for h in self._all_halves()
                if old_halves.get((h.stream_id, h.relay_id)) != h.revision
            ),
            key=lambda h: h.revision,
        )
        return changes

    def apply(self, events: Iterable[WatchEvent]) -> Changes:
        """Apply watch events (in revision order). An event at or below the snapshot's
        revision, or older than one already applied, is skipped (re-delivery after a
        re-sync never undoes a newer state); events of one revision (a transaction) all
        apply."""
        changes = Changes()
        for event in events:
            if event.mod_revision <= self._snapshot_revision or event.mod_revision < self.revision:
                continue
            self.revision = event.mod_revision
            if event.kind is EventKind.DELETE:
                removed = self._remove(event.key.decode("utf-8", "replace"))
                if isinstance(removed, _PolicyEntry):
                    changes.policy_changed = True
                continue
            record = self._put(event.key, event.value, event.mod_revision, event.create_revision)
            if isinstance(record, HalfRecord):
                changes.halves_put.append(record)
            elif isinstance(record, _PolicyEntry) or record is _POLICY_REMOVED:
                changes.policy_changed = True
        return changes

    def _put(self, raw_key: bytes, value: bytes, mod_revision: int, create_revision: int) -> Any:
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            self.ignored += 1
            log.warning("registry: ignored a key that is not UTF-8", extra={"key": repr(raw_key)})
            return None
        try:
            record = self._parse(key, value, mod_revision, create_revision)
        except _Invalid as exc:
            self.ignored += 1
            log.warning("registry: ignored an invalid entry", extra={"key": key, "err": str(exc)})
            removed = self._remove(key)
            return _POLICY_REMOVED if isinstance(removed, _PolicyEntry) else None
        self._remove(key)
        self._entries[key] = record
        if isinstance(record, RelayRecord):
            self._relays[record.relay_id] = record
        elif isinstance(record, ProviderRecord):
            self._providers.setdefault((record.tenant, record.service_name), {})[key] = record
        elif isinstance(record, HalfRecord):
            self._halves.setdefault(record.stream_id, {})[record.relay_id] = record
        else:
            self._policy.setdefault(record.tenant, {})[record.rule.id] = record
        return record

    def _remove(self, key: str) -> _Record | None:
        record = self._entries.pop(key, None)
        if isinstance(record, RelayRecord):
            self._relays.pop(record.relay_id, None)
        elif isinstance(record, ProviderRecord):
            group = self._providers.get((record.tenant, record.service_name))
            if group is not None:
                group.pop(key, None)
                if not group:
                    del self._providers[(record.tenant, record.service_name)]
        elif isinstance(record, HalfRecord):
            halves = self._halves.get(record.stream_id)
            if halves is not None:
                halves.pop(record.relay_id, None)
                if not halves:
                    del self._halves[record.stream_id]
        elif isinstance(record, _PolicyEntry):
            rules = self._policy.get(record.tenant)
            if rules is not None:
                rules.pop(record.rule.id, None)
                if not rules:
                    del self._policy[record.tenant]
        return record

    def _parse(self, key: str, value: bytes, mod_revision: int, create_revision: int) -> _Record:
        prefix = self.layout.prefix
        if not key.startswith(prefix):
            raise _Invalid("key outside the prefix")
        kind, _, rest = key[len(prefix) :].partition("/")
        if kind == "relays":
            return self._parse_relay(key, value)
        if kind == "services":
            return self._parse_provider(key, rest, value)
        if kind == "halves":
            return self._parse_half(key, value, mod_revision)
        if kind == "policy":
            return self._parse_policy(rest, value, create_revision or mod_revision)
        raise _Invalid(f"unknown key kind {kind!r}")

    def _parse_relay(self, key: str, value: bytes) -> RelayRecord:
        obj = _obj(value, _RELAY_KEYS)
        record = RelayRecord(_str(obj, "relay_id"), _str(obj, "region"), _str(obj, "endpoint"))
        if self.layout.relay(record.relay_id) != key:
            raise _Invalid("relay record disagrees with its key")
        return record

    def _parse_provider(self, key: str, rest: str, value: bytes) -> ProviderRecord:
        if rest.count("/") < 3:
            raise _Invalid("service key needs <tenant>/<service>/<relay_id>/<agent_uri>")
        obj = _obj(value, _PROVIDER_KEYS)
        record = ProviderRecord(
            tenant=_str(obj, "tenant"),
            service_name=_str(obj, "service_name"),
            agent_uri=_str(obj, "agent_uri"),
            relay_id=_str(obj, "relay_id"),
            region=_str(obj, "region"),
            local_addr=_str(obj, "local_addr", empty=True),
            registered_ms=_int(obj, "registered_ms", (1 << 63) - 1),
        )
        expected = self.layout.service(
            record.tenant, record.service_name, record.relay_id, record.agent_uri
        )
        if expected != key:
            raise _Invalid("service binding disagrees with its key")
        return record

    def _parse_half(self, key: str, value: bytes, mod_revision: int) -> HalfRecord:
        obj = _obj(value, _HALF_KEYS)
        record = HalfRecord(
            stream_id=_int(obj, "stream_id", MAX_STREAM_ID),
            relay_id=_str(obj, "relay_id"),
            agent_uri=_str(obj, "agent_uri"),
            expected_peer=_str(obj, "expected_peer", empty=True),
            revision=mod_revision,
        )
        if self.layout.half(record.stream_id, record.relay_id) != key:
            raise _Invalid("half record disagrees with its key")
        return record

    def _parse_policy(self, rest: str, value: bytes, create_revision: int) -> _PolicyEntry:
        parts = rest.split("/")
        if len(parts) != 2 or not all(parts):
            raise _Invalid("policy key needs <tenant>/<rule_id>")
        tenant, rule_id = (decode_component(p) for p in parts)
        if len(value) > MAX_VALUE_BYTES:
            raise _Invalid(f"value of {len(value)} bytes exceeds {MAX_VALUE_BYTES}")
        try:
            obj = json.loads(value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Invalid(f"value is not UTF-8 JSON: {exc}") from None
        rule = parse_rule(obj, tenant)
        if rule.id != rule_id:
            raise _Invalid(f"rule id {rule.id!r} disagrees with its key ({rule_id!r})")
        return _PolicyEntry(tenant, rule, create_revision)

    # -- reads ---------------------------------------------------------------------------

    def relay(self, relay_id: str) -> RelayRecord | None:
        return self._relays.get(relay_id)

    def relays(self) -> list[RelayRecord]:
        return sorted(self._relays.values(), key=lambda r: r.relay_id)

    def remote_providers(self, tenant: str, service_name: str) -> list[ProviderRecord]:
        """Providers on other live relays (a relay record present), best first."""
        group = self._providers.get((tenant, service_name))
        if not group:
            return []
        found = [
            r for r in group.values() if r.relay_id != self.relay_id and r.relay_id in self._relays
        ]
        return best_first(found, self.region)

    def providers(self) -> list[ProviderRecord]:
        """Every binding in the cache (own included), for tests and diagnostics."""
        return [r for group in self._providers.values() for r in group.values()]

    def halves(self, stream_id: int) -> list[HalfRecord]:
        return sorted(self._halves.get(stream_id, {}).values(), key=lambda h: h.revision)

    def _all_halves(self) -> list[HalfRecord]:
        return [h for group in self._halves.values() for h in group.values()]

    def policy_documents(self) -> dict[str, PolicyDocument]:
        """Each tenant's rules, in the order they were created (a new rule goes last, a
        replaced one keeps its slot, as :class:`~outrelay.relay.policy.PolicyEngine`)."""
        out: dict[str, PolicyDocument] = {}
        for tenant, entries in self._policy.items():
            ordered = sorted(entries.values(), key=lambda e: (e.create_revision, e.rule.id))
            out[tenant] = PolicyDocument(
                tuple(e.rule for e in ordered if isinstance(e.rule, Rule)),
                tuple(e.rule for e in ordered if isinstance(e.rule, ProvideRule)),
            )
        return out

    def _policy_signature(self) -> dict[str, dict[str, tuple[int, Rule | ProvideRule]]]:
        return {
            t: {rid: (e.create_revision, e.rule) for rid, e in rules.items()}
            for t, rules in self._policy.items()
        }


_POLICY_REMOVED: Final = object()
"""Returned by ``_put`` when an invalid put replaced a valid policy rule."""


def parse_rule(obj: object, tenant: str) -> Rule | ProvideRule:
    """One policy rule object of ``tenant`` (the policy file's format), validated.

    A provide rule must name ``tenant`` in its provider pattern (it speaks for one tenant).

    Raises:
        ValueError: The rule is invalid; the message says why.
    """
    try:
        document = parse_policy_document({"rules": [obj]})
    except PolicyFileError as exc:
        raise _Invalid(f"invalid rule: {exc}") from None
    rule: Rule | ProvideRule = (document.rules or document.provide)[0]
    if isinstance(rule, ProvideRule) and provider_pattern_tenant(rule.provider_pattern) != tenant:
        raise _Invalid(f"provide rule {rule.id!r} names another tenant than {tenant!r}")
    return rule


class Publisher:
    """This relay's own leased keys and the writes still to send (module docstring)."""

    def __init__(self, max_pending: int = MAX_PENDING_WRITES) -> None:
        self.desired: dict[str, bytes] = {}
        """Every leased key this relay means to hold, with its value."""
        self._pending: OrderedDict[str, bytes | None] = OrderedDict()
        self._max_pending = max_pending
        self.overflowed = False
        """The queue overflowed and was dropped: the shell must take a new lease and
        :meth:`republish_all` (the old lease's keys vanish with it)."""

    def put(self, key: str, value: bytes) -> None:
        self.desired[key] = value
        self._queue(key, value)

    def delete(self, key: str) -> None:
        if self.desired.pop(key, None) is None and key not in self._pending:
            return
        self._queue(key, None)

    def _queue(self, key: str, value: bytes | None) -> None:
        self._pending[key] = value
        self._pending.move_to_end(key)
        if len(self._pending) > self._max_pending:
            self._pending.clear()
            self.overflowed = True

    def next_write(self) -> tuple[str, bytes | None] | None:
        """The oldest unsent write ``(key, value)`` (None value: delete), or None."""
        if not self._pending:
            return None
        key = next(iter(self._pending))
        return key, self._pending[key]

    def written(self, key: str, value: bytes | None) -> None:
        """The write was acknowledged; forget it unless a newer one for the key came since."""
        if key in self._pending and self._pending[key] is value:
            del self._pending[key]

    def republish_all(self) -> None:
        """After a new lease: every desired key is written again; deletes are moot."""
        self._pending = OrderedDict(self.desired)
        self.overflowed = False

    @property
    def pending(self) -> int:
        return len(self._pending)


def parse_registry_url(url: str) -> list[tuple[str, int]]:
    """The etcd client endpoints of ``etcd://host:port[,host:port...]`` (``[v6]:port`` too).

    Raises:
        ValueError: Not an ``etcd://`` URL with at least one valid ``host:port``.
    """
    scheme = "etcd://"
    if not url.startswith(scheme):
        raise ValueError(f"registry must be etcd://host:port[,host:port...], got {url!r}")
    endpoints: list[tuple[str, int]] = []
    for item in url[len(scheme) :].split(","):
        host, sep, port_text = item.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or "/" in host or not port_text.isdigit():
            raise ValueError(f"bad etcd endpoint {item!r} in {url!r} (expected host:port)")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError(f"bad etcd port {port} in {url!r}")
        endpoints.append((host, port))
    return endpoints


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    """``--registry etcd://...`` and its companions (relay CLI)."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX
    lease_ttl: int = 5
    """``--registry-lease`` seconds."""
    advertise: str = ""
    """``--advertise``; "" = the bound listen address."""
    start_timeout: float = 15.0
    """Bound on joining the mesh at start (the relay exits 1 after it)."""


class RegistryError(Exception):
    """The relay cannot join the mesh (it exits 1 with this message)."""


class DuplicateRelayId(RegistryError):
    """Another live relay holds this ``--relay-id``."""


class RegistryUnavailable(RegistryError):
    """No etcd endpoint answered in time."""
