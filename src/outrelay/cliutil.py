"""Small helpers shared by the command-line entry points.

Every bad flag value exits 2 with the reason on one line, in the log format
the command line asked for (``--log-format json``: a JSON object, no usage
text), on ``outrelay-agent`` and ``outrelay-relay`` alike.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from outrelay.observe import LOG_FORMATS, LOG_LEVELS, setup_logging
from outrelay.pki.reload import FileWatch

__all__ = [
    "FlagError",
    "FlagParser",
    "add_log_flags",
    "add_quic_datagram_flag",
    "apply_quic_datagram_flag",
    "duration",
    "flag_error",
    "go_style_argv",
    "parse_host_port",
]


class FlagError(Exception):
    """A missing or malformed flag: the command exits 2 with this message."""


class FlagParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` that raises :class:`FlagError`.

    argparse would print usage and the message as plain text and exit 2; the
    caller reports it with :func:`flag_error` instead, so that with
    ``--log-format json`` the line is JSON too.
    """

    def error(self, message: str) -> NoReturn:
        raise FlagError(message)


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` and ``--log-level``; any other value is a flag error (exit 2)."""
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text or json; json makes every stderr line a JSON object (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=tuple(LOG_LEVELS),
        help="debug, info, warn or error; library lines (aioquic, qh3, asyncio) show from "
        "warn, or from debug with debug (default %(default)s)",
    )


DATAGRAM_LIMITS = (1350, 16384)
"""What ``--quic-datagram-max`` accepts: from the size every connection starts with
to aioquic's largest (it writes STREAM and CRYPTO frame lengths as 2-byte varints,
at most 16,383: a 24,000-byte datagram was refused by its peer as "Unknown frame
type")."""


def _datagram_size(text: str) -> int:
    low, high = DATAGRAM_LIMITS
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high} bytes")
    return value


def add_quic_datagram_flag(parser: argparse.ArgumentParser) -> None:
    """``--quic-datagram-max``: the cap of :mod:`outrelay.transport.quic.path_mtu`."""
    from outrelay.transport.quic import settings

    parser.add_argument(
        "--quic-datagram-max",
        type=_datagram_size,
        default=settings.LARGE_DATAGRAM_MAX,
        metavar="BYTES",
        help="largest QUIC datagram sent where the kernel knows a jumbo path MTU "
        "(loopback, jumbo-frame LANs) and the peer allows it; ordinary 1,500-byte paths "
        f"always use {settings.MAX_DATAGRAM_SIZE}; {settings.MAX_DATAGRAM_SIZE} turns "
        "larger datagrams off (default %(default)s)",
    )


def apply_quic_datagram_flag(args: argparse.Namespace) -> None:
    """Make ``--quic-datagram-max`` the process's cap (read at every handshake)."""
    from outrelay.transport.quic import settings

    settings.LARGE_DATAGRAM_MAX = args.quic_datagram_max


def duration(text: str) -> float:
    """argparse ``type`` for a number of seconds: finite and not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite, non-negative number")
    return value


def flag_error(
    parser: argparse.ArgumentParser, argv: Sequence[str], message: str, logger: logging.Logger
) -> int:
    """Report a flag error on one line and return the exit code, 2.

    Logging is (re)configured here, since argparse may have failed before it
    was: the format is read from ``argv`` as well as it can be, text being the
    fallback. In text format the usage line follows, as argparse would print it.
    """
    fmt = _requested_format(argv)
    setup_logging(fmt, "info")
    logger.error(message)
    if fmt == "text":
        parser.print_usage(sys.stderr)
    return 2


def _requested_format(argv: Sequence[str]) -> str:
    """The ``--log-format`` value in ``argv`` if it is a valid one, else ``text``."""
    value = ""
    for i, word in enumerate(argv):
        if word == "--":
            break
        name, sep, rest = word.partition("=")
        if name in ("--log-format", "-log-format"):
            value = rest if sep else (argv[i + 1] if i + 1 < len(argv) else "")
    return value if value in LOG_FORMATS else "text"


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


def parse_host_port(
    value: str, *, what: str = "address", port_zero: bool = True
) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too).

    Args:
        port_zero: port 0 is allowed (an address to listen on: any free port);
            false for an address to dial.

    Raises:
        ValueError: with a message naming ``what`` and the bad value.
    """
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {value!r} is not host:port")
    if int(port) == 0 and not port_zero:
        raise ValueError(f"{what} {value!r}: port 0 cannot be dialled")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{what} {value!r} has no host")
    return host, int(port)


def add_cert_watch_flags(p: argparse.ArgumentParser) -> None:
    """``--watch-certs`` and its interval, shared by the agent and the relay."""
    p.add_argument(
        "--watch-certs",
        action="store_true",
        help="poll --cert, --key and --ca and reload them when they change (target, inode, "
        "size, mtime or content: Kubernetes Secret volumes swap files through symlinks), "
        "exactly as SIGHUP does; off by default",
    )
    p.add_argument(
        "--watch-certs-interval",
        type=duration,
        default=5.0,
        metavar="SECONDS",
        help="with --watch-certs: how often the files are polled (default %(default)s)",
    )


async def watch_cert_files(
    paths: Sequence[str], interval: float, on_change: Callable[[str], object]
) -> None:
    """Call ``on_change("file change")`` whenever one of ``paths`` changes; runs until cancelled.

    Polling (no inotify dependency) a few files every few seconds costs nothing
    measurable; hashing happens in a worker thread so the loop never blocks on disk.
    """
    watch = await asyncio.to_thread(FileWatch, paths)
    while True:
        await asyncio.sleep(max(interval, 0.2))
        if await asyncio.to_thread(watch.changed):
            on_change("file change")
