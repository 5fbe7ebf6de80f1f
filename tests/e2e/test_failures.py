"""Failures a person can act on, end to end: real relay and agent processes.

* The agent checks its own certificate before dialling and exits 1 with the
  exact reason (expired, not yet valid, URI, CA, key, garbage).
* A relay that refuses the agent says why in its CONNECTION_CLOSE, and the
  agent logs ``relay refused us: <reason>`` and exits 1 without a
  "retrying" line after it.
* A relay certificate that does not verify is logged with the reason on
  every retry; with ``--log-format json`` every line is JSON, library lines
  included.
* Every bad flag value exits 2 with the reason; SIGHUP reloads an agent's certificate
  and does not stop it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from devpki import DevPki, Identity
from quicbackends import QUIC_BACKEND_PARAMS

from outrelay.agent.agent import Agent as InProcessAgent
from outrelay.agent.agent import AgentConfig
from outrelay.agent.session import SessionConfig
from outrelay.pki import create_ca, issue_relay
from outrelay.transport import QuicTlsConfig

from .harness import (
    Backends,
    Cluster,
    cli_agent_argv,
    cli_relay_argv,
    connect,
    contains,
    free_udp_port,
    run_cli,
)

pytestmark = pytest.mark.e2e

RETRYING = "session: no relay reachable; retrying"
REFUSED = "dial relay: refused"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _assert_all_json(text: str, who: str) -> list[dict[str, Any]]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"{who}: a stderr line is not JSON: {line!r}") from None
        assert isinstance(obj, dict) and {"time", "level", "msg"} <= obj.keys(), line
        records.append(obj)
    assert records, f"{who}: no log lines at all"
    return records


# --------------------------------------------------------------------------- self-check


def _expired(pki: DevPki, out: Path) -> tuple[Identity, Path, str]:
    ident = pki.issue_agent(
        "expired",
        out=out,
        not_before=_now() - dt.timedelta(days=10),
        not_after=_now() - dt.timedelta(days=1),
    )
    return ident, ident.key, "certificate expired (notAfter"


def _not_yet_valid(pki: DevPki, out: Path) -> tuple[Identity, Path, str]:
    start = _now() + dt.timedelta(days=1)
    ident = pki.issue_agent(
        "future", out=out, not_before=start, not_after=start + dt.timedelta(days=30)
    )
    return ident, ident.key, "certificate not yet valid (notBefore"


def _uri_mismatch(pki: DevPki, out: Path) -> tuple[Identity, Path, str]:
    a, b = pki.agent(0), pki.agent(1)
    return Identity("mismatch", b.uri, a.cert, a.key), a.key, f"is not --uri {b.uri}"


def _other_ca(pki: DevPki, out: Path) -> tuple[Identity, Path, str]:
    ident = pki.issue_agent("foreign", out=out, ca=create_ca("Other CA"))
    return ident, ident.key, "chain does not verify against CA"


def _key_mismatch(pki: DevPki, out: Path) -> tuple[Identity, Path, str]:
    a = pki.agent(0)
    return a, pki.agent(1).key, "does not match the certificate"


def _garbage(pki: DevPki, out: Path) -> tuple[Identity, Path, str]:
    out.mkdir(parents=True, exist_ok=True)
    crt = out / "garbage.crt"
    crt.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    a = pki.agent(0)
    return Identity("garbage", a.uri, crt, a.key), a.key, "malformed certificate in"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "make",
    [_expired, _not_yet_valid, _uri_mismatch, _other_ca, _key_mismatch, _garbage],
    ids=["expired", "not-yet-valid", "uri-mismatch", "other-ca", "key-mismatch", "garbage"],
)
def test_self_check_exits_1_with_the_reason_before_dialling(
    pki: DevPki, tmp_path: Path, make: Callable[[DevPki, Path], tuple[Identity, Path, str]]
) -> None:
    identity, key, reason = make(pki, tmp_path / "certs")
    argv = cli_agent_argv(pki, "--uri", identity.uri, "--key", str(key), cert=identity.cert)
    t0 = time.monotonic()
    proc = run_cli(argv)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "level=ERROR" in line]
    assert len(errors) == 1 and reason in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "agent started" not in proc.stderr and "retrying" not in proc.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s: did it dial first?"


def test_self_check_accepts_the_dev_identities(pki: DevPki) -> None:
    """The control: the same check passes the material ``outrelay pki dev`` wrote."""
    from outrelay.pki import check_own_identity

    for ident in pki.agents:
        check_own_identity(ident.cert, ident.key, pki.ca_cert, ident.uri)


# --------------------------------------------------------------------------- refusals


def _no_retry_after_refusal(records: list[dict[str, Any]]) -> None:
    msgs = [r["msg"] for r in records]
    assert REFUSED in msgs, msgs
    after = msgs[msgs.index(REFUSED) :]
    assert RETRYING not in after, f"'retrying' logged after the refusal: {after}"


@pytest.mark.timeout(60)
def test_relay_refuses_other_ca_agent_and_the_agent_says_why(
    cluster: Cluster, pki: DevPki, tmp_path: Path
) -> None:
    """The agent trusts both CAs (its self-check passes), the relay only the dev CA."""
    other_ca = create_ca("Other CA")
    foreign = pki.issue_agent("foreign", out=tmp_path / "certs", ca=other_ca)
    bundle = tmp_path / "both-cas.crt"
    bundle.write_bytes(pki.ca_cert.read_bytes() + other_ca.cert_pem())
    relay = cluster.start_relay()
    agent = cluster.start_agent(
        foreign, relay, args=["--ca", str(bundle)], name="foreign", wait=False
    )
    relay.wait_for(
        "reject conn: client certificate refused", reason=contains("chain does not verify")
    )
    assert agent.wait_exit(30) == 1, agent.tail()
    rec = agent.wait_for(REFUSED, timeout=1)
    assert str(rec["err"]).startswith("relay refused us: bad client certificate: chain does not")
    assert rec["relay"] == relay.addr
    assert not agent.find(RETRYING), "one refusal, and no retry at all"
    _no_retry_after_refusal(agent.records())


@pytest.mark.timeout(90)
def test_relay_refuses_agent_whose_certificate_expired_meanwhile(
    cluster: Cluster, pki: DevPki, tmp_path: Path
) -> None:
    """Valid at start-up (self-check passes), expired by the time a relay answers."""
    ttl = 6.0
    expires = time.monotonic() + ttl
    not_after = _now() + dt.timedelta(seconds=ttl)
    expiring = pki.issue_agent("expiring", out=tmp_path / "certs", not_after=not_after)
    port = free_udp_port()
    agent = cluster.start_agent(expiring, f"127.0.0.1:{port}", name="expiring", wait=False)
    agent.wait_for(RETRYING, timeout=ttl)  # it passed its self-check and dials: nobody there
    time.sleep(max(0.0, expires - time.monotonic()) + 1.0)
    relay = cluster.start_relay(port=port)
    relay.wait_for(
        "reject conn: client certificate refused", reason=contains("expired"), timeout=30
    )
    assert agent.wait_exit(30) == 1, agent.tail()
    rec = agent.wait_for(REFUSED, timeout=1)
    assert "relay refused us: bad client certificate: certificate expired" in rec["err"], rec
    _no_retry_after_refusal(agent.records())
    _assert_all_json(relay.text(), "relay")


@pytest.mark.timeout(60)
def test_relay_refuses_hello_uri_mismatch_and_the_agent_says_why(
    cluster: Cluster,
    pki: DevPki,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI's self-check cannot let this through, so the agent runs in-process."""
    relay = cluster.start_relay()
    a, b = pki.agent(0), pki.agent(1)
    config = AgentConfig(
        session=SessionConfig(
            relays=(("127.0.0.1", relay.port),),
            uri=b.uri,  # agent-a's certificate, agent-b's URI in HELLO
            tls=QuicTlsConfig(str(a.cert), str(a.key), str(pki.ca_cert)),
        )
    )
    monkeypatch.setattr(logging.getLogger("outrelay"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="outrelay")

    async def run() -> str:
        agent = InProcessAgent(config)
        await agent.start()
        try:
            async with asyncio.timeout(20):
                await agent.wait_stopped()
        finally:
            await agent.shutdown()
        return str(agent.refused)

    refused = asyncio.run(run())
    relay.wait_for("HELLO uri mismatch", cert_uri=a.uri, hello_uri=b.uri, timeout=5)
    assert refused.startswith("relay refused us: HELLO uri mismatch"), refused
    assert b.uri in refused and a.uri in refused, refused
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("outrelay")]
    _no_retry_after_refusal([{"msg": m} for m in msgs])


def test_reference_relay_empty_close_still_says_something() -> None:
    """A reference relay closes with code 0 and no reason: the agent still explains."""
    from outrelay.agent.dial import refusal as _refusal

    empty = str(_refusal("127.0.0.1:7443", "code 0"))
    assert empty.startswith("relay refused us: ") and "certificate or our HELLO uri" in empty
    ours = _refusal("127.0.0.1:7443", "code 0: bad client certificate: no URI SAN")
    assert str(ours) == "relay refused us: bad client certificate: no URI SAN"
    assert ours.address == "127.0.0.1:7443"


# --------------------------------------------------------------------------- relay certificate


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", QUIC_BACKEND_PARAMS)
def test_relay_certificate_from_other_ca_reason_on_every_retry_all_json(
    cluster: Cluster, pki: DevPki, tmp_path: Path, backend: str
) -> None:
    """Each failed dial says why, past the first three (which are always logged),
    and with ``--log-format json`` every line is JSON, aioquic's/qh3's included."""
    other = issue_relay(create_ca("Other CA"))
    crt, key = pki.write("relay-other", other, tmp_path / "certs")
    relay = cluster.start_relay(args=["--cert", str(crt), "--key", str(key)])
    agent = cluster.start_agent(
        pki.agent(0), relay, args=["--quic-backend", backend], name="agent", wait=False
    )
    deadline = time.monotonic() + 30
    while len(agent.find(RETRYING)) < 4 and time.monotonic() < deadline and agent.running:
        time.sleep(0.2)
    retries = agent.find(RETRYING)
    assert len(retries) >= 4, agent.tail()
    for rec in retries:
        assert rec["level"] == "WARN", rec
        assert "the server's certificate does not verify" in rec["err"], rec
        assert "local issuer certificate" in rec["err"], rec
    assert agent.running, "a relay with a bad certificate is retried, not fatal"
    agent.stop()
    records = _assert_all_json(agent.text(), "agent")
    if backend == "aioquic":
        assert any(r.get("logger") == "quic" for r in records), "aioquic's line not routed"


# --------------------------------------------------------------------------- flags


BAD_AGENT_FLAGS = [
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    (["--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
    (["--relay", "127.0.0.1:0"], "port 0 cannot be dialled"),
    (["--relay", "127.0.0.1:99999"], "is not host:port"),
    (["--relay-tcp", "nohost"], "is not host:port"),
    (["--transport", "udp"], "argument --transport: invalid choice"),
    (["--quic-backend", "ngtcp2"], "argument --quic-backend: invalid choice"),
    (["--shutdown-grace", "-1"], "must be a finite, non-negative number"),
    (["--resume-window", "nan"], "must be a finite, non-negative number"),
    (["--resume-window", "soon"], "is not a number of seconds"),
    (["--intercept", "magic", "--consume", "web"], "argument --intercept: invalid choice"),
    (["--consume", "web"], "explicit --consume must be <svc>@<bind-addr>"),
    (["--consume", "web@nohost"], "is not host:port"),
    (["--expose", "web=127.0.0.1:0"], "port 0 cannot be dialled"),
    (["--server-name", " "], "--server-name must not be empty"),
    (["--p2p-listen", "0.0.0.0:x"], "--p2p-listen '0.0.0.0:x' is not host:port"),
    (["--quic-datagram-max", "70000"], "70000 is not between 1350 and 16384 bytes"),
    (["--quic-datagram-max", "9k"], "'9k' is not a number of bytes"),
]
BAD_RELAY_FLAGS = [
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    (["--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
    (["--listen", "127.0.0.1:99999"], "--listen '127.0.0.1:99999' is not host:port"),
    (["--listen-tcp", "x"], "--listen-tcp 'x' is not host:port"),
    (["--listen-forward", ":7444"], "has no host"),
    (["--quic-datagram-max", "1000"], "1000 is not between 1350 and 16384 bytes"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("json_logs", [False, True], ids=["text", "json"])
def test_bad_flag_values_exit_2_with_the_reason(pki: DevPki, json_logs: bool) -> None:
    cases = [("agent", cli_agent_argv(pki, *flags), why) for flags, why in BAD_AGENT_FLAGS]
    cases += [("relay", [*cli_relay_argv(pki), *flags], why) for flags, why in BAD_RELAY_FLAGS]
    for who, argv, why in cases:
        if json_logs and "--log-format" not in argv:
            argv = [*argv, "--log-format", "json"]
        proc = run_cli(argv)
        assert proc.returncode == 2, (who, argv, proc.returncode, proc.stderr)
        assert why in proc.stderr, (who, argv, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        if json_logs and "xml" not in argv:
            records = _assert_all_json(proc.stderr, f"{who} {argv[-4:]}")
            assert any(why in r["msg"] for r in records if r["level"] == "ERROR"), records


# --------------------------------------------------------------------------- SIGHUP


@pytest.mark.timeout(60)
def test_sighup_reloads_and_the_agent_keeps_serving(
    cluster: Cluster, backends: Backends, pki: DevPki
) -> None:
    echo = backends.echo()
    relay = cluster.start_relay()
    provider = cluster.start_agent(pki.agent(0), relay, name="provider", expose={"e": echo.addr})
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["e"])
    for proc in (provider, consumer):
        since = proc.count()
        proc.send_signal(signal.SIGHUP)
        # The unchanged files reload fine; the agent reconnects to present them.
        proc.wait_for("certificate reloaded", since=since, timeout=5, trigger="SIGHUP")
        proc.wait_for("session: reconnected", since=since, timeout=30)
    time.sleep(0.5)
    assert provider.running and consumer.running, cluster.log_tail()
    with connect(consumer.port("e")) as sock:
        sock.sendall(b"still here\n")
        got = b""
        while len(got) < len(b"still here\n"):
            chunk = sock.recv(64)
            assert chunk, "echo closed early"
            got += chunk
    assert got == b"still here\n"
