"""The policy model: decisions, modes, rules and results (spec 02 §6.2.2, §6.2.4).

Plain values shared by the matcher (:mod:`.matching`), the engines (:mod:`.engine`) and the
file format (:mod:`.file`); nothing here matches, caches or reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Final

from outrelay.identity import is_valid_label

__all__ = [
    "NO_MATCHING_PROVIDE_RULE",
    "NO_MATCHING_RULE",
    "PROVIDE_OPEN",
    "Decision",
    "P2PMode",
    "PolicyResult",
    "ProvideResult",
    "ProvideRule",
    "RelayMode",
    "Rule",
    "combine_p2p",
    "provider_pattern_tenant",
]

NO_MATCHING_RULE: Final = "no matching rule"
"""The reason of the closed-world default deny (spec 02 §6.2.3 step 4). It appears on the wire in
``STREAM_REJECT{403, "denied: no matching rule"}`` (spec 02 §13)."""


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
