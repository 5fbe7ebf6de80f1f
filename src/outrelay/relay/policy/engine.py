"""What the relay calls: :class:`PolicyService` (the engine behind a decision cache, spec 02
§6.2.3, §6.2.5) and :class:`ProvideEngine` (ours: who may REGISTER a service, spec 02 §4).

Nothing here reads a clock, does I/O or starts a task: "now" is an argument (``now_ms``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeAlias

from outrelay.relay.policy.matching import Matcher, PolicyEngine, compile_glob
from outrelay.relay.policy.model import (
    NO_MATCHING_PROVIDE_RULE,
    PROVIDE_OPEN,
    Decision,
    PolicyResult,
    ProvideResult,
    ProvideRule,
    Rule,
)

if TYPE_CHECKING:
    from outrelay.relay.policy.file import PolicyDocument

__all__ = [
    "CACHE_CAPACITY",
    "CACHE_EVICT_BATCH",
    "CACHE_TTL_MS",
    "CacheKey",
    "CacheStatistics",
    "DecisionCache",
    "PolicyService",
    "PolicyStatistics",
    "ProvideEngine",
]

CACHE_TTL_MS: Final = 5_000
"""Decision cache TTL, 5 s from insertion, not refreshed by hits (spec 02 §6.2.5, §12 "policy
CacheTTL"). Short enough that a decision racing a rule change settles quickly."""

CACHE_CAPACITY: Final = 65_536
"""Decision cache soft cap (spec 02 §6.2.5, §12 "CacheCapacity"): bounds the memory that many
distinct (caller, target, method) triples can pin."""

CACHE_EVICT_BATCH: Final = 8_192
"""Entries dropped at once when the cache is still full after dropping expired ones (spec 02
§6.2.5, §12 "eviction batch"; ``CacheCapacity / 8`` in the reference)."""


_PROVIDE_OPEN_RESULT: Final = ProvideResult(Decision.ALLOW, PROVIDE_OPEN, covered=False)
_PROVIDE_DENY_RESULT: Final = ProvideResult(Decision.DENY, NO_MATCHING_PROVIDE_RULE)


@dataclass(frozen=True, slots=True)
class _CompiledProvideRule:
    provider: Matcher
    service: Matcher
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
                    provider=compile_glob(rule.provider_pattern),
                    service=compile_glob(rule.service_pattern),
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
