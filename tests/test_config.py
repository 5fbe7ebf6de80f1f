"""``--config FILE`` and the identity environment variables, against the real parsers.

The file becomes argparse words, so the tests check what the parsed namespace
holds: the precedence (flag > environment > file > default), repeatable flags
replaced rather than merged, switches, and that every bad file is a FlagError
(exit 2) naming the file and the key.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from outrelay.agent.cli import build_parser as agent_parser
from outrelay.agent.cli import main as agent_main
from outrelay.cliutil import FlagError
from outrelay.config import config_argv
from outrelay.relay.cli import build_parser as relay_parser
from outrelay.relay.cli import main as relay_main


def _parse(
    parser: argparse.ArgumentParser, argv: list[str], env: dict[str, str] | None = None
) -> argparse.Namespace:
    return parser.parse_args(config_argv(parser, argv, env or {}))


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "outrelay.toml"
    path.write_text(text)
    return str(path)


AGENT_TOML = """
relay = "127.0.0.1:4443"
uri = "outrelay://acme/agent/1"
cert = "file.crt"
expose = ["web=127.0.0.1:8080", "db=127.0.0.1:5432"]
resume-window = 12
shutdown-grace = 2.5
transport = "quic"
p2p-reference-wire = true
quic-datagram-max = 1350
log-format = "json"
"""


def test_every_kind_of_value_reaches_the_namespace(tmp_path: Path) -> None:
    args = _parse(agent_parser(), ["--config", _write(tmp_path, AGENT_TOML)])
    assert args.relay == "127.0.0.1:4443"
    assert args.uri == "outrelay://acme/agent/1"
    assert args.expose == ["web=127.0.0.1:8080", "db=127.0.0.1:5432"]
    assert args.resume_window == 12.0
    assert args.shutdown_grace == 2.5
    assert args.transport == "quic"
    assert args.p2p_reference_wire is True
    assert args.quic_datagram_max == 1350
    assert args.log_format == "json"
    assert args.consume == []  # untouched flags keep their defaults
    assert args.server_name == "localhost"


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 'cert = "file.crt"\nkey = "file.key"\nca = "file.ca"\n')
    env = {"OUTRELAY_CERT": "env.crt", "OUTRELAY_KEY": "env.key"}
    args = _parse(relay_parser(), ["--config", path, "--cert", "flag.crt"], env)
    assert (args.cert, args.key, args.ca) == ("flag.crt", "env.key", "file.ca")


def test_empty_environment_variable_is_not_set() -> None:
    args = _parse(relay_parser(), [], {"OUTRELAY_CA": ""})
    assert args.ca == ""


def test_config_path_from_environment_and_flag_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "env.toml"
    env_file.write_text('region = "from-env-file"\n')
    flag_file = tmp_path / "flag.toml"
    flag_file.write_text('region = "from-flag-file"\n')
    env = {"OUTRELAY_CONFIG": str(env_file)}
    assert _parse(relay_parser(), [], env).region == "from-env-file"
    assert _parse(relay_parser(), ["--config", str(flag_file)], env).region == "from-flag-file"


def test_repeatable_flag_on_the_command_line_replaces_the_file_list(tmp_path: Path) -> None:
    path = _write(tmp_path, AGENT_TOML)
    args = _parse(agent_parser(), ["--config", path, "--expose", "x=127.0.0.1:1"])
    assert args.expose == ["x=127.0.0.1:1"]


def test_go_style_and_equals_spellings_count_as_given(tmp_path: Path) -> None:
    path = _write(tmp_path, 'region = "file"\n')
    args = _parse(relay_parser(), [f"--config={path}", "--region=flag"])
    assert args.region == "flag"


def test_false_switch_leaves_the_default(tmp_path: Path) -> None:
    path = _write(tmp_path, "p2p-reference-wire = false\n")
    assert _parse(agent_parser(), ["--config", path]).p2p_reference_wire is False


def test_a_single_value_for_a_repeatable_flag_is_one_item(tmp_path: Path) -> None:
    path = _write(tmp_path, 'expose = "web=127.0.0.1:80"\n')
    assert _parse(agent_parser(), ["--config", path]).expose == ["web=127.0.0.1:80"]


def test_value_starting_with_a_dash_is_a_value(tmp_path: Path) -> None:
    path = _write(tmp_path, 'region = "-eu"\n')
    assert _parse(relay_parser(), ["--config", path]).region == "-eu"


def test_a_flag_added_later_is_configurable_without_new_code(tmp_path: Path) -> None:
    parser = relay_parser()
    parser.add_argument("--made-up-later", default="")
    parser.add_argument("--made-up-switch", action="store_true")
    path = _write(tmp_path, 'made-up-later = "127.0.0.1:9901"\nmade-up-switch = true\n')
    args = _parse(parser, ["--config", path])
    assert (args.made_up_later, args.made_up_switch) == ("127.0.0.1:9901", True)


def test_the_admin_and_reload_flags_are_configurable(tmp_path: Path) -> None:
    path = _write(tmp_path, 'admin-listen = "127.0.0.1:9902"\nwatch-certs = true\n')
    args = _parse(relay_parser(), ["--config", path])
    assert (args.admin_listen, args.watch_certs) == ("127.0.0.1:9902", True)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('relya = "x"\n', "unknown key 'relya' (did you mean 'relay'?)"),
        ('config = "other.toml"\n', "unknown key 'config'"),
        ("version = true\n", "unknown key 'version'"),
        ('relay = "x"\nrelay = "y"\n', "not valid TOML: Cannot overwrite a value (at line 2"),
        ("relay = \n", "not valid TOML: Invalid value (at line 1, column 9)"),
        ('relay = ["127.0.0.1:1"]\n', "relay: takes one value, not an array"),
        ('p2p-reference-wire = "yes"\n', "p2p-reference-wire: expected true or false"),
        ("log-format = true\n", "log-format: expected a string or a number, not True"),
        ("[relay]\nx = 1\n", "relay: expected a string or a number"),
        ('transport = "udp"\n', "argument --transport: invalid choice: 'udp'"),
        ('resume-window = "soon"\n', "argument --resume-window: 'soon' is not a number of seconds"),
        ("resume-window = -1\n", "argument --resume-window: '-1' must be a finite"),
        ("quic-datagram-max = 70000\n", "70000 is not between 1350 and 16384 bytes"),
    ],
)
def test_bad_files_name_the_file_and_the_reason(tmp_path: Path, text: str, why: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(FlagError) as err:
        _parse(agent_parser(), ["--config", path])
    assert str(err.value).startswith(f"config {path}: "), str(err.value)
    assert why in str(err.value)


def test_missing_file_is_a_flag_error(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(FlagError, match=f"config {path}: cannot read it: No such file"):
        _parse(relay_parser(), ["--config", path])


@pytest.mark.parametrize("main", [agent_main, relay_main])
def test_main_exits_2_with_the_message(
    tmp_path: Path, main: Callable[[Sequence[str] | None], int], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "bogus = 1\n")
    assert main(["--config", path]) == 2
    assert f"config {path}: unknown key 'bogus'" in capsys.readouterr().err


def test_help_states_the_precedence(capsys: pytest.CaptureFixture[str]) -> None:
    for parser in (agent_parser(), relay_parser()):
        parser.print_help()
        out = capsys.readouterr().out
        assert "--config FILE" in out
        assert "command-line flag > environment variable > config file > default" in out
        assert "$OUTRELAY_CERT, $OUTRELAY_KEY, $OUTRELAY_CA give --cert, --key, --ca" in out
