"""``outrelay policy list|add|remove`` against a real etcd (exit codes, bad input, timeouts)."""

from __future__ import annotations

import json
import time

import pytest
from etcd_cluster import EtcdCluster, free_ports

from outrelay.cli import main

_n = 0


@pytest.fixture
def reg(etcd_cluster: EtcdCluster) -> list[str]:
    global _n
    _n += 1
    return ["--registry", etcd_cluster.endpoints, "--registry-prefix", f"/pcli{_n}/"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_add_list_remove(reg: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "add", *reg, "--tenant", "acme", "--caller", "outrelay://acme/*",
        "--target", "web", "--decision", "allow",
    )  # fmt: skip
    assert code == 0 and out.strip().startswith("rule-")
    generated = out.strip()
    provide = {"provider": "outrelay://acme/agent/*", "service": "db", "decision": "deny"}
    code, out, _ = run(
        capsys, "add", *reg, "--tenant", "acme", "--id", "p1", "--rule-json", json.dumps(provide)
    )
    assert (code, out) == (0, "p1\n")
    code, out, _ = run(
        capsys, "add", *reg, "--tenant", "beta", "--id", "b", "--caller", "*", "--target", "*",
        "--decision", "deny", "--p2p-mode", "forbidden", "--expires", "2030-01-01T00:00:00Z",
    )  # fmt: skip
    assert code == 0
    code, out, _ = run(capsys, "list", *reg)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert {(r["tenant"], r["id"]) for r in rows} == {
        ("acme", generated),
        ("acme", "p1"),
        ("beta", "b"),
    }
    beta = next(r for r in rows if r["tenant"] == "beta")
    assert beta["p2p_mode"] == "forbidden" and beta["expires_unix_ms"] == 1893456000000
    code, out, _ = run(capsys, "list", *reg, "--tenant", "acme")
    assert {json.loads(line)["id"] for line in out.splitlines()} == {generated, "p1"}
    assert run(capsys, "remove", *reg, "--tenant", "acme", "p1")[0] == 0
    code, _, err = run(capsys, "remove", *reg, "--tenant", "acme", "p1")
    assert code == 1 and "no rule 'p1'" in err
    code, out, _ = run(capsys, "list", *reg, "--tenant", "acme")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [generated]


@pytest.mark.parametrize(
    "argv",
    [
        ["--tenant", "acme", "--caller", "x", "--target", "web", "--decision", "maybe"],
        ["--tenant", "acme", "--caller", "x", "--decision", "allow"],  # no target
        ["--tenant", "acme"],  # no rule at all
        ["--tenant", "acme", "--rule-json", "{not json"],
        ["--tenant", "acme", "--rule-json", "[1]"],
        ["--tenant", "acme", "--rule-json", '{"caller":"*","target":"*","decision":"allow","x":1}'],
        ["--tenant", "acme", "--rule-json", "{}", "--caller", "x"],
        [
            "--tenant",
            "beta",
            "--provider",
            "outrelay://acme/*",
            "--service",
            "s",
            "--decision",
            "allow",
        ],
        ["--tenant", "", "--caller", "*", "--target", "*", "--decision", "allow"],
        [
            "--tenant",
            "acme",
            "--caller",
            "*",
            "--target",
            "*",
            "--decision",
            "allow",
            "--timeout",
            "0",
        ],
    ],
)
def test_bad_input_exits_2_without_writing(
    reg: list[str], argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "add", *reg, *argv)
    assert code == 2 and out == "" and err.startswith("outrelay policy: ")
    assert run(capsys, "list", *reg) == (0, "", "")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["policy", "add", "--tenant", "acme"])  # --registry missing
    assert exc.value.code == 2
    code, _, err = run(capsys, "list", "--registry", "http://127.0.0.1:2379")
    assert code == 2 and "etcd://" in err


def test_unreachable_etcd_exits_1_within_the_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    dead = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    for argv in (
        ["list"],
        ["add", "--tenant", "a", "--caller", "*", "--target", "*", "--decision", "allow"],
        ["remove", "--tenant", "a", "x"],
    ):
        start = time.monotonic()
        code, out, err = run(capsys, *argv, "--registry", f"etcd://{dead}", "--timeout", "1.5")
        took = time.monotonic() - start
        assert code == 1 and out == "" and "unreachable" in err
        assert took < 6, took


def test_list_reports_invalid_entries(
    reg: list[str], etcd_cluster: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = reg[-1]
    etcd_cluster.etcdctl("put", f"{prefix}policy/acme/bad", "{oops")
    etcd_cluster.etcdctl("put", f"{prefix}policy/acme/x/y", "{}")
    code, out, err = run(capsys, "list", *reg)
    assert code == 0 and out == ""
    assert "skipped key" in err and "bad" in err and "x/y" in err
