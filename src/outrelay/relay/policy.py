"""The relay's policy engine, decision cache and policy file (spec 02 §6.2).

Theory of operation
-------------------
Every OPEN_STREAM is evaluated up to twice (spec 02 §6.1 steps 2 and 4):

* **caller side**: ``decide(caller=consumer URI, target=target_service, method)``;
* **callee side**: ``decide(caller=provider URI, target=consumer URI, method)``.

A :class:`Rule` is a triple of globs (caller, target, method) plus a decision, an optional
expiry and the two modes. :class:`PolicyEngine` holds the rules and answers
:meth:`PolicyEngine.decide` exactly as the reference matcher does (spec 02 §6.2.3):

1. rules whose ``target_pattern`` contains no ``*`` (*exact-target* rules) are indexed by that
   string, and those indexed under the target are scanned first, in order;
2. then the *wildcard-target* rules, in order;
3. the first rule that matches wins; if none does, the result is deny with reason
   ``"no matching rule"`` (closed world).

So an exact-target rule always beats a wildcard-target rule, however specific the latter's
caller pattern is.

**Order** [REC] (spec 02 §15 item 5). The reference rebuilds its lists by iterating a Go map, so
the order within a group is unspecified. Ours is deterministic: the order rules were given in
(policy file order), a rule added later goes to the end, and replacing a rule by id keeps its
slot. :meth:`PolicyEngine.replace_all` keeps, for a duplicated id, the **first** position and
the **last** definition (a Python dict assignment: the reference's snapshot also lets later
duplicates win, spec 02 §6.2.6).

**Decision mapping** (spec 02 §6.2.2): ``DECISION_DENY`` denies, anything else allows. Inside
this package a rule's decision is already a :class:`Decision`; the mapping is applied where
strings come in (:func:`parse_policy`).

**Cache** (spec 02 §6.2.5). :class:`DecisionCache` keeps whole results for 5 s, keyed by the
exact triple, with a soft cap of 65,536 entries. :class:`PolicyService` is what the relay calls:
cache first, then the engine; every change of the rule set flushes the cache. A rule's expiry
does not flush it, so a cached allow can outlive its rule by up to the TTL, as in the reference.

**Enablement** (spec 02 §6.2.1) is the relay's business, not this module's: the reference
evaluates policy only with ``--tenant``; the Python relay evaluates it when a policy file is
configured. An empty rule set denies everything (``"no matching rule"``).

**Provide rules** (ours; the reference has none: any agent of a tenant may take over any of
its names, spec 02 §4) say who may *register* a service. :class:`ProvideEngine` answers them
at REGISTER: a service that no provide rule of the tenant covers stays open to every agent of
the tenant; a covered one goes to the first rule, in file order, whose provider glob matches
the agent's URI, and no match denies (the relay then sends no REGISTER_ACK). They live beside
the consume rules, in the same file, and are replaced with them (:meth:`PolicyService.load`).

**Time** is an argument (STYLE §1): every method that needs "now" takes ``now_ms``, Unix time
in milliseconds (rule expiry, ``expires_unix_ms``, is wall-clock time). Nothing here reads a
clock, does I/O (except :func:`load_policy_file`) or starts a task. Mutations swap one immutable
index object, so a :meth:`PolicyEngine.decide` running in another thread sees either the old or
the new rule set, never a mix.

Policy file
-----------
The embedded control plane reads rules from a JSON file (DESIGN.md); :func:`load_policy_file`
and :func:`parse_policy` accept this shape::

    {
      "rules": [
        {"id": "allow-web", "caller": "outrelay://acme/*", "target": "web",
         "method": "", "decision": "allow", "expires_unix_ms": 0,
         "p2p_mode": "allowed", "relay_mode": "splice"},
        {"id": "callee-any", "caller": "*", "target": "outrelay://acme/*",
         "decision": "allow"},
        {"id": "temp-debug", "caller": "outrelay://acme/agent/*", "target": "debug-*",
         "method": "GET *", "decision": "allow", "expires": "2030-01-01T00:00:00Z",
         "p2p_mode": "required", "relay_mode": "forward"}
      ]
    }

Fields of a rule (every other key is an error, to catch typos):

``id`` (required)
    Non-empty string, unique in the file. It is the decision's ``reason``.
``caller``, ``target`` (required)
    Non-empty glob strings (``caller_pattern``, ``target_pattern``). Use ``"*"`` for "any".
    The callee-side check needs a rule whose target matches **consumer URIs** (spec 02 §6.2.3).
``method`` (optional, default ``""``)
    Glob on ``OPEN_STREAM.method``; ``""`` matches every method.
``decision`` (required)
    ``"allow"`` or ``"deny"`` (also ``"DECISION_ALLOW"``/``"DECISION_DENY"``, case-insensitive).
    Required, unlike the reference's proto where unset means allow: a file should say so.
``expires_unix_ms`` (optional, default 0 = never) or ``expires`` (an RFC 3339 timestamp with an
    offset, e.g. ``"2030-01-01T00:00:00Z"``, truncated to the millisecond); not both. Parsing
    uses ``datetime.fromisoformat``, which also takes other ISO 8601 forms; an offset is
    required either way, so a timestamp never depends on the relay's time zone.
``p2p_mode`` (optional, default ``"allowed"``)
    ``"allowed"``, ``"forbidden"`` or ``"required"`` (also the proto names ``P2P_ALLOWED``… and
    ``P2P_MODE_ALLOWED``…, case-insensitive).
``relay_mode`` (optional, default ``"splice"``)
    ``"splice"`` or ``"forward"`` (also ``RELAY_MODE_SPLICE``/``RELAY_MODE_FORWARD``).

A rule with a ``provider`` or ``service`` key is a **provide rule** (who may REGISTER a
service); it has exactly these keys:

``id`` (required)
    As above; ids are unique across both kinds of rules.
``provider`` (required)
    Glob on the registering agent's URI. It must start with ``outrelay://<tenant>/`` with a
    literal tenant (``outrelay://acme/agent/*``, ``outrelay://acme/*``): a provide rule speaks
    for one tenant only.
``service`` (required)
    Glob on the service name (``"web"``, ``"db-*"``, ``"*"``); the rule *covers* the names it
    matches, in its tenant.
``decision`` (required)
    As above.

For example, only two agents may provide ``web`` in tenant ``acme``, and nobody may register
``admin`` (every other ``acme`` service stays open to every ``acme`` agent)::

    {"id": "web-providers", "provider": "outrelay://acme/agent/1f0c*", "service": "web",
     "decision": "allow"},
    {"id": "web-standby", "provider": "outrelay://acme/agent/77a2*", "service": "web",
     "decision": "allow"},
    {"id": "no-admin", "provider": "outrelay://acme/*", "service": "admin", "decision": "deny"}

The top-level object has exactly one key, ``"rules"``, a list (possibly empty) in which both
kinds may be mixed.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum, IntEnum
from typing import Any, Final, TypeAlias

from outrelay.identity import is_valid_label

__all__ = [
    "CACHE_CAPACITY",
    "CACHE_EVICT_BATCH",
    "CACHE_TTL_MS",
    "NO_MATCHING_PROVIDE_RULE",
    "NO_MATCHING_RULE",
    "PROVIDE_OPEN",
    "CacheKey",
    "CacheStatistics",
    "Decision",
    "DecisionCache",
    "P2PMode",
    "PolicyDocument",
    "PolicyEngine",
    "PolicyFileError",
    "PolicyResult",
    "PolicyService",
    "PolicyStatistics",
    "ProvideEngine",
    "ProvideResult",
    "ProvideRule",
    "RelayMode",
    "Rule",
    "combine_p2p",
    "load_policy_document",
    "load_policy_file",
    "match_glob",
    "parse_policy",
    "parse_policy_document",
    "policy_to_obj",
    "provider_pattern_tenant",
]

NO_MATCHING_RULE: Final = "no matching rule"
"""The reason of the closed-world default deny (spec 02 §6.2.3 step 4). It appears on the wire in
``STREAM_REJECT{403, "denied: no matching rule"}`` (spec 02 §13)."""

CACHE_TTL_MS: Final = 5_000
"""Decision cache TTL, 5 s from insertion, not refreshed by hits (spec 02 §6.2.5, §12 "policy
CacheTTL"). Short enough that a decision racing a rule change settles quickly."""

CACHE_CAPACITY: Final = 65_536
"""Decision cache soft cap (spec 02 §6.2.5, §12 "CacheCapacity"): bounds the memory that many
distinct (caller, target, method) triples can pin."""

CACHE_EVICT_BATCH: Final = 8_192
"""Entries dropped at once when the cache is still full after dropping expired ones (spec 02
§6.2.5, §12 "eviction batch"; ``CacheCapacity / 8`` in the reference)."""


# --------------------------------------------------------------------------------------------
# Enums
# --------------------------------------------------------------------------------------------


class Decision(Enum):
    """A policy outcome. The values are the proto ``Decision`` numbers (``DECISION_ALLOW = 1``,
    ``DECISION_DENY = 2``); ``DECISION_UNSPECIFIED`` has no member because it maps to ALLOW
    (spec 02 §6.2.2)."""

    ALLOW = 1
    DENY = 2

    @property
    def label(self) -> str:
        """``"allow"`` or ``"deny"``: the reference's stringer and the policy file spelling."""
        return "allow" if self is Decision.ALLOW else "deny"

    @property
    def proto_name(self) -> str:
        """``"DECISION_ALLOW"`` or ``"DECISION_DENY"``: the audit event's ``decision`` (spec 02
        §6.2.7)."""
        return "DECISION_ALLOW" if self is Decision.ALLOW else "DECISION_DENY"

    def __str__(self) -> str:
        return self.label


class P2PMode(IntEnum):
    """Whether a stream may, must or must not be promoted to P2P (spec 02 §6.2.4).

    The values are the proto ``P2PMode`` numbers. ``str(mode)`` and :attr:`label` give the
    reference's stringer names: ``"allowed"``, ``"forbidden"``, ``"required"``.
    """

    ALLOWED = 0
    FORBIDDEN = 1
    REQUIRED = 2

    @property
    def label(self) -> str:
        """The lower-case name, as the reference's ``String()``."""
        return self.name.lower()

    def __str__(self) -> str:
        return self.label


class RelayMode(IntEnum):
    """How the relay carries an allowed stream (spec 02 §6.2.4): splice it (§6.3), or hand the
    agents forward-plane allocations (§6.4). The values are the proto ``RelayMode`` numbers;
    ``str(mode)`` gives ``"splice"`` or ``"forward"``."""

    SPLICE = 0
    FORWARD = 1

    @property
    def label(self) -> str:
        """The lower-case name, as spelled in the policy file."""
        return self.name.lower()

    def __str__(self) -> str:
        return self.label


_P2P_PRECEDENCE: Final = {P2PMode.ALLOWED: 0, P2PMode.REQUIRED: 1, P2PMode.FORBIDDEN: 2}


def combine_p2p(a: P2PMode, b: P2PMode) -> P2PMode:
    """The effective p2p mode of the caller-side and callee-side results (spec 02 §6.2.4).

    Symmetric, with precedence FORBIDDEN > REQUIRED > ALLOWED: if either side forbids promotion
    the stream stays on the relay; if either requires it, the relay arms its REQUIRED timer.
    """
    return a if _P2P_PRECEDENCE[a] >= _P2P_PRECEDENCE[b] else b


# --------------------------------------------------------------------------------------------
# Glob
# --------------------------------------------------------------------------------------------

_Matcher: TypeAlias = Callable[[str], bool]


def _always(_text: str) -> bool:
    return True


def _compile_glob(pattern: str) -> _Matcher:
    """Compile ``pattern`` into a predicate with the semantics of :func:`match_glob`.

    The pattern is split once here, so that the engine does not split it on every decision.
    """
    if "*" not in pattern:
        # Also covers the empty pattern, which matches only the empty string.
        return pattern.__eq__
    if pattern == "*":
        return _always
    pieces = pattern.split("*")
    first, middles, last = pieces[0], tuple(p for p in pieces[1:-1] if p), pieces[-1]
    min_len = len(first) + sum(map(len, middles)) + len(last)

    def match(text: str) -> bool:
        if len(text) < min_len or not text.startswith(first):
            return False
        pos = len(first)
        for piece in middles:
            idx = text.find(piece, pos)
            if idx < 0:
                return False
            pos = idx + len(piece)
        # The last piece must fit in what is left, so it cannot overlap the prefix or a middle
        # piece ("ab*ba" does not match "aba").
        return len(text) - pos >= len(last) and text.endswith(last)

    return match


def match_glob(pattern: str, text: str) -> bool:
    """Whether ``text`` matches ``pattern`` (spec 02 §6.2.3, the reference's ``matchGlob``).

    * ``*`` is the only metacharacter; it matches any run of characters, including the empty
      run and ``/``. There is no escape.
    * An empty pattern matches only the empty string.
    * A pattern without ``*`` requires exact, case-sensitive equality.
    * Otherwise the pattern is split on ``*``: ``text`` must start with the first piece, each
      middle piece is found leftmost, in order, in the rest, and the rest must end with the last
      piece (without overlapping what was already consumed).

    Taking each middle piece leftmost leaves the longest possible rest, so this agrees with a
    regular expression in which every ``*`` is ``.*`` (property-tested).

    Examples: ``a*b*c`` matches ``axxbyyc`` but not ``axxc``; ``POST *`` matches
    ``POST /anything``; ``outrelay://acme/svc-*`` does not match ``outrelay://other/svc-billing``.
    """
    return _compile_glob(pattern)(text)


# --------------------------------------------------------------------------------------------
# Rules and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One policy rule: the fields of the proto ``PolicyRule`` the relay uses (spec 02 §6.2.2).

    ``tenant`` and ``created_at_unix_ms`` are not kept: the reference ignores them.
    """

    id: str
    """Unique id; it is the decision's ``reason`` when the rule matches."""
    caller_pattern: str
    """Glob on the caller: the consumer URI (caller side) or the provider URI (callee side)."""
    target_pattern: str
    """Glob on the target: the service name (caller side) or the consumer URI (callee side).
    Without ``*`` the rule is an *exact-target* rule and is looked up by this string."""
    method_pattern: str = ""
    """Glob on ``OPEN_STREAM.method``; empty matches every method."""
    decision: Decision = Decision.ALLOW
    """ALLOW or DENY. The proto's unset value maps to ALLOW (spec 02 §6.2.2)."""
    expires_unix_ms: int = 0
    """The rule stops matching at this Unix time in ms (``now_ms >= expires_unix_ms``); 0 means
    never."""
    p2p_mode: P2PMode = P2PMode.ALLOWED
    """Carried into the result; combined with the other side's by :func:`combine_p2p`."""
    relay_mode: RelayMode = RelayMode.SPLICE
    """Carried into the result; only the caller side's is used (spec 02 §6.2.4)."""

    def is_live(self, now_ms: int) -> bool:
        """Whether the rule has not expired at ``now_ms`` (spec 02 §6.2.3)."""
        return self.expires_unix_ms == 0 or now_ms < self.expires_unix_ms


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """The outcome of one evaluation (spec 02 §6.2.3)."""

    decision: Decision
    """ALLOW or DENY."""
    reason: str
    """The matching rule's id, or :data:`NO_MATCHING_RULE`. The relay sends it in
    ``"denied: <reason>"`` / ``"denied (callee): <reason>"`` and puts it in audit events."""
    p2p_mode: P2PMode = P2PMode.ALLOWED
    """The matching rule's p2p mode (ALLOWED for the default deny)."""
    relay_mode: RelayMode = RelayMode.SPLICE
    """The matching rule's relay mode (SPLICE for the default deny)."""

    @property
    def allowed(self) -> bool:
        """``decision is Decision.ALLOW``."""
        return self.decision is Decision.ALLOW


_DEFAULT_DENY: Final = PolicyResult(Decision.DENY, NO_MATCHING_RULE)


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    """A rule with its globs compiled, and the result it produces, built once per rule set."""

    rule: Rule
    caller: _Matcher
    target: _Matcher
    method: _Matcher
    result: PolicyResult

    @classmethod
    def build(cls, rule: Rule) -> _CompiledRule:
        return cls(
            rule=rule,
            caller=_compile_glob(rule.caller_pattern),
            target=_compile_glob(rule.target_pattern),
            # An empty method pattern matches every method, unlike an empty caller or target
            # pattern (spec 02 §6.2.3).
            method=_compile_glob(rule.method_pattern) if rule.method_pattern else _always,
            result=PolicyResult(rule.decision, rule.id, rule.p2p_mode, rule.relay_mode),
        )

    def matches(self, caller: str, target: str, method: str, now_ms: int) -> bool:
        expires = self.rule.expires_unix_ms
        return (
            (expires == 0 or now_ms < expires)
            and self.caller(caller)
            and self.target(target)
            and self.method(method)
        )


@dataclass(frozen=True, slots=True)
class _Index:
    """An immutable view of the rule set, split into the two groups of spec 02 §6.2.3."""

    exact: Mapping[str, tuple[_CompiledRule, ...]]
    wildcard: tuple[_CompiledRule, ...]

    @classmethod
    def build(cls, rules: Iterable[Rule]) -> _Index:
        exact: dict[str, list[_CompiledRule]] = {}
        wildcard: list[_CompiledRule] = []
        for rule in rules:
            compiled = _CompiledRule.build(rule)
            if "*" in rule.target_pattern:
                wildcard.append(compiled)
            else:
                exact.setdefault(rule.target_pattern, []).append(compiled)
        return cls({k: tuple(v) for k, v in exact.items()}, tuple(wildcard))


class PolicyEngine:
    """An ordered, mutable rule set that answers :meth:`decide` (spec 02 §6.2.3).

    Performance: :meth:`decide` looks the exact-target bucket up in a dict and then scans only
    that bucket and the wildcard rules, with globs compiled in advance. With 1,000 exact rules
    the reference's budget is p99 < 1 ms per decision (spec 02 §18 ``TestEnginePerformance``);
    measured here (CPython 3.11, 2 cores): p99 0.5 µs with 1,000 exact rules, and about 0.2 ms
    when a decision has to scan 1,000 wildcard-target rules to the last. The cache
    (:class:`DecisionCache`) absorbs repeats either way. Mutations rebuild the index
    (O(rules)); rules change rarely.

    Args:
        rules: The initial rules, in order (as for :meth:`replace_all`).
    """

    __slots__ = ("_index", "_rules")

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self._rules: dict[str, Rule] = {}
        self._index = _Index.build(())
        self.replace_all(rules)

    def decide(self, caller: str, target: str, method: str, now_ms: int) -> PolicyResult:
        """Evaluate ``(caller, target, method)`` at ``now_ms`` (Unix ms).

        Returns:
            The first matching rule's result (exact-target rules first, then wildcard-target
            rules, each in order), or deny with reason :data:`NO_MATCHING_RULE`.
        """
        index = self._index  # one read: a concurrent swap cannot mix two rule sets
        for compiled in index.exact.get(target, ()):
            if compiled.matches(caller, target, method, now_ms):
                return compiled.result
        for compiled in index.wildcard:
            if compiled.matches(caller, target, method, now_ms):
                return compiled.result
        return _DEFAULT_DENY

    def upsert(self, rule: Rule) -> None:
        """Insert ``rule``, or replace the rule with its id **in the same slot** ([REC] spec 02
        §15 item 5; the Watch stream's live ADDED, §6.2.6). A new id goes to the end."""
        self._rules[rule.id] = rule
        self._rebuild()

    def remove(self, rule_id: str) -> bool:
        """Remove the rule ``rule_id`` (the Watch stream's REMOVED).

        Returns:
            Whether a rule was removed (removing an unknown id is a no-op, as in the reference).
        """
        if self._rules.pop(rule_id, None) is None:
            return False
        self._rebuild()
        return True

    def replace_all(self, rules: Iterable[Rule]) -> None:
        """Replace the whole rule set (policy file load; the Watch SNAPSHOT_END, §6.2.6).

        Rules keep the given order. If an id occurs more than once, the **last** definition
        wins and it sits at the **first** occurrence's position.
        """
        new: dict[str, Rule] = {}
        for rule in rules:
            new[rule.id] = rule
        self._rules = new
        self._rebuild()

    def rules(self) -> tuple[Rule, ...]:
        """The rules in evaluation order within each group (the engine's deterministic order)."""
        return tuple(self._rules.values())

    def get(self, rule_id: str) -> Rule | None:
        """The rule with id ``rule_id``, if any."""
        return self._rules.get(rule_id)

    def __len__(self) -> int:
        return len(self._rules)

    def _rebuild(self) -> None:
        self._index = _Index.build(self._rules.values())


# --------------------------------------------------------------------------------------------
# Provide rules: who may register a service
# --------------------------------------------------------------------------------------------

PROVIDE_OPEN: Final = "no provide rule"
"""The reason of an allowed registration of a service that no provide rule of the tenant
covers: such a service stays open to every agent of the tenant (backwards compatible)."""

NO_MATCHING_PROVIDE_RULE: Final = "no matching provide rule"
"""The reason of a refused registration: provide rules cover the service, none matches the
agent (closed world, as for consume rules)."""

_PROVIDER_PREFIX: Final = "outrelay://"


def provider_pattern_tenant(pattern: str) -> str:
    """The tenant a provide rule's ``provider`` pattern belongs to.

    A provider pattern must spell its tenant out: ``outrelay://<tenant>/`` followed by any glob,
    e.g. ``outrelay://acme/agent/*``. So a provide rule can only ever speak for one tenant, and
    a pattern such as ``*`` cannot lock (or open) a name in every tenant at once.

    Raises:
        ValueError: The pattern does not start with ``outrelay://<tenant>/`` with a literal,
            valid tenant label (no ``*``); the message says what is wrong.
    """
    shape = (
        f"must start with 'outrelay://<tenant>/' (provide rules are per tenant), got {pattern!r}"
    )
    if not pattern.startswith(_PROVIDER_PREFIX):
        raise ValueError(shape)
    tenant, slash, _rest = pattern[len(_PROVIDER_PREFIX) :].partition("/")
    if "*" in tenant:
        raise ValueError(f"the tenant must be literal, not a glob, got {pattern!r}")
    if not slash or not is_valid_label(tenant):
        raise ValueError(shape)
    return tenant


@dataclass(frozen=True, slots=True)
class ProvideRule:
    """Who may provide (REGISTER) a service: a policy file rule with ``provider`` and
    ``service`` instead of ``caller`` and ``target`` (see the module docstring).

    Raises:
        ValueError: ``provider_pattern`` does not name its tenant (:func:`provider_pattern_tenant`).
    """

    id: str
    """Unique id (among every rule of the file); it is the decision's ``reason``."""
    provider_pattern: str
    """Glob on the registering agent's URI, starting with ``outrelay://<tenant>/``."""
    service_pattern: str
    """Glob on ``Register.service_name``; the rule *covers* the services it matches."""
    decision: Decision = Decision.ALLOW
    """ALLOW or DENY."""

    def __post_init__(self) -> None:
        provider_pattern_tenant(self.provider_pattern)

    @property
    def tenant(self) -> str:
        """The tenant the rule speaks for (from ``provider_pattern``)."""
        return provider_pattern_tenant(self.provider_pattern)


@dataclass(frozen=True, slots=True)
class ProvideResult:
    """The outcome of a provide check (:meth:`ProvideEngine.decide`)."""

    decision: Decision
    """ALLOW or DENY."""
    reason: str
    """The matching rule's id, :data:`PROVIDE_OPEN` (allowed: no rule covers the service) or
    :data:`NO_MATCHING_PROVIDE_RULE` (denied)."""
    covered: bool = True
    """Whether provide rules covered the service. False: the name is open by default, no rule
    was involved, and the relay audits nothing (as without provide rules at all)."""

    @property
    def allowed(self) -> bool:
        """``decision is Decision.ALLOW``."""
        return self.decision is Decision.ALLOW


_PROVIDE_OPEN_RESULT: Final = ProvideResult(Decision.ALLOW, PROVIDE_OPEN, covered=False)
_PROVIDE_DENY_RESULT: Final = ProvideResult(Decision.DENY, NO_MATCHING_PROVIDE_RULE)


@dataclass(frozen=True, slots=True)
class _CompiledProvideRule:
    provider: _Matcher
    service: _Matcher
    result: ProvideResult


class ProvideEngine:
    """The provide rules, indexed by tenant, answering :meth:`decide`.

    Semantics, for an agent of ``tenant`` registering ``service``:

    1. the rules of ``tenant`` whose ``service`` glob matches the name *cover* it;
    2. if none does, the registration is allowed (:data:`PROVIDE_OPEN`): a service without
       provide rules stays open to any agent of the tenant, as before provide rules existed;
    3. otherwise the covering rules are scanned in file order and the first whose ``provider``
       glob matches the agent's URI decides; if none matches, the registration is denied
       (:data:`NO_MATCHING_PROVIDE_RULE`).

    Unlike consume rules there is no exact-before-wildcard grouping: file order alone decides.
    Mutations swap one immutable index (as :class:`PolicyEngine` does).

    Args:
        rules: The initial rules, in order (as for :meth:`replace_all`).
    """

    __slots__ = ("_index", "_rules")

    def __init__(self, rules: Iterable[ProvideRule] = ()) -> None:
        self._rules: tuple[ProvideRule, ...] = ()
        self._index: Mapping[str, tuple[_CompiledProvideRule, ...]] = {}
        self.replace_all(rules)

    def decide(self, agent_uri: str, tenant: str, service: str) -> ProvideResult:
        """May ``agent_uri`` (an agent of ``tenant``) register ``service``? See the class doc."""
        covered = False
        for compiled in self._index.get(tenant, ()):
            if not compiled.service(service):
                continue
            covered = True
            if compiled.provider(agent_uri):
                return compiled.result
        return _PROVIDE_DENY_RESULT if covered else _PROVIDE_OPEN_RESULT

    def replace_all(self, rules: Iterable[ProvideRule]) -> None:
        """Replace every provide rule; the given order is the evaluation order."""
        kept = tuple(rules)
        index: dict[str, list[_CompiledProvideRule]] = {}
        for rule in kept:
            index.setdefault(rule.tenant, []).append(
                _CompiledProvideRule(
                    provider=_compile_glob(rule.provider_pattern),
                    service=_compile_glob(rule.service_pattern),
                    result=ProvideResult(rule.decision, rule.id),
                )
            )
        self._rules = kept
        self._index = {tenant: tuple(compiled) for tenant, compiled in index.items()}

    def rules(self) -> tuple[ProvideRule, ...]:
        """The provide rules in evaluation order."""
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)


# --------------------------------------------------------------------------------------------
# Decision cache
# --------------------------------------------------------------------------------------------

CacheKey: TypeAlias = tuple[str, str, str]
"""``(caller, target, method)``, compared exactly (spec 02 §6.2.5)."""


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of a :class:`DecisionCache` (STYLE §5). Feeds ``policy_cache_hits`` and
    ``policy_cache_misses`` (spec 02 §11)."""

    hits: int
    """Lookups answered from the cache."""
    misses: int
    """Lookups that found nothing, or an expired entry."""
    size: int
    """Entries held, possibly including expired ones not yet looked up or purged."""
    evictions: int
    """Live entries dropped because the cache was full (expired ones are not counted)."""


class DecisionCache:
    """Whole :class:`PolicyResult` values keyed by the exact triple (spec 02 §6.2.5).

    * An entry lives ``ttl_ms`` from its insertion; hits do not refresh it, and a lookup at or
      after its expiry deletes it and misses.
    * Soft cap: when :meth:`put` finds ``capacity`` entries or more, it first drops expired
      entries, then, if still at least that full, drops ``evict_batch`` entries.

    [REC] The reference drops an *arbitrary* batch (Go map order) and finds the expired entries
    with a full scan. Ours is FIFO by insertion (re-putting a key moves it to the back): the
    entries dropped are the oldest, i.e. those closest to expiry, which is what a TTL cache
    would lose first anyway. Since every entry has the same TTL, with a non-decreasing
    ``now_ms`` the expired entries are exactly a prefix, so purging them stops at the first live
    entry instead of scanning the whole cache. If the clock steps back, some expired entries may
    sit behind a live one; they are then removed on lookup or by FIFO eviction.

    Not LRU, as in the reference: hits do not move entries.

    Args:
        ttl_ms: Entry lifetime in ms.
        capacity: The soft cap.
        evict_batch: How many entries to drop when the cap is still reached after purging.
    """

    __slots__ = ("_capacity", "_entries", "_evict_batch", "_evictions", "_hits", "_misses", "_ttl")

    def __init__(
        self,
        *,
        ttl_ms: int = CACHE_TTL_MS,
        capacity: int = CACHE_CAPACITY,
        evict_batch: int = CACHE_EVICT_BATCH,
    ) -> None:
        if ttl_ms <= 0 or capacity <= 0 or evict_batch <= 0:
            raise ValueError("ttl_ms, capacity and evict_batch must be positive")
        self._ttl = ttl_ms
        self._capacity = capacity
        self._evict_batch = evict_batch
        # key -> (result, expires_ms), in insertion order.
        self._entries: OrderedDict[CacheKey, tuple[PolicyResult, int]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def get(self, key: CacheKey, now_ms: int) -> PolicyResult | None:
        """The cached result for ``key`` at ``now_ms``, or ``None`` (a miss).

        An entry whose expiry is at or before ``now_ms`` is deleted and counts as a miss.
        """
        entry = self._entries.get(key)
        if entry is not None:
            result, expires = entry
            if now_ms < expires:
                self._hits += 1
                return result
            del self._entries[key]
        self._misses += 1
        return None

    def put(self, key: CacheKey, result: PolicyResult, now_ms: int) -> None:
        """Store ``result`` for ``key``, expiring ``ttl_ms`` after ``now_ms``."""
        entries = self._entries
        if key in entries:
            del entries[key]  # re-insert at the back, so FIFO order stays insertion order
        elif len(entries) >= self._capacity:
            self._make_room(now_ms)
        entries[key] = (result, now_ms + self._ttl)

    def flush(self) -> None:
        """Drop every entry (on every rule change, spec 02 §6.2.5). Counters are kept."""
        self._entries.clear()

    def statistics(self) -> CacheStatistics:
        """A snapshot of the counters and the size."""
        return CacheStatistics(self._hits, self._misses, len(self._entries), self._evictions)

    def __len__(self) -> int:
        return len(self._entries)

    def _make_room(self, now_ms: int) -> None:
        entries = self._entries
        # 1. Expired entries: a prefix, while now_ms does not go backwards (see class doc).
        while entries:
            _result, expires = next(iter(entries.values()))
            if now_ms < expires:
                break
            entries.popitem(last=False)
        # 2. Still full: drop the oldest batch.
        if len(entries) >= self._capacity:
            for _ in range(min(self._evict_batch, len(entries))):
                entries.popitem(last=False)
                self._evictions += 1


# --------------------------------------------------------------------------------------------
# Service: engine + cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyStatistics:
    """A snapshot of a :class:`PolicyService` (STYLE §5)."""

    rules: int
    """Rules loaded."""
    decisions: int
    """Calls to :meth:`PolicyService.decide`."""
    cache: CacheStatistics
    """The decision cache's counters."""
    provide_rules: int = 0
    """Provide rules loaded."""


class PolicyService:
    """What the relay calls: an engine behind a decision cache (spec 02 §6.2.3, §6.2.5).

    Every change of the rule set (:meth:`load`, :meth:`load_rules`, :meth:`upsert`,
    :meth:`remove`) flushes the cache, as every applied Watch event does in the reference (spec
    02 §6.2.5). Rule expiry does not: a cached allow can outlive its rule by up to the cache TTL.

    Provide rules (:meth:`may_provide`) are checked once per REGISTER, uncached.

    Args:
        engine: The rule set; a new empty one (deny everything) by default.
        cache: The decision cache; a new one with the spec's limits by default.
        provide: The provide rules; a new empty one (every registration allowed) by default.
    """

    __slots__ = ("_cache", "_decisions", "_engine", "_provide")

    def __init__(
        self,
        engine: PolicyEngine | None = None,
        cache: DecisionCache | None = None,
        provide: ProvideEngine | None = None,
    ) -> None:
        self._engine = engine if engine is not None else PolicyEngine()
        self._cache = cache if cache is not None else DecisionCache()
        self._provide = provide if provide is not None else ProvideEngine()
        self._decisions = 0

    @property
    def engine(self) -> PolicyEngine:
        """The rule set. Mutate it through this service, so that the cache is flushed."""
        return self._engine

    @property
    def provide(self) -> ProvideEngine:
        """The provide rules (who may register which service)."""
        return self._provide

    def may_provide(self, agent_uri: str, tenant: str, service: str) -> ProvideResult:
        """May ``agent_uri``, an agent of ``tenant``, register ``service``
        (:meth:`ProvideEngine.decide`)? The relay sends no REGISTER_ACK when it may not."""
        return self._provide.decide(agent_uri, tenant, service)

    def load(self, document: PolicyDocument) -> None:
        """Replace both rule sets with a policy file's (load, SIGHUP reload); flush the cache."""
        self._provide.replace_all(document.provide)
        self.load_rules(document.rules)

    def decide(self, caller: str, target: str, method: str, now_ms: int) -> PolicyResult:
        """Evaluate ``(caller, target, method)`` at ``now_ms`` (Unix ms), through the cache.

        Returns:
            The result; the relay rejects with 403 when it is not :attr:`PolicyResult.allowed`.
        """
        self._decisions += 1
        key = (caller, target, method)
        result = self._cache.get(key, now_ms)
        if result is None:
            result = self._engine.decide(caller, target, method, now_ms)
            self._cache.put(key, result, now_ms)
        return result

    def load_rules(self, rules: Iterable[Rule]) -> None:
        """Replace the rule set (:meth:`PolicyEngine.replace_all`) and flush the cache."""
        self._engine.replace_all(rules)
        self._cache.flush()

    def upsert(self, rule: Rule) -> None:
        """Insert or replace one rule (:meth:`PolicyEngine.upsert`) and flush the cache."""
        self._engine.upsert(rule)
        self._cache.flush()

    def remove(self, rule_id: str) -> bool:
        """Remove one rule (:meth:`PolicyEngine.remove`) and flush the cache.

        Returns:
            Whether a rule was removed.
        """
        removed = self._engine.remove(rule_id)
        self._cache.flush()
        return removed

    def statistics(self) -> PolicyStatistics:
        """A snapshot of the counters."""
        return PolicyStatistics(
            len(self._engine), self._decisions, self._cache.statistics(), len(self._provide)
        )


# --------------------------------------------------------------------------------------------
# Policy file
# --------------------------------------------------------------------------------------------


class PolicyFileError(ValueError):
    """A policy file (or the object parsed from it) is not valid.

    The message names the file, the rule (index and id, when known) and the field, e.g.
    ``policy.json: rule #2 (id 'allow-web'): field 'decision': expected one of 'allow',
    'deny', got 'alow'``.

    Attributes:
        detail: What is wrong, without the location.
        source: The file's path, or ``None`` for :func:`parse_policy`.
        rule_index: 0-based index of the faulty rule in ``"rules"``, or ``None``.
        rule_id: Its id, when it has a valid one.
        field: The faulty field, or ``None`` when the problem is not one field.
    """

    def __init__(
        self,
        detail: str,
        *,
        source: str | None = None,
        rule_index: int | None = None,
        rule_id: str | None = None,
        field: str | None = None,
    ) -> None:
        where = [] if source is None else [source]
        if rule_index is not None:
            where.append(f"rule #{rule_index}" + (f" (id {rule_id!r})" if rule_id else ""))
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([*where, detail]))
        self.detail = detail
        self.source = source
        self.rule_index = rule_index
        self.rule_id = rule_id
        self.field = field


_RULE_KEYS: Final = frozenset(
    {
        "id",
        "caller",
        "target",
        "method",
        "decision",
        "expires_unix_ms",
        "expires",
        "p2p_mode",
        "relay_mode",
    }
)

_PROVIDE_KEYS: Final = frozenset({"id", "provider", "service", "decision"})
"""The keys of a provide rule; a rule with ``provider`` or ``service`` is one."""

# Accepted spellings (compared after lower-casing).
_DECISIONS: Final = {
    "allow": Decision.ALLOW,
    "deny": Decision.DENY,
    "decision_allow": Decision.ALLOW,
    "decision_deny": Decision.DENY,
}
_P2P_MODES: Final = {
    spelling: mode
    for mode in P2PMode
    for spelling in (mode.label, f"p2p_{mode.label}", f"p2p_mode_{mode.label}")
}
_RELAY_MODES: Final = {
    spelling: mode for mode in RelayMode for spelling in (mode.label, f"relay_mode_{mode.label}")
}

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class _RuleParser:
    """Parses one rule object; every error names the rule and the field."""

    def __init__(self, index: int, obj: object) -> None:
        self.index = index
        self.rule_id: str | None = None
        if not isinstance(obj, dict):
            raise self.error(f"a rule must be a JSON object, got {_kind(obj)}")
        self.obj: dict[str, Any] = obj

    def error(self, message: str, field: str | None = None) -> PolicyFileError:
        return PolicyFileError(message, rule_index=self.index, rule_id=self.rule_id, field=field)

    def string(self, field: str, *, required: bool, non_empty: bool, hint: str = "") -> str:
        if field not in self.obj:
            if required:
                raise self.error("missing (required)", field)
            return ""
        value = self.obj[field]
        if not isinstance(value, str):
            raise self.error(f"must be a string, got {_kind(value)}", field)
        if non_empty and not value:
            raise self.error("must not be empty" + hint, field)
        return value

    def choice(self, field: str, table: Mapping[str, Any], default: Any, shown: str) -> Any:
        if field not in self.obj:
            if default is None:
                raise self.error(f"missing (required; one of {shown})", field)
            return default
        value = self.obj[field]
        if not isinstance(value, str) or value.lower() not in table:
            raise self.error(f"expected one of {shown}, got {value!r}", field)
        return table[value.lower()]

    def expiry(self) -> int:
        has_ms, has_ts = "expires_unix_ms" in self.obj, "expires" in self.obj
        if has_ms and has_ts:
            raise self.error("give either 'expires' or 'expires_unix_ms', not both", "expires")
        if has_ms:
            value = self.obj["expires_unix_ms"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self.error(
                    f"must be a non-negative integer (Unix ms, 0 = never), got {value!r}",
                    "expires_unix_ms",
                )
            return value
        if has_ts:
            value = self.obj["expires"]
            if not isinstance(value, str):
                raise self.error(f"must be an RFC 3339 string, got {_kind(value)}", "expires")
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                raise self.error(
                    f"not an RFC 3339 timestamp: {value!r} (e.g. '2030-01-01T00:00:00Z')",
                    "expires",
                ) from None
            if when.tzinfo is None:
                raise self.error(
                    f"timestamp {value!r} has no UTC offset (add 'Z' or '+hh:mm')", "expires"
                )
            ms = (when - _EPOCH) // timedelta(milliseconds=1)
            if ms <= 0:
                raise self.error(f"timestamp {value!r} is not after 1970-01-01", "expires")
            return ms
        return 0

    def parse(self) -> Rule | ProvideRule:
        rule_id = self.string("id", required=True, non_empty=True)
        self.rule_id = rule_id
        if "provider" in self.obj or "service" in self.obj:
            return self.parse_provide(rule_id)
        unknown = sorted(set(self.obj) - _RULE_KEYS)
        if unknown:
            raise self.error(
                f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_RULE_KEYS))}; "
                f"a provide rule has {', '.join(sorted(_PROVIDE_KEYS))})",
                unknown[0],
            )
        any_hint = "; use '*' to match anything"
        caller_hint = " (a consume rule; a provide rule has 'provider' and 'service')"
        if "caller" not in self.obj:
            raise self.error("missing (required)" + caller_hint, "caller")
        return Rule(
            id=rule_id,
            caller_pattern=self.string("caller", required=True, non_empty=True, hint=any_hint),
            target_pattern=self.string("target", required=True, non_empty=True, hint=any_hint),
            method_pattern=self.string("method", required=False, non_empty=False),
            decision=self.choice("decision", _DECISIONS, None, "'allow', 'deny'"),
            expires_unix_ms=self.expiry(),
            p2p_mode=self.choice(
                "p2p_mode", _P2P_MODES, P2PMode.ALLOWED, "'allowed', 'forbidden', 'required'"
            ),
            relay_mode=self.choice(
                "relay_mode", _RELAY_MODES, RelayMode.SPLICE, "'splice', 'forward'"
            ),
        )

    def parse_provide(self, rule_id: str) -> ProvideRule:
        unknown = sorted(set(self.obj) - _PROVIDE_KEYS)
        if unknown:
            raise self.error(
                f"unknown key {unknown[0]!r} in a provide rule "
                f"(allowed: {', '.join(sorted(_PROVIDE_KEYS))})",
                unknown[0],
            )
        provider = self.string(
            "provider", required=True, non_empty=True, hint="; e.g. 'outrelay://acme/agent/*'"
        )
        service = self.string(
            "service", required=True, non_empty=True, hint="; use '*' to match every service"
        )
        decision = self.choice("decision", _DECISIONS, None, "'allow', 'deny'")
        try:
            return ProvideRule(rule_id, provider, service, decision)
        except ValueError as exc:
            raise self.error(str(exc), "provider") from None


def _kind(value: object) -> str:
    """The JSON name of ``value``'s type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    """A whole policy file: both kinds of rules, each in file order."""

    rules: tuple[Rule, ...] = ()
    """The consume rules (``caller``/``target``), evaluated per OPEN_STREAM."""
    provide: tuple[ProvideRule, ...] = ()
    """The provide rules (``provider``/``service``), evaluated per REGISTER."""


def parse_policy_document(obj: object) -> PolicyDocument:
    """Validate a decoded policy document (the module docstring's format).

    Args:
        obj: The value decoded from JSON.

    Returns:
        The consume rules and the provide rules, each in file order (the evaluation order).

    Raises:
        PolicyFileError: The document is malformed; the message names the rule and the field.
    """
    if not isinstance(obj, dict):
        raise PolicyFileError(
            f'the policy must be a JSON object {{"rules": [...]}}, got {_kind(obj)}'
        )
    extra = sorted(set(obj) - {"rules"})
    if extra:
        raise PolicyFileError(f"unknown top-level key {extra[0]!r} (only 'rules' is allowed)")
    if "rules" not in obj:
        raise PolicyFileError("missing top-level key 'rules'")
    items = obj["rules"]
    if not isinstance(items, list):
        raise PolicyFileError(f"'rules' must be an array, got {_kind(items)}")
    rules: list[Rule] = []
    provide: list[ProvideRule] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        rule = _RuleParser(index, item).parse()
        if rule.id in first_index:
            raise PolicyFileError(
                f"duplicate id (first used by rule #{first_index[rule.id]})",
                rule_index=index,
                rule_id=rule.id,
                field="id",
            )
        first_index[rule.id] = index
        if isinstance(rule, ProvideRule):
            provide.append(rule)
        else:
            rules.append(rule)
    return PolicyDocument(tuple(rules), tuple(provide))


def parse_policy(obj: object) -> list[Rule]:
    """The consume rules of a policy document (:func:`parse_policy_document` validates, and
    returns, the provide rules as well).

    Raises:
        PolicyFileError: The document is malformed; the message names the rule and the field.
    """
    return list(parse_policy_document(obj).rules)


def load_policy_file(path: str | os.PathLike[str]) -> list[Rule]:
    """The consume rules of a policy file (:func:`load_policy_document` returns both kinds).

    Raises:
        PolicyFileError: Not UTF-8 JSON, or not a valid policy; the message starts with the path.
        OSError: The file cannot be read.
    """
    return list(load_policy_document(path).rules)


def load_policy_document(path: str | os.PathLike[str]) -> PolicyDocument:
    """Read and validate a policy file (blocking I/O; call it at startup or in a thread).

    Raises:
        PolicyFileError: Not UTF-8 JSON, or not a valid policy; the message starts with the path.
        OSError: The file cannot be read.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyFileError(f"not UTF-8: {exc}", source=name) from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise PolicyFileError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", source=name
        ) from None
    except _NonJsonConstantError as exc:
        raise PolicyFileError(f"invalid JSON: {exc}", source=name) from None
    try:
        return parse_policy_document(obj)
    except PolicyFileError as exc:
        raise PolicyFileError(
            exc.detail,
            source=name,
            rule_index=exc.rule_index,
            rule_id=exc.rule_id,
            field=exc.field,
        ) from None


class _NonJsonConstantError(ValueError):
    """``NaN``/``Infinity`` in the input: Python's json accepts them, JSON does not."""


def _reject_constant(name: str) -> float:
    raise _NonJsonConstantError(f"{name} is not a JSON value")


def policy_to_obj(rules: Iterable[Rule], provide: Iterable[ProvideRule] = ()) -> dict[str, Any]:
    """The policy file object for ``rules`` and ``provide``; the inverse of
    :func:`parse_policy_document` (consume rules first, then provide rules).

    Every field is written out (``expires_unix_ms`` rather than ``expires``), in the canonical
    lower-case spellings, so ``parse_policy(policy_to_obj(rules)) == rules``. Serialise it with
    ``json.dumps``.
    """
    consume: list[dict[str, Any]] = [
        {
            "id": r.id,
            "caller": r.caller_pattern,
            "target": r.target_pattern,
            "method": r.method_pattern,
            "decision": r.decision.label,
            "expires_unix_ms": r.expires_unix_ms,
            "p2p_mode": r.p2p_mode.label,
            "relay_mode": r.relay_mode.label,
        }
        for r in rules
    ]
    providers: list[dict[str, Any]] = [
        {
            "id": r.id,
            "provider": r.provider_pattern,
            "service": r.service_pattern,
            "decision": r.decision.label,
        }
        for r in provide
    ]
    return {"rules": consume + providers}
