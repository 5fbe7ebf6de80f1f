"""``--config FILE``: a TOML file equivalent to the command-line flags.

The file is turned into the words argparse would have got, and argparse judges
them: every flag is configurable the day it is added, and a bad value in the
file gets the flag's own error. Keys are the long flag names without the two
dashes (``resume-window = 30``); a repeatable flag takes an array, a switch
true or false.

Precedence, highest first: a flag on the command line, an environment
variable (:data:`ENV_FLAGS`, the identity paths, as sidecars are configured),
the config file (``--config`` or ``$OUTRELAY_CONFIG``), the flag's default. A
repeatable flag given on the command line replaces the file's list rather than
adding to it.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence

from outrelay.cliutil import FlagError

__all__ = ["CONFIG_ENV", "ENV_FLAGS", "add_config_flag", "config_argv"]

CONFIG_ENV = "OUTRELAY_CONFIG"
"""The config file's path when ``--config`` is not given."""

ENV_FLAGS: Mapping[str, str] = {
    "OUTRELAY_CERT": "--cert",
    "OUTRELAY_KEY": "--key",
    "OUTRELAY_CA": "--ca",
}
"""Environment variables that stand for a flag (when set and not empty)."""

_EPILOG = f"""
configuration file and environment:
  --config FILE (or ${CONFIG_ENV}) reads a TOML file whose keys are the long flag
  names without the dashes; a repeatable flag takes an array, a switch true/false:
    cert = "pki/agent.crt"
    log-format = "json"
  ${", $".join(ENV_FLAGS)} give {", ".join(ENV_FLAGS.values())}.
  Precedence: command-line flag > environment variable > config file > default.
"""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and say in ``--help`` how the file and the environment apply."""
    parser.add_argument(
        "--config",
        default="",
        metavar="FILE",
        help=f"TOML file of flag values (keys: the long flag names); flags on the command "
        f"line override it (default ${CONFIG_ENV}, else none)",
    )
    parser.epilog = (parser.epilog or "") + _EPILOG


class _Unset(list[object]):
    """A namespace value argparse cannot produce: still there means "not on the command line".

    A list, because an ``append`` action copies the value it finds and appends.
    """


def config_argv(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The words to parse: the config file's and the environment's, then ``argv``'s.

    Words for a flag that a higher-precedence source also gives are left out,
    so the last one wins for single flags and repeatable flags are replaced.

    Raises:
        FlagError: the command line is bad, the file cannot be read, is not
            TOML, names an unknown key or has a bad value (argparse's message,
            prefixed with the file's name). The caller exits 2.
    """
    env = os.environ if environ is None else environ
    on_command_line, config_path = _command_line_dests(parser, argv)
    if not config_path:
        config_path = env.get(CONFIG_ENV, "")

    env_words: dict[str, list[str]] = {}
    for name, flag in ENV_FLAGS.items():
        action = _action_for(parser, flag)
        value = env.get(name, "")
        if action is None or not value or action.dest in on_command_line:
            continue
        env_words[action.dest] = [f"{flag}={value}"]

    file_words: list[str] = []
    if config_path:
        per_dest = _file_words(parser, config_path)
        _validate(parser, config_path, [w for words in per_dest.values() for w in words])
        for dest, words in per_dest.items():
            if dest not in on_command_line and dest not in env_words:
                file_words.extend(words)
    return file_words + [w for words in env_words.values() for w in words] + list(argv)


def _command_line_dests(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[set[str], str]:
    """Which destinations ``argv`` sets, and its ``--config`` value ("" if none)."""
    markers: dict[str, _Unset] = {}
    namespace = argparse.Namespace()
    for action in parser._actions:
        if action.dest is not argparse.SUPPRESS:
            markers[action.dest] = _Unset()
            setattr(namespace, action.dest, markers[action.dest])
    parsed = parser.parse_args(list(argv), namespace=namespace)
    given = {dest for dest, marker in markers.items() if getattr(parsed, dest) is not marker}
    config = getattr(parsed, "config", "") if "config" in given else ""
    return given, str(config)


def _action_for(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    for action in parser._actions:
        if flag in action.option_strings:
            return action
    return None


def _configurable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key -> action for every long option a file may set."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if action.dest in ("config", "version"):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                keys[option[2:]] = action
    return keys


def _file_words(parser: argparse.ArgumentParser, path: str) -> dict[str, list[str]]:
    """The file's keys as flag words, grouped by destination."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise FlagError(f"config {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FlagError(f"config {path}: not valid TOML: {exc}") from None
    keys = _configurable(parser)
    out: dict[str, list[str]] = {}
    for key, value in document.items():
        action = keys.get(key)
        if action is None:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FlagError(f"config {path}: unknown key {key!r}{hint}")
        out.setdefault(action.dest, []).extend(_words(path, key, action, value))
    return out


def _words(path: str, key: str, action: argparse.Action, value: object) -> list[str]:
    """One key's value as the words argparse would get on the command line."""
    flag = f"--{key}"
    where = f"config {path}: {key}"
    if action.nargs == 0:  # a switch: store_true, store_false, store_const, count
        if not isinstance(value, bool):
            raise FlagError(f"{where}: expected true or false, not {value!r}")
        wanted = value is False if isinstance(action, argparse._StoreFalseAction) else value
        return [flag] if wanted else []
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [f"{flag}={_scalar(where, item)}" for item in items]
    if isinstance(value, list):
        if action.nargs in ("*", "+") or isinstance(action.nargs, int):
            return [flag, *(_scalar(where, item) for item in value)]
        raise FlagError(
            f"{where}: takes one value, not an array (a comma-separated list is one string)"
        )
    return [f"{flag}={_scalar(where, value)}"]


def _scalar(where: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FlagError(f"{where}: expected a string or a number, not {value!r}")
    return value if isinstance(value, str) else str(value)


def _validate(parser: argparse.ArgumentParser, path: str, words: list[str]) -> None:
    """Parse the file's words alone so that a bad value is reported as the file's."""
    try:
        parser.parse_args(words, namespace=argparse.Namespace())
    except FlagError as exc:
        raise FlagError(f"config {path}: {exc}") from None
