"""``outrelay policy list|add|remove``: the registry's policy rules (issue 18).

With ``--registry etcd://...`` relays take their rules from etcd (:mod:`.policy`): one key per
rule, ``<prefix>policy/<tenant>/<rule_id>``, holding the rule as one policy file rule
(:mod:`outrelay.relay.policy.file`). Every relay of the mesh watches them, so a change applies
everywhere at once; a tenant's first rule switches enforcement on for it.

* ``list [--tenant T]``: one JSON object per line, ``{"tenant": T, <the rule's fields>}``
  (canonical spellings); an entry that is not a valid rule is reported on stderr.
* ``add --tenant T`` with ``--rule-json '{...}'`` or the rule's fields as flags
  (``--caller --target [--method] --decision [--expires | --expires-unix-ms] [--p2p-mode]
  [--relay-mode]``, or a provide rule's ``--provider --service --decision``); ``--id``
  defaults to a fresh ``rule-<hex>``. The rule is validated exactly as the relays will, then
  written (replacing a rule of the same id, which keeps its place); prints the id.
* ``remove --tenant T ID``: deletes the rule.

Exit codes: 0 done; 2 bad input (flags, rule); 1 etcd unreachable within ``--timeout``
(default 5 s), or ``remove`` of a rule that does not exist.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from typing import Any, TextIO

from outrelay.relay.mesh.cache import (
    DEFAULT_PREFIX,
    KeyLayout,
    RegistryError,
    decode_component,
    parse_registry_url,
    parse_rule,
)
from outrelay.relay.policy import ProvideRule, policy_to_obj

__all__ = ["add_policy_commands", "run_policy"]

DEFAULT_TIMEOUT = 5.0


def add_policy_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``policy`` and its subcommands on the umbrella parser (``func=run_policy``)."""
    policy = subparsers.add_parser(
        "policy",
        help="list, add or remove the policy rules of a relay mesh (in etcd)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    policy.set_defaults(func=run_policy)
    sub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    def common(p: argparse.ArgumentParser, *, tenant_required: bool) -> None:
        p.add_argument(
            "--registry", required=True, metavar="URL", help="etcd://host:port[,host:port...]"
        )
        p.add_argument(
            "--registry-prefix",
            default=DEFAULT_PREFIX,
            metavar="PREFIX",
            help="key prefix in etcd (default %(default)s)",
        )
        p.add_argument("--tenant", required=tenant_required, default="", help="the rules' tenant")
        p.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_TIMEOUT,
            metavar="SECONDS",
            help="give up on etcd after this long (default %(default)s)",
        )

    listing = sub.add_parser("list", help="print the rules as JSON lines")
    common(listing, tenant_required=False)

    add = sub.add_parser("add", help="add (or replace) one rule; prints its id")
    common(add, tenant_required=True)
    add.add_argument("--rule-json", default="", metavar="JSON", help="the whole rule object")
    add.add_argument("--id", default="", help="rule id (default: rule-<random hex>)")
    for name in ("caller", "target", "method", "decision", "expires", "p2p-mode", "relay-mode"):
        add.add_argument(f"--{name}", default=None)
    add.add_argument("--expires-unix-ms", type=int, default=None)
    add.add_argument("--provider", default=None, help="provide rule: agent URI glob")
    add.add_argument("--service", default=None, help="provide rule: service name glob")

    remove = sub.add_parser("remove", help="delete one rule by id")
    common(remove, tenant_required=True)
    remove.add_argument("rule_id", metavar="ID")


class _BadInput(ValueError):
    """Exit 2."""


def run_policy(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one ``outrelay policy`` subcommand; returns the exit status."""
    stdout = out if out is not None else sys.stdout
    try:
        endpoints = parse_registry_url(args.registry)
        layout = KeyLayout(args.registry_prefix)
        if not args.timeout > 0:
            raise _BadInput("--timeout must be > 0")
        if args.policy_command != "list" and not args.tenant:
            raise _BadInput("--tenant must not be empty")
        rule = _rule_from_args(args) if args.policy_command == "add" else None
    except ValueError as exc:
        print(f"outrelay policy: {exc}", file=sys.stderr)
        return 2
    from outrelay.relay.mesh.etcd import EtcdStore  # grpc is loaded only here

    store = EtcdStore(endpoints, args.timeout)
    try:
        if args.policy_command == "list":
            return asyncio.run(_list(store, layout, args.tenant, stdout))
        if args.policy_command == "add":
            assert rule is not None
            key = layout.policy(args.tenant, rule["id"])
            asyncio.run(store.put(key, json.dumps(rule, separators=(",", ":")).encode()))
            print(rule["id"], file=stdout)
            return 0
        deleted = asyncio.run(store.delete(layout.policy(args.tenant, args.rule_id)))
    except RegistryError as exc:
        print(f"outrelay policy: {exc}", file=sys.stderr)
        return 1
    if not deleted:
        print(
            f"outrelay policy: no rule {args.rule_id!r} in tenant {args.tenant!r}",
            file=sys.stderr,
        )
        return 1
    return 0


def _rule_from_args(args: argparse.Namespace) -> dict[str, Any]:
    fields = {
        "caller": args.caller,
        "target": args.target,
        "method": args.method,
        "decision": args.decision,
        "expires": args.expires,
        "expires_unix_ms": args.expires_unix_ms,
        "p2p_mode": args.p2p_mode,
        "relay_mode": args.relay_mode,
        "provider": args.provider,
        "service": args.service,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if args.rule_json:
        if given:
            raise _BadInput(f"--rule-json and --{next(iter(given)).replace('_', '-')} together")
        try:
            obj = json.loads(args.rule_json)
        except ValueError as exc:
            raise _BadInput(f"--rule-json is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise _BadInput("--rule-json must be a JSON object")
        if args.id:
            obj["id"] = args.id
    else:
        if not given:
            raise _BadInput("give the rule as --rule-json or as flags (--caller, --target, ...)")
        obj = dict(given)
        obj["id"] = args.id
    if not obj.get("id"):
        obj["id"] = f"rule-{secrets.token_hex(4)}"
    rule = parse_rule(obj, args.tenant)  # ValueError: exit 2
    if isinstance(rule, ProvideRule):
        return policy_to_obj([], [rule])["rules"][0]  # type: ignore[no-any-return]
    return policy_to_obj([rule])["rules"][0]  # type: ignore[no-any-return]


async def _list(store: Any, layout: KeyLayout, tenant: str, out: TextIO) -> int:
    prefix = layout.policy_tenant(tenant) if tenant else layout.policy_all
    rows = await store.get_prefix(prefix)
    for raw_key, value in sorted(rows):
        key = raw_key.decode("utf-8", "replace")
        parts = key[len(layout.policy_all) :].split("/")
        if len(parts) != 2:
            print(f"outrelay policy: skipped key {key!r}: not <tenant>/<id>", file=sys.stderr)
            continue
        rule_tenant = decode_component(parts[0])
        try:
            rule = parse_rule(json.loads(value.decode("utf-8")), rule_tenant)
        except ValueError as exc:
            print(f"outrelay policy: skipped key {key!r}: {exc}", file=sys.stderr)
            continue
        if isinstance(rule, ProvideRule):
            obj = policy_to_obj([], [rule])["rules"][0]
        else:
            obj = policy_to_obj([rule])["rules"][0]
        print(json.dumps({"tenant": rule_tenant, **obj}, separators=(",", ":")), file=out)
    return 0
