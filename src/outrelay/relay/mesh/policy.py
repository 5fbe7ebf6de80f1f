"""Policy rules from the shared registry, per tenant (issue 18; spec 02 §6.2).

With ``--registry etcd://...`` the rules live in etcd under ``<prefix>policy/<tenant>/<id>``
(``outrelay policy add|remove`` edits them) and every relay watches them
(:meth:`~.etcd.EtcdMesh.on_policy`), instead of the ``--policy`` file and SIGHUP of the
embedded mode (the two are exclusive).

**Enablement is per tenant.** A tenant with at least one rule in etcd (consume or provide)
is enforced exactly as a ``--policy`` file enforces all tenants: its rules, in the order they
were added, first match wins, no match denies (spec 02 §6.2.3), through the decision cache,
with audit events. A tenant without rules is not enforced, as a relay without ``--policy``:
every open and every registration of it is allowed (reason :data:`NO_TENANT_POLICY` in the
audit events). So adding the first rule of a tenant switches enforcement on for that tenant
only; removing its last rule switches it off. As with a ``--policy`` file, a tenant
that has only provide rules is enforced for opens too, and denies them all (closed world):
give it the consume rules it needs in the same change.

The tenant of an evaluation is the authority of the *caller* URI: the consumer on the caller
side, the provider on the callee side (spec 02 §6.2); a registration's is the agent's
tenant. Rules of one tenant never apply to another tenant's agents.

:class:`TenantPolicy` is a :class:`~outrelay.relay.policy.PolicyService`, so the relay's open
flow and REGISTER handling use it unchanged; :meth:`TenantPolicy.replace` swaps the rule sets
(one :class:`~outrelay.relay.policy.PolicyService` per tenant, each with its own cache: a
change flushes only the changed tenants' caches). Sans-IO.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from outrelay.relay.policy import (
    PROVIDE_OPEN,
    CacheStatistics,
    Decision,
    PolicyDocument,
    PolicyResult,
    PolicyService,
    PolicyStatistics,
    ProvideResult,
)

__all__ = ["NO_TENANT_POLICY", "TenantPolicy"]

NO_TENANT_POLICY: Final = "no policy for tenant"
"""The reason of an allow for a tenant without rules in the registry (not enforced)."""


class TenantPolicy(PolicyService):
    """Per-tenant rule sets from the registry (module docstring)."""

    __slots__ = ("_documents", "_tenants")

    def __init__(self) -> None:
        super().__init__()
        self._tenants: dict[str, PolicyService] = {}
        self._documents: dict[str, PolicyDocument] = {}

    @property
    def tenants(self) -> frozenset[str]:
        """The enforced tenants (those with at least one rule)."""
        return frozenset(self._tenants)

    def rules_of(self, tenant: str) -> PolicyDocument | None:
        return self._documents.get(tenant)

    def replace(self, documents: Mapping[str, PolicyDocument]) -> None:
        """Install every tenant's rules (the registry's whole policy, after each change)."""
        tenants: dict[str, PolicyService] = {}
        kept: dict[str, PolicyDocument] = {}
        for tenant, document in documents.items():
            if not document.rules and not document.provide:
                continue
            service = self._tenants.get(tenant)
            if service is None or self._documents.get(tenant) != document:
                service = PolicyService()
                service.load(document)
            tenants[tenant] = service
            kept[tenant] = document
        self._tenants = tenants
        self._documents = kept

    def decide(self, caller: str, target: str, method: str, now_ms: int) -> PolicyResult:
        service = self._tenants.get(_tenant_of(caller))
        if service is None:
            return PolicyResult(Decision.ALLOW, NO_TENANT_POLICY)
        return service.decide(caller, target, method, now_ms)

    def may_provide(self, agent_uri: str, tenant: str, service: str) -> ProvideResult:
        rules = self._tenants.get(tenant)
        if rules is None:
            return ProvideResult(Decision.ALLOW, PROVIDE_OPEN, covered=False)
        return rules.may_provide(agent_uri, tenant, service)

    def load(self, document: PolicyDocument) -> None:
        raise TypeError("registry policy is per tenant: use replace()")

    def statistics(self) -> PolicyStatistics:
        """The sums over the tenants (rules, decisions, cache)."""
        stats = [s.statistics() for s in self._tenants.values()]
        if not stats:
            return super().statistics()
        cache = CacheStatistics(
            sum(s.cache.hits for s in stats),
            sum(s.cache.misses for s in stats),
            sum(s.cache.size for s in stats),
            sum(s.cache.evictions for s in stats),
        )
        return PolicyStatistics(
            sum(s.rules for s in stats),
            sum(s.decisions for s in stats),
            cache,
            sum(s.provide_rules for s in stats),
        )


_SCHEME: Final = "outrelay://"


def _tenant_of(uri: str) -> str:
    """The authority of an ``outrelay://`` URI ("" for anything else: not enforced, as the
    relay only evaluates URIs it verified)."""
    if not uri.startswith(_SCHEME):
        return ""
    return uri[len(_SCHEME) :].split("/", 1)[0]
