"""The policy file: loading and validating the JSON rules (spec 02 §6.2, DESIGN.md).

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from outrelay.relay.policy.model import Decision, P2PMode, ProvideRule, RelayMode, Rule

__all__ = [
    "PolicyDocument",
    "PolicyFileError",
    "load_policy_document",
    "load_policy_file",
    "parse_policy",
    "parse_policy_document",
    "policy_to_obj",
]


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
