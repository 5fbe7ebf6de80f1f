"""Small helpers shared by the command-line entry points."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["go_style_argv", "parse_host_port"]


def go_style_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept Go ``flag`` spellings: ``-relay x`` and ``-relay=x`` mean ``--relay``.

    Only single-dash words that name one of the parser's long options are
    rewritten; everything else is left for argparse to judge. Parsing stops
    rewriting after ``--``.
    """
    long_options = {
        opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")
    }
    out: list[str] = []
    rewriting = True
    for word in argv:
        if word == "--":
            rewriting = False
        if rewriting and word.startswith("-") and not word.startswith("--") and len(word) > 2:
            name = "-" + word.split("=", 1)[0]
            if name in long_options:
                word = "-" + word
        out.append(word)
    return out


def parse_host_port(value: str, *, what: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too).

    Raises:
        ValueError: with a message naming ``what`` and the bad value.
    """
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {value!r} is not host:port")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{what} {value!r} has no host")
    return host, int(port)
