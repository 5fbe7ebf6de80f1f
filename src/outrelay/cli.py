"""``outrelay``: the umbrella command (``pki``, ``policy``, ``demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from outrelay import __version__
from outrelay.pki.cli import add_pki_commands

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outrelay",
        description=(
            "OutRelay: services talk across clouds, clusters and NATs with no inbound port. "
            "Try `outrelay demo` first."
        ),
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_pki_commands(sub)
    from outrelay.relay.mesh.policycli import add_policy_commands

    add_policy_commands(sub)
    from outrelay.demo import add_demo_command

    add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    result: int = func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
