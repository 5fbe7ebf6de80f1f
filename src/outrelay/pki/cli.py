"""``outrelay pki``: create a development CA, relay and agent certificates.

The umbrella CLI (``outrelay.cli``) calls :func:`add_pki_commands` on its
sub-parser set and dispatches to :func:`run_pki`. :func:`main` is a standalone
entry point with the same syntax (``python -m outrelay.pki.cli pki dev --out DIR``).

Errors (bad labels, missing CA files, files that already exist, I/O errors)
print one line on stderr and return exit status 1; argparse usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from outrelay.pki.files import (
    PkiError,
    ensure_private_dir,
    load_ca,
    refuse_existing,
    write_file_atomic,
    write_identity,
)
from outrelay.pki.issue import Issued, create_ca, issue_agent, issue_relay
from outrelay.pki.k8s import URI_ANNOTATION, secret_yaml, validate_secret_name
from outrelay.pki.verify import first_uri_san

__all__ = ["add_pki_commands", "main", "run_pki"]

_CA_DAYS = 3650
_LEAF_DAYS = 365
_DEV_AGENTS = ("agent-a", "agent-b")

_LAYOUT = """\
layout written by 'pki dev --out DIR' (other subcommands write a subset):
  DIR/ca.crt, DIR/ca.key            dev CA; ca.crt is the --ca bundle of relays and agents
  DIR/relay.crt, DIR/relay.key      relay leaf: outrelay://<region>/relay/relay-1,
                                    DNS localhost, IP 127.0.0.1 and ::1,
                                    EKU serverAuth + clientAuth
  DIR/agent-a.crt, DIR/agent-a.key  agent leaves: outrelay://<tenant>/agent/<uuid4>,
  DIR/agent-b.crt, DIR/agent-b.key  DNS localhost, EKU clientAuth + serverAuth
  DIR/identities.json               {"ca": {...}, "relay": {"uri", "cert", "key", ...},
                                     "agents": [{"name", "uri", "cert", "key"}, ...]}
                                    with absolute paths

Keys are ECDSA P-256 (PEM PKCS#8, unencrypted, mode 0600); certificates are
PEM with the identity URI as the first URI SAN. DIR is created with mode 0700.
Existing files are never overwritten unless --force is given."""


def add_pki_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``pki`` command and its subcommands.

    The ``pki`` parser sets ``func=run_pki`` as a default, so a caller may
    dispatch with ``args.func(args)``.

    Args:
        subparsers: The umbrella parser's ``add_subparsers()`` result.
    """
    fmt = argparse.RawDescriptionHelpFormatter
    pki = subparsers.add_parser(
        "pki",
        help="create a dev CA and relay/agent certificates",
        description="Create a development PKI: a CA, relay and agent certificates "
        "whose first URI SAN is their outrelay:// identity.",
        epilog=_LAYOUT,
        formatter_class=fmt,
    )
    pki.set_defaults(func=run_pki)
    sub = pki.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    dev = sub.add_parser(
        "dev",
        help="write a CA, a relay and two agents in one go",
        description="Write a complete dev PKI: CA, one relay, two agents, identities.json.",
        epilog=_LAYOUT,
        formatter_class=fmt,
    )
    dev.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    dev.add_argument("--tenant", default="acme", help="agent URI host (default: %(default)s)")
    dev.add_argument("--region", default="local", help="relay URI host (default: %(default)s)")
    _add_days(dev, f"leaf validity in days (default: {_LEAF_DAYS}; the CA gets {_CA_DAYS})")
    dev.add_argument(
        "--k8s-secret",
        type=_secret_name,
        metavar="NAME",
        help="also print Kubernetes Secrets (type kubernetes.io/tls, keys tls.crt, tls.key, "
        "ca.crt) on stdout: NAME-relay, NAME-agent-a, NAME-agent-b, each annotated with "
        f"{URI_ANNOTATION}; the summary then goes to stderr, so "
        "'... --k8s-secret outrelay | kubectl apply -n outrelay -f -' works",
    )
    dev.add_argument(
        "--k8s-namespace",
        type=_secret_name,
        metavar="NS",
        help="with --k8s-secret: metadata.namespace of the Secrets (default: none, "
        "kubectl -n decides)",
    )
    _add_force(dev)

    ca = sub.add_parser(
        "ca",
        help="write DIR/ca.crt and DIR/ca.key",
        description="Create a self-signed CA (ECDSA P-256, CA:TRUE pathLen:0).",
        epilog=_LAYOUT,
        formatter_class=fmt,
    )
    ca.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    ca.add_argument("--cn", default="OutRelay Dev CA", help="CA common name (default: %(default)s)")
    _add_days(ca, f"validity in days (default: {_CA_DAYS})")
    _add_force(ca)

    relay = sub.add_parser(
        "relay",
        help="issue a relay certificate from an existing CA",
        description="Issue a relay leaf outrelay://REGION/relay/ID "
        "(EKU serverAuth + clientAuth, for inter-relay dials too).",
        epilog=_LAYOUT,
        formatter_class=fmt,
    )
    _add_ca_dir(relay)
    relay.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    relay.add_argument("--region", required=True, help="relay URI host, a DNS label")
    relay.add_argument("--id", dest="relay_id", required=True, help="relay id, a DNS label")
    relay.add_argument(
        "--dns",
        action="append",
        metavar="NAME",
        help="DNS SAN, repeatable (default: localhost)",
    )
    relay.add_argument(
        "--ip",
        action="append",
        metavar="IP",
        help="IP SAN, repeatable (default: 127.0.0.1 and ::1)",
    )
    relay.add_argument("--name", default="relay", help="file base name (default: %(default)s)")
    _add_days(relay, f"validity in days (default: {_LEAF_DAYS})")
    _add_force(relay)

    agent = sub.add_parser(
        "agent",
        help="issue an agent certificate from an existing CA",
        description="Issue an agent leaf outrelay://TENANT/agent/UUID "
        "(EKU clientAuth + serverAuth, DNS localhost) and print its URI.",
        epilog=_LAYOUT,
        formatter_class=fmt,
    )
    _add_ca_dir(agent)
    agent.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    agent.add_argument("--tenant", required=True, help="agent URI host, a DNS label")
    agent.add_argument("--uuid", dest="agent_uuid", help="agent UUID (default: a random UUID4)")
    agent.add_argument("--name", default="agent", help="file base name (default: %(default)s)")
    _add_days(agent, f"validity in days (default: {_LEAF_DAYS})")
    _add_force(agent)


def run_pki(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run the ``pki`` subcommand selected in ``args``.

    Args:
        args: Parsed arguments from a parser set up by :func:`add_pki_commands`.
        out: Where to print results (default: ``sys.stdout``). Errors always
            go to ``sys.stderr``.

    Returns:
        The exit status: 0 on success, 1 on any error (after printing
        ``outrelay pki: error: <message>`` on stderr).
    """
    stream = out if out is not None else sys.stdout
    handlers: dict[str, Callable[[argparse.Namespace, TextIO], None]] = {
        "dev": _cmd_dev,
        "ca": _cmd_ca,
        "relay": _cmd_relay,
        "agent": _cmd_agent,
    }
    try:
        handlers[args.pki_command](args, stream)
    except (PkiError, ValueError, OSError) as exc:  # FileExistsError is an OSError
        print(f"outrelay pki: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``outrelay pki ...`` without the umbrella CLI.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status (argparse exits 2 itself on usage errors).
    """
    parser = argparse.ArgumentParser(prog="outrelay", description="OutRelay tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_pki_commands(subparsers)
    args = parser.parse_args(argv)
    return run_pki(args)


# --------------------------------------------------------------------------- subcommands


def _cmd_dev(args: argparse.Namespace, out: TextIO) -> None:
    if args.k8s_namespace is not None and args.k8s_secret is None:
        raise ValueError("--k8s-namespace needs --k8s-secret")
    leaf_days = args.days if args.days is not None else _LEAF_DAYS
    directory: Path = args.out
    # Issue everything first: bad labels or days fail before anything is written.
    ca = create_ca(days=max(_CA_DAYS, leaf_days))
    relay = issue_relay(ca, region=args.region, days=leaf_days)
    agents = [(name, *issue_agent(ca, tenant=args.tenant, days=leaf_days)) for name in _DEV_AGENTS]

    names = ["ca", "relay", *_DEV_AGENTS]
    targets = [directory / f"{n}.{ext}" for n in names for ext in ("crt", "key")]
    manifest_path = directory / "identities.json"
    if not args.force:
        refuse_existing([*targets, manifest_path])

    ensure_private_dir(directory)
    base = directory.resolve()
    write_identity(directory, "ca", ca, force=args.force)
    write_identity(directory, "relay", relay, force=args.force)
    for name, issued, _uri in agents:
        write_identity(directory, name, issued, force=args.force)

    relay_uri = _uri_of(relay)
    manifest = {
        "version": 1,
        "dir": str(base),
        "tenant": args.tenant,
        "region": args.region,
        "ca": {
            "cert": str(base / "ca.crt"),
            "key": str(base / "ca.key"),
            "subject": ca.cert.subject.rfc4514_string(),
            "not_after": ca.cert.not_valid_after_utc.isoformat(),
        },
        "relay": {
            "name": "relay",
            "uri": relay_uri,
            "cert": str(base / "relay.crt"),
            "key": str(base / "relay.key"),
            "server_name": "localhost",
            "not_after": relay.cert.not_valid_after_utc.isoformat(),
        },
        "agents": [
            {
                "name": name,
                "uri": uri,
                "cert": str(base / f"{name}.crt"),
                "key": str(base / f"{name}.key"),
                "not_after": issued.cert.not_valid_after_utc.isoformat(),
            }
            for name, issued, uri in agents
        ],
    }
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    write_file_atomic(manifest_path, data, mode=0o644, force=args.force)

    if args.k8s_secret is not None:
        _print_secrets(args.k8s_secret, args.k8s_namespace, ca, relay, agents, out)
        out = sys.stderr  # the YAML alone on stdout: it can be piped to kubectl
    ca_days = max(_CA_DAYS, leaf_days)
    print(f"Dev PKI written to {base} (CA {ca_days} days, leaves {leaf_days} days).", file=out)
    print(f"Agent identities (tenant {args.tenant}):", file=out)
    for _name, _issued, uri in agents:
        print(uri, file=out)
    print("Files:", file=out)
    print("  ca.crt ca.key              dev CA (--ca ca.crt; keep ca.key private)", file=out)
    print(f"  relay.crt relay.key        {relay_uri} (DNS localhost, IP 127.0.0.1, ::1)", file=out)
    for name, _issued, uri in agents:
        print(f"  {name}.crt {name}.key    {uri}", file=out)
    print("  identities.json            the above as JSON", file=out)
    print("Try:", file=out)
    print(
        f"  outrelay-relay --cert {base}/relay.crt --key {base}/relay.key --ca {base}/ca.crt",
        file=out,
    )
    first_name, _issued, first_uri = agents[0]
    print(
        f"  outrelay-agent --cert {base}/{first_name}.crt --key {base}/{first_name}.key "
        f"--ca {base}/ca.crt --uri {first_uri} ...",
        file=out,
    )


def _print_secrets(
    prefix: str,
    namespace: str | None,
    ca: Issued,
    relay: Issued,
    agents: Sequence[tuple[str, Issued, str]],
    out: TextIO,
) -> None:
    """Print one Secret per identity, as a multi-document YAML stream."""
    identities = [("relay", relay, _uri_of(relay))] + [(n, i, u) for n, i, u in agents]
    docs = [
        secret_yaml(
            f"{prefix}-{name}",
            cert_pem=issued.cert_pem(),
            key_pem=issued.key_pem(),
            ca_pem=ca.cert_pem(),
            namespace=namespace,
            annotations={URI_ANNOTATION: uri},
        )
        for name, issued, uri in identities
    ]
    out.write("".join(f"---\n{doc}" for doc in docs))


def _cmd_ca(args: argparse.Namespace, out: TextIO) -> None:
    days = args.days if args.days is not None else _CA_DAYS
    ca = create_ca(args.cn, days=days)
    cert_path, key_path = write_identity(args.out, "ca", ca, force=args.force)
    print(f"CA {ca.cert.subject.rfc4514_string()} valid {days} days", file=out)
    print(f"  certificate: {cert_path}", file=out)
    print(f"  key:         {key_path} (keep private)", file=out)


def _cmd_relay(args: argparse.Namespace, out: TextIO) -> None:
    ca = load_ca(args.ca_dir)
    relay = issue_relay(
        ca,
        region=args.region,
        relay_id=args.relay_id,
        dns_names=args.dns if args.dns is not None else ("localhost",),
        ip_addresses=args.ip if args.ip is not None else ("127.0.0.1", "::1"),
        days=args.days if args.days is not None else _LEAF_DAYS,
    )
    _print_leaf(out, _uri_of(relay), *write_identity(args.out, args.name, relay, force=args.force))


def _cmd_agent(args: argparse.Namespace, out: TextIO) -> None:
    ca = load_ca(args.ca_dir)
    agent, uri = issue_agent(
        ca,
        tenant=args.tenant,
        agent_id=args.agent_uuid,
        days=args.days if args.days is not None else _LEAF_DAYS,
    )
    _print_leaf(out, uri, *write_identity(args.out, args.name, agent, force=args.force))


# --------------------------------------------------------------------------- helpers


def _add_days(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--days", type=_positive_int, metavar="N", help=help_text)


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="overwrite existing certificates and keys"
    )


def _add_ca_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="directory holding ca.crt and ca.key (from 'pki ca' or 'pki dev')",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _secret_name(text: str) -> str:
    # Longest suffix appended is "-agent-a" / "-agent-b" (8 characters).
    try:
        return validate_secret_name(text + "-agent-a")[: -len("-agent-a")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("-agent-a'", "'")) from None


def _uri_of(issued: Issued) -> str:
    uri = first_uri_san(issued.cert)
    assert uri is not None  # issue_relay/issue_agent always write one
    return uri


def _print_leaf(out: TextIO, uri: str, cert_path: Path, key_path: Path) -> None:
    print(uri, file=out)
    print(f"  certificate: {cert_path}", file=out)
    print(f"  key:         {key_path}", file=out)


if __name__ == "__main__":
    raise SystemExit(main())
