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

The policy file format is described in :mod:`outrelay.relay.policy.file`.

Modules
-------
``model``: decisions, modes, rules and results (:class:`Rule`, :class:`ProvideRule`);
``matching``: glob semantics and the consume-rule precedence (:class:`PolicyEngine`);
``engine``: the provide engine, the decision cache and :class:`PolicyService`;
``file``: loading and validating the JSON policy file.
"""

from __future__ import annotations

from outrelay.relay.policy.engine import (
    CACHE_CAPACITY,
    CACHE_EVICT_BATCH,
    CACHE_TTL_MS,
    CacheKey,
    CacheStatistics,
    DecisionCache,
    PolicyService,
    PolicyStatistics,
    ProvideEngine,
)
from outrelay.relay.policy.file import (
    PolicyDocument,
    PolicyFileError,
    load_policy_document,
    load_policy_file,
    parse_policy,
    parse_policy_document,
    policy_to_obj,
)
from outrelay.relay.policy.matching import PolicyEngine, match_glob
from outrelay.relay.policy.model import (
    NO_MATCHING_PROVIDE_RULE,
    NO_MATCHING_RULE,
    PROVIDE_OPEN,
    Decision,
    P2PMode,
    PolicyResult,
    ProvideResult,
    ProvideRule,
    RelayMode,
    Rule,
    combine_p2p,
    provider_pattern_tenant,
)

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
