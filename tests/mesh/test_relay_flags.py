"""The relay's registry flags: parsing, the config file, and their validation (no etcd)."""

from __future__ import annotations

from pathlib import Path

import pytest

from outrelay.config import config_argv
from outrelay.relay.cli import _registry_options
from outrelay.relay.cli import build_parser as relay_parser
from outrelay.relay.mesh.cache import DEFAULT_PREFIX, RegistryOptions, parse_registry_url


def parse(argv: list[str]) -> RegistryOptions | None:
    parser = relay_parser()
    return _registry_options(parser.parse_args(config_argv(parser, argv, {})))


def test_default_is_memory() -> None:
    assert parse([]) is None
    assert parse(["--registry", "memory"]) is None


def test_flags() -> None:
    got = parse(
        [
            "--registry", "etcd://127.0.0.1:2379,[::1]:2380,etcd-2:2381",
            "--registry-prefix", "/x/",
            "--registry-lease", "7",
            "--advertise", "relay-1.example:7443",
        ]
    )  # fmt: skip
    assert got == RegistryOptions(
        (("127.0.0.1", 2379), ("::1", 2380), ("etcd-2", 2381)), "/x/", 7, "relay-1.example:7443"
    )
    assert parse(["--registry", "etcd://h:1"]) == RegistryOptions((("h", 1),), DEFAULT_PREFIX, 5)


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        'registry = "etcd://10.0.0.1:2379"\nregistry-lease = 3\nadvertise = "10.1.1.1:7443"\n'
        'registry-prefix = "/p/"\n'
    )
    got = parse(["--config", str(path)])
    assert got == RegistryOptions((("10.0.0.1", 2379),), "/p/", 3, "10.1.1.1:7443")
    # A flag on the command line beats the file.
    assert parse(["--config", str(path), "--registry", "memory"]) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--registry", "etcd://"], "bad etcd endpoint"),
        (["--registry", "etcd://host"], "bad etcd endpoint"),
        (["--registry", "etcd://host:0"], "bad etcd port"),
        (["--registry", "etcd://host:99999"], "bad etcd port"),
        (["--registry", "http://host:1"], "etcd://"),
        (["--registry", "etcd://h:1", "--registry-prefix", "nope"], "prefix"),
        (["--registry", "etcd://h:1", "--registry-lease", "1"], "at least 2"),
        (["--registry", "etcd://h:1", "--advertise", "no-port"], "advertise"),
        (["--registry", "etcd://h:1", "--policy", "p.json"], "--policy"),
    ],
)
def test_bad_values(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_bad_values_exit_2(tmp_path: Path) -> None:
    from outrelay.relay.cli import main

    cert = tmp_path / "x.pem"
    cert.write_text("")
    common = ["--cert", str(cert), "--key", str(cert), "--ca", str(cert)]
    assert main([*common, "--registry", "etcd://nohost"]) == 2
    assert main([*common, "--registry", "etcd://h:1", "--policy", str(cert)]) == 2


def test_parse_registry_url_keeps_order() -> None:
    assert parse_registry_url("etcd://b:2,a:1") == [("b", 2), ("a", 1)]
