"""Issue 3, end to end: real relay and agents on 127.0.0.1, real sockets.

Most data-path checks share one module-scoped topology (``shared``):

    app -TCP-> consumer (agent-b) =QUIC=> relay =QUIC=> provider (agent-a) -TCP-> backend

with one consumed port per service (web: HTTP, echo, eofreply: reply after
the client's FIN, closer: greeting then close, down: nothing listening, nope:
not registered anywhere). Tests that need their own relay or kill processes
use the function-scoped ``cluster`` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from devpki import DevPki
from quicbackends import QUIC_BACKEND_PARAMS

import outrelay

from .harness import (
    AGENT_CMD,
    RELAY_CMD,
    Agent,
    Backends,
    Cluster,
    HttpBackend,
    Relay,
    TcpBackend,
    cli_agent_argv,
    cli_relay_argv,
    connect,
    free_tcp_port,
    free_udp_port,
    http_get,
    read_until_closed,
    run_cli,
    write_policy,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=QUIC_BACKEND_PARAMS)
def quic_backend(request: pytest.FixtureRequest) -> str:
    """Every scenario here runs with the agents on each QUIC client backend."""
    return str(request.param)


HTTP_BODY = b"".join(b"outrelay e2e line %06d\n" % i for i in range(12_000))  # ~276 KiB
GREETING = b"hello from a backend that closes first\n"
REJECT_DEADLINE = 5.0
"""An app whose open is rejected must see its connection end well before the
consumer's 10 s STREAM_READY fallback (spec 03 §3.5 [REC] (b))."""
OPEN_TIMEOUT = 10.0
"""How long the consumer holds an app connection while no relay is connected."""
HANDSHAKE_TIMEOUT = 5.0
"""The agent's QUIC handshake bound (spec 01): the most a silent endpoint may cost."""
HELLO_TIMEOUT = 10.0
"""The relay drops a connection that sends no HELLO after this long."""


# --------------------------------------------------------------------------- topology


@dataclass
class Stack:
    cluster: Cluster
    relay: Relay
    provider: Agent
    consumer: Agent
    http: HttpBackend
    echo: TcpBackend
    eofreply: TcpBackend
    closer: TcpBackend
    down_port: int


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, pki: DevPki, quic_backend: str
) -> Iterator[Stack]:
    backends = Backends()
    cluster = Cluster(tmp_path_factory.mktemp("e2e-basic"), pki, quic_backend)
    try:
        http = backends.http(HTTP_BODY)
        echo = backends.echo()
        eofreply = backends.reply_after_eof()
        closer = backends.close_first(GREETING)
        down_port = free_tcp_port()
        relay = cluster.start_relay()
        provider = cluster.start_agent(
            pki.agent(0),
            relay,
            name="provider",
            expose={
                "web": http.addr,
                "echo": echo.addr,
                "eofreply": eofreply.addr,
                "closer": closer.addr,
                "down": f"127.0.0.1:{down_port}",
            },
        )
        consumer = cluster.start_agent(
            pki.agent(1),
            relay,
            name="consumer",
            consume=["web", "echo", "eofreply", "closer", "down", "nope"],
        )
        yield Stack(cluster, relay, provider, consumer, http, echo, eofreply, closer, down_port)
    finally:
        cluster.stop_all()
        backends.close_all()


@pytest.fixture
def stack(request: pytest.FixtureRequest, shared: Stack) -> Stack:
    """The shared topology, checked alive; failure reports show only this test's log lines."""
    shared.cluster.mark()
    request.node.e2e_log_tail = lambda: shared.cluster.log_tail(200, since_mark=True)
    for proc in shared.cluster.procs:
        assert proc.running, f"{proc.name} died (code {proc.returncode}):\n{proc.tail()}"
    return shared


def assert_closed_without_data(port: int, what: str, send: bytes = b"") -> float:
    """Connect to ``port`` (optionally send ``send``): the connection must end (FIN or
    RST) promptly and carry no bytes. Returns the seconds it took."""
    t0 = time.monotonic()
    try:
        sock = connect(port)
    except ConnectionResetError:
        # Reset before connect() returned: on a busy machine the agent can accept,
        # be rejected and reset the connection before this thread runs again.
        data, how = b"", "reset"
    else:
        with sock:
            if send:
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    sock.sendall(send)
            data, how = read_until_closed(sock, REJECT_DEADLINE + 6.0)
    elapsed = time.monotonic() - t0
    looks_like_reject = len(data) >= 2 and data[1] == 0x13  # ORP header: type byte 0x13
    assert not looks_like_reject and b"service not found" not in data, (
        f"{what}: the STREAM_REJECT frame reached the application as data: {data!r}"
    )
    assert data == b"", f"{what}: application received {len(data)} bytes: {data[:80]!r}"
    assert how in ("eof", "reset"), f"{what}: connection still open after {elapsed:.1f}s"
    assert elapsed < REJECT_DEADLINE, (
        f"{what}: connection closed only after {elapsed:.1f}s (the 10 s fallback?)"
    )
    print(f"{what}: app connection ended by {how} after {elapsed:.3f}s")
    return elapsed


# --------------------------------------------------------------------------- data path


@pytest.mark.timeout(60)
def test_curl_reaches_http_backend(stack: Stack, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    out = tmp_path / "body"
    proc = subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            "20",
            "-D",
            "-",
            "-o",
            str(out),
            f"http://127.0.0.1:{stack.consumer.port('web')}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, f"curl failed ({proc.returncode}): {proc.stderr}"
    assert proc.stdout.startswith("HTTP/1.0 200"), proc.stdout
    assert "X-Backend: outrelay-e2e" in proc.stdout
    assert out.read_bytes() == HTTP_BODY


@pytest.mark.timeout(120)
def test_20_mib_each_way_through_echo(stack: Stack, record_property: Callable) -> None:
    size = 20 << 20
    payload = os.urandom(size)
    sent_digest = hashlib.sha256(payload).hexdigest()
    writer_error: list[BaseException] = []

    sock = connect(stack.consumer.port("echo"), timeout=60)

    def write() -> None:
        try:
            view = memoryview(payload)
            for off in range(0, size, 256 * 1024):
                sock.sendall(view[off : off + 256 * 1024])
            sock.shutdown(socket.SHUT_WR)  # half-close: the echo backend FINs back after
        except BaseException as exc:
            writer_error.append(exc)

    t0 = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    digest = hashlib.sha256()
    received = 0
    how = "eof"
    try:
        sock.settimeout(60)
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
    except (TimeoutError, ConnectionResetError) as exc:
        how = repr(exc)
    finally:
        writer.join(timeout=60)
        sock.close()
    elapsed = time.monotonic() - t0
    record_property("echo_20mib_seconds", round(elapsed, 2))
    print(f"20 MiB each way in {elapsed:.1f}s ({2 * size / elapsed / 1e6:.1f} MB/s total)")
    assert not writer_error, f"writer failed: {writer_error[0]!r}"
    assert how == "eof", f"read ended by {how} after {received} bytes"
    assert received == size, f"received {received} bytes, sent {size}"
    assert digest.hexdigest() == sent_digest


@pytest.mark.timeout(90)
def test_200_concurrent_connections(stack: Stack, record_property: Callable) -> None:
    port = stack.consumer.port("echo")
    n = 200

    async def one(i: int) -> str | None:
        payload = (b"conn %03d " % i) * 500  # ~4.5 KiB, distinct per connection
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload[:100])
            await writer.drain()
            # Hold the stream open a moment so that well over 100 streams (the
            # relay's per-connection limit) are wanted at once: extra opens wait.
            await asyncio.sleep(0.5)
            writer.write(payload[100:])
            await writer.drain()
            writer.write_eof()
            data = await reader.read()  # until EOF
            writer.close()
        except OSError as exc:
            return f"conn {i}: {exc!r}"
        if data != payload:
            return f"conn {i}: got {len(data)} bytes back, sent {len(payload)}"
        return None

    async def run_all() -> list[str | None]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 60)

    t0 = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - t0
    record_property("concurrent_200_seconds", round(elapsed, 2))
    print(f"{n} concurrent echo connections in {elapsed:.1f}s")
    failures = [r for r in results if r is not None]
    assert not failures, f"{len(failures)}/{n} failed, e.g. {failures[:5]}"


def _nc_command() -> list[str] | None:
    """An nc invocation that half-closes (FIN) when stdin ends, per installed flavour."""
    nc = shutil.which("nc") or shutil.which("ncat") or shutil.which("netcat")
    if nc is None:
        return None
    probe = subprocess.run([nc, "-h"], capture_output=True, text=True, timeout=5, check=False)
    help_text = probe.stdout + probe.stderr
    if "Ncat" in help_text:
        return [nc]  # ncat shuts down its write side on stdin EOF by default
    if re.search(r"^\s*-N\b", help_text, re.M) or "OpenBSD" in help_text:
        return [nc, "-N", "-w", "15"]  # OpenBSD: -N = shutdown(SHUT_WR) after stdin EOF
    if "-q" in help_text:
        return [nc, "-q", "5"]  # traditional/GNU netcat
    return [nc]


@pytest.mark.timeout(60)
def test_half_close_printf_nc_gets_full_http_response(stack: Stack) -> None:
    nc = _nc_command()
    if nc is None:
        pytest.skip("nc not installed")
    port = stack.consumer.port("web")
    proc = subprocess.run(
        [*nc, "127.0.0.1", str(port)],
        input=b"GET / HTTP/1.0\r\n\r\n",
        capture_output=True,
        timeout=30,
        check=False,
    )
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), (proc.returncode, proc.stdout[:200], proc.stderr)
    assert body == HTTP_BODY, f"body {len(body)} bytes, expected {len(HTTP_BODY)}"


@pytest.mark.timeout(60)
def test_half_close_nc_reaches_backend_that_answers_after_eof(stack: Stack) -> None:
    """The client's FIN crosses both hops while the response direction stays open."""
    nc = _nc_command()
    if nc is None:
        pytest.skip("nc not installed")
    payload = b"half-close me\n" * 1000
    proc = subprocess.run(
        [*nc, "127.0.0.1", str(stack.consumer.port("eofreply"))],
        input=payload,
        capture_output=True,
        timeout=30,
        check=False,
    )
    expected = f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
    assert proc.stdout == expected, (proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.timeout(60)
def test_half_close_python_client_reads_full_response(stack: Stack) -> None:
    # HTTP: request, shut down our write side, the whole response still arrives.
    with connect(stack.consumer.port("web")) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: e2e\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        data, how = read_until_closed(sock, 20)
    assert how == "eof", f"ended by {how} after {len(data)} bytes"
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:100]
    assert body == HTTP_BODY

    # A backend that only answers after our FIN: 1 MiB up, then the verdict back.
    payload = os.urandom(1 << 20)
    with connect(stack.consumer.port("eofreply")) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data, how = read_until_closed(sock, 20)
    assert how == "eof", f"ended by {how}: {data!r}"
    assert data == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


@pytest.mark.timeout(60)
def test_backend_that_closes_first_is_eof_for_the_app(stack: Stack) -> None:
    with connect(stack.consumer.port("closer")) as sock:
        t0 = time.monotonic()
        data, how = read_until_closed(sock, 10)
        elapsed = time.monotonic() - t0
        assert data == GREETING
        assert how == "eof", f"expected a clean EOF after the greeting, got {how}"
        assert elapsed < 5, f"EOF took {elapsed:.1f}s"


# --------------------------------------------------------------------------- rejects


@pytest.mark.timeout(60)
@pytest.mark.parametrize("app_speaks_first", [False, True], ids=["silent-app", "app-sends"])
def test_unknown_service_closes_app_connection_and_logs_404(
    stack: Stack, app_speaks_first: bool
) -> None:
    since = stack.consumer.count()
    relay_since = stack.relay.count()
    request = b"GET / HTTP/1.0\r\n\r\n" if app_speaks_first else b""
    elapsed = assert_closed_without_data(stack.consumer.port("nope"), "unknown service", request)
    rec = stack.consumer.wait_for("stream rejected", since=since, svc="nope", timeout=5)
    assert rec["code"] == 404, rec
    assert rec["reason"] == "service not found", rec
    stack.relay.wait_for("open rejected: service not found", since=relay_since, svc="nope")
    print(f"unknown service: app connection closed after {elapsed:.2f}s")


@pytest.mark.timeout(60)
def test_backend_down_closes_app_connection_provider_logs_502(stack: Stack) -> None:
    since_c = stack.consumer.count()
    since_p = stack.provider.count()
    since_r = stack.relay.count()
    assert_closed_without_data(stack.consumer.port("down"), "backend down")
    prov = stack.provider.wait_for(
        "backend unreachable; rejecting 502", since=since_p, svc="down", timeout=5
    )
    assert str(stack.down_port) in str(prov.get("target", "")) + str(prov.get("err", ""))
    relay_rec = stack.relay.wait_for("provider rejected", since=since_r, timeout=5)
    assert relay_rec["code"] == 502, relay_rec
    cons = stack.consumer.wait_for("stream rejected", since=since_c, svc="down", timeout=5)
    # [REC] spec 02 §13: the reference maps every provider reject to "503 provider
    # rejected"; our relay passes the provider's code and reason on unchanged.
    assert cons["code"] == 502, cons
    assert cons["reason"] == prov["err"], (cons, prov)
    access = stack.consumer.wait_for("stream", since=since_c, svc="down", timeout=5)
    assert access["outcome"] == "rejected" and access["code"] == 502, access


# --------------------------------------------------------------------------- policy


DENY_WEB_POLICY = [
    {"id": "deny-web", "caller": "*", "target": "web", "method": "", "decision": "deny"},
    {"id": "allow-api", "caller": "outrelay://acme/*", "target": "api", "decision": "allow"},
    {"id": "callee", "caller": "*", "target": "outrelay://*", "decision": "allow"},
]


@dataclass
class PolicyStack:
    relay: Relay
    provider: Agent
    consumer: Agent
    audit: Path


@pytest.fixture
def policy_stack(cluster: Cluster, backends: Backends, tmp_path: Path, pki: DevPki) -> PolicyStack:
    http = backends.http(HTTP_BODY)
    policy = write_policy(tmp_path / "policy.json", DENY_WEB_POLICY)
    audit = tmp_path / "audit.jsonl"
    relay = cluster.start_relay(policy=policy, audit=audit)
    provider = cluster.start_agent(
        pki.agent(0), relay, name="provider", expose={"web": http.addr, "api": http.addr}
    )
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["web", "api"])
    return PolicyStack(relay, provider, consumer, audit)


def wait_audit(path: Path, predicate: Callable[[dict], bool], count: int = 1) -> list[dict]:
    """Poll the audit file until ``count`` lines satisfy ``predicate``."""
    import json

    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            hits = [x for x in lines if predicate(x)]
            if len(hits) >= count:
                return hits
        time.sleep(0.05)
    raise AssertionError(f"audit file {path}: wanted {count} matching lines, have {lines}")


@pytest.mark.timeout(60)
def test_policy_deny_gives_403_and_audit_line(policy_stack: PolicyStack) -> None:
    ps = policy_stack
    assert_closed_without_data(ps.consumer.port("web"), "policy deny")
    rec = ps.consumer.wait_for("stream rejected", svc="web", timeout=5)
    assert rec["code"] == 403, rec
    assert "deny-web" in rec["reason"], rec
    assert rec["reason"] == "denied: deny-web", rec  # exact string, spec 02 §13
    ps.relay.wait_for("open denied", reason="deny-web", timeout=5)
    (line,) = wait_audit(ps.audit, lambda a: a["decision"] == "DECISION_DENY")
    assert line["reason"] == "deny-web"
    assert line["caller"] == ps.consumer.uri
    assert line["target"] == "web"
    assert line["tenant"] == "acme"
    assert line.get("side", "caller") == "caller"
    assert not ps.provider.find("bridging"), "a denied open reached the provider"


@pytest.mark.timeout(60)
def test_policy_allow_flows_and_audits_both_sides(policy_stack: PolicyStack) -> None:
    ps = policy_stack
    head, body = http_get(ps.consumer.port("api"))
    assert head.startswith(b"HTTP/1.0 200") and body == HTTP_BODY
    allows = wait_audit(ps.audit, lambda a: a["decision"] == "DECISION_ALLOW", count=2)
    assert len(allows) == 2, allows
    by_side = {a.get("side"): a for a in allows}
    caller, callee = by_side.get("caller"), by_side.get("callee")
    assert caller is not None and callee is not None, allows
    assert (caller["caller"], caller["target"], caller["reason"]) == (
        ps.consumer.uri,
        "api",
        "allow-api",
    )
    assert (callee["caller"], callee["target"], callee["reason"]) == (
        ps.provider.uri,
        ps.consumer.uri,
        "callee",
    )


@pytest.mark.timeout(60)
def test_policy_without_callee_rule_denies_callee_side(
    cluster: Cluster, backends: Backends, tmp_path: Path, pki: DevPki
) -> None:
    """Only a caller-side allow: the callee-side check finds no rule and denies (02 §6.2)."""
    http = backends.http(HTTP_BODY)
    policy = write_policy(
        tmp_path / "policy.json",
        [{"id": "allow-web", "caller": "*", "target": "web", "decision": "allow"}],
    )
    audit = tmp_path / "audit.jsonl"
    relay = cluster.start_relay(policy=policy, audit=audit)
    provider = cluster.start_agent(pki.agent(0), relay, name="provider", expose={"web": http.addr})
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["web"])
    assert_closed_without_data(consumer.port("web"), "callee-side deny")
    rec = consumer.wait_for("stream rejected", svc="web", timeout=5)
    assert (rec["code"], rec["reason"]) == (403, "denied (callee): no matching rule"), rec
    relay.wait_for("open denied (callee)", reason="no matching rule", timeout=5)
    (deny,) = wait_audit(audit, lambda a: a["decision"] == "DECISION_DENY")
    assert (deny["caller"], deny["target"], deny["reason"]) == (
        provider.uri,
        consumer.uri,
        "no matching rule",
    )
    assert deny.get("side", "callee") == "callee"
    (allow,) = wait_audit(audit, lambda a: a["decision"] == "DECISION_ALLOW")
    assert (allow["caller"], allow["target"], allow["reason"]) == (consumer.uri, "web", "allow-web")
    assert http.requests == 0


@pytest.mark.timeout(60)
def test_policy_reload_on_sighup(policy_stack: PolicyStack, tmp_path: Path) -> None:
    ps = policy_stack
    assert_closed_without_data(ps.consumer.port("web"), "deny before reload")
    policy = tmp_path / "policy.json"
    # A broken file is refused and the old rules stay in force.
    policy.write_text("{not json")
    since = ps.relay.count()
    ps.relay.send_signal(signal.SIGHUP)
    ps.relay.wait_for("policy reload failed; keeping the old rules", since=since, timeout=5)
    assert_closed_without_data(ps.consumer.port("web"), "deny after a failed reload")
    # Now allow web: the reload takes effect at once (the decision cache is flushed).
    rules = [r for r in DENY_WEB_POLICY if r["id"] != "deny-web"]
    rules.append({"id": "allow-web", "caller": "*", "target": "web", "decision": "allow"})
    write_policy(policy, rules)
    since = ps.relay.count()
    ps.relay.send_signal(signal.SIGHUP)
    ps.relay.wait_for("policy reloaded", since=since, timeout=5)
    head, body = http_get(ps.consumer.port("web"))
    assert head.startswith(b"HTTP/1.0 200") and body == HTTP_BODY


@pytest.mark.timeout(60)
def test_relay_drops_connection_that_never_sends_hello(cluster: Cluster, pki: DevPki) -> None:
    """mTLS handshake done, no HELLO: the relay closes the connection after its timeout."""
    from outrelay.transport import QuicTlsConfig, connect_quic

    relay = cluster.start_relay()
    a = pki.agent(0)
    tls = QuicTlsConfig(str(a.cert), str(a.key), str(pki.ca_cert))

    async def silent_client() -> float:
        conn = await connect_quic("127.0.0.1", relay.port, tls)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(HELLO_TIMEOUT + 5):
                await conn.wait_closed()
        finally:
            conn.close(0, "")
        return time.monotonic() - t0

    closed_after = asyncio.run(silent_client())
    relay.wait_for("HELLO timeout; closing", uri=a.uri, timeout=2)
    assert closed_after < HELLO_TIMEOUT + 3, closed_after
    assert not relay.find("agent connected")


# --------------------------------------------------------------------------- start-up


@pytest.mark.timeout(90)
def test_agent_without_relay_keeps_retrying_then_connects(
    cluster: Cluster, backends: Backends, pki: DevPki
) -> None:
    http = backends.http(HTTP_BODY)
    port = free_udp_port()
    provider = cluster.start_agent(
        pki.agent(0), f"127.0.0.1:{port}", expose={"web": http.addr}, name="provider", wait=False
    )
    provider.wait_for("session: no relay reachable; retrying", timeout=20)
    assert provider.running, "the agent exited although it should keep retrying"
    relay = cluster.start_relay(port=port)
    provider.wait_for("service registered", name="web", timeout=45)
    assert provider.running
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["web"])
    head, body = http_get(consumer.port("web"))
    assert head.startswith(b"HTTP/1.0 200") and body == HTTP_BODY


@pytest.mark.timeout(90)
def test_relay_restart_agents_reconnect_and_reregister(
    cluster: Cluster, backends: Backends, pki: DevPki
) -> None:
    http = backends.http(HTTP_BODY)
    relay = cluster.start_relay()
    provider = cluster.start_agent(pki.agent(0), relay, name="provider", expose={"web": http.addr})
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["web"])
    assert http_get(consumer.port("web"))[1] == HTTP_BODY

    p_since, c_since = provider.count(), consumer.count()
    t0 = time.monotonic()
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_exit(10) == 0, relay.tail()
    print(f"relay stopped on SIGTERM in {time.monotonic() - t0:.1f}s")
    provider.wait_for("session: lost; reconnecting", since=p_since, timeout=15)
    consumer.wait_for("session: lost; reconnecting", since=c_since, timeout=15)
    # With no relay, an app connection is held for the open timeout (a stall, not an
    # instant error: the relay may come back), then closed without any data.
    t1 = time.monotonic()
    with connect(consumer.port("web")) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data, how = read_until_closed(sock, OPEN_TIMEOUT + 5)
    held = time.monotonic() - t1
    assert data == b"" and how in ("eof", "reset"), (data, how, held)
    consumer.wait_for("session dial", since=c_since, svc="web", timeout=2)
    print(f"no relay: app connection closed ({how}) after {held:.1f}s")

    relay2 = cluster.start_relay(port=relay.port)
    provider.wait_for("service registered", since=p_since, name="web", timeout=45)
    relay2.wait_for("agent connected", uri=consumer.uri, timeout=45)
    time.sleep(Cluster.CONNECT_SETTLE)
    relay2.wait_for("registered", name="web", agent=provider.uri)
    assert provider.running and consumer.running
    assert http_get(consumer.port("web"))[1] == HTTP_BODY


@pytest.mark.timeout(90)
def test_killed_provider_restarts_and_stale_connection_does_not_deregister_it(
    cluster: Cluster, backends: Backends, pki: DevPki
) -> None:
    """SIGKILL (no CONNECTION_CLOSE), restart at once with the same identity: the old
    connection idles out ~10 s later and must not take the new registration along
    (spec 02 §15 item 2)."""
    http = backends.http(HTTP_BODY)
    relay = cluster.start_relay()
    old = cluster.start_agent(pki.agent(0), relay, name="provider", expose={"web": http.addr})
    consumer = cluster.start_agent(pki.agent(1), relay, name="consumer", consume=["web"])
    assert http_get(consumer.port("web"))[1] == HTTP_BODY

    old.kill()
    old.wait_exit(5)
    since = relay.count()
    cluster.start_agent(pki.agent(0), relay, name="provider", expose={"web": http.addr})
    assert http_get(consumer.port("web"))[1] == HTTP_BODY
    relay.wait_for("stale agent connection closed", since=since, uri=old.uri, timeout=25)
    assert not relay.find("agent disconnected", since=since, uri=old.uri)
    assert http_get(consumer.port("web"))[1] == HTTP_BODY


@pytest.mark.timeout(60)
@pytest.mark.parametrize("silent_first", [True, False], ids=["silent-first", "silent-last"])
def test_silent_relay_endpoint_does_not_hang_startup(
    cluster: Cluster, backends: Backends, pki: DevPki, silent_first: bool
) -> None:
    """``--relay`` with a UDP port that never answers: start-up is delayed at most by
    the handshake bound (the agent prefers endpoints in list order) and never hangs."""
    http = backends.http(HTTP_BODY)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, so no ICMP unreachable either
        silent_addr = f"127.0.0.1:{silent.getsockname()[1]}"
        relay = cluster.start_relay()
        relays = [silent_addr, relay.addr] if silent_first else [relay.addr, silent_addr]
        t0 = time.monotonic()
        provider = cluster.start_agent(
            pki.agent(0), ",".join(relays), expose={"web": http.addr}, name="provider", wait=False
        )
        provider.wait_for("service registered", name="web", timeout=HANDSHAKE_TIMEOUT + 10)
        elapsed = time.monotonic() - t0
    bound = HANDSHAKE_TIMEOUT + 3.0 if silent_first else 3.0
    assert elapsed < bound, f"registration took {elapsed:.1f}s (relays {relays})"
    provider.wait_for("session: nearest-relay selected", addr=relay.addr, timeout=1)
    print(f"silent endpoint {'first' if silent_first else 'last'}: registered in {elapsed:.1f}s")


# --------------------------------------------------------------------------- CLI


@pytest.mark.timeout(60)
def test_cli_help_and_version() -> None:
    for cmd in (AGENT_CMD, RELAY_CMD):
        helped = run_cli([*cmd, "--help"])
        assert helped.returncode == 0, helped.stderr
        assert "usage" in helped.stdout.lower()
        version = run_cli([*cmd, "--version"])
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == outrelay.__version__
        assert re.fullmatch(r"v?\d+\.\d+\.\d+\S*", version.stdout.strip()), version.stdout


@pytest.mark.timeout(60)
def test_cli_agent_missing_flags_exit_2(pki: DevPki) -> None:
    bare = run_cli([*AGENT_CMD])
    assert bare.returncode == 2, bare.stderr
    assert "missing required flags" in bare.stderr
    a = pki.agent(0)
    no_uri = run_cli([*AGENT_CMD, "--cert", str(a.cert), "--key", str(a.key), "--ca", str(a.cert)])
    assert no_uri.returncode == 2, no_uri.stderr
    assert "--uri" in no_uri.stderr
    unknown = run_cli([*AGENT_CMD, "--no-such-flag"])
    assert unknown.returncode == 2, unknown.stderr


@pytest.mark.timeout(60)
def test_cli_relay_flag_errors(pki: DevPki, tmp_path: Path) -> None:
    no_cert = run_cli(cli_relay_argv(pki, with_cert=False))
    assert no_cert.returncode == 2, no_cert.stderr
    assert "--cert" in no_cert.stderr

    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    for bad in (tmp_path / "does-not-exist.crt", garbage):
        unreadable = run_cli(cli_relay_argv(pki, cert=bad))
        assert unreadable.returncode == 1, (bad, unreadable.stderr)
        assert "load tls" in unreadable.stderr


@pytest.mark.timeout(60)
def test_cli_agent_unreadable_cert_exit_1(pki: DevPki, tmp_path: Path) -> None:
    proc = run_cli(cli_agent_argv(pki, cert=tmp_path / "missing.crt"))
    assert proc.returncode == 1, proc.stderr
    assert "load tls" in proc.stderr


@pytest.mark.timeout(30)
def test_cli_expose_service_without_target_exits_2_before_network(pki: DevPki) -> None:
    t0 = time.monotonic()
    proc = run_cli(cli_agent_argv(pki, "--expose-service", "x"), timeout=15)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert "--expose-service requires --expose-target" in proc.stderr
    assert "no relay reachable" not in proc.stderr
    assert elapsed < 5, f"took {elapsed:.1f}s: did it try the relay first?"


# --------------------------------------------------------------------------- shutdown


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("victim", "sig"),
    [("consumer", signal.SIGTERM), ("provider", signal.SIGTERM), ("consumer", signal.SIGINT)],
    ids=["consumer-SIGTERM", "provider-SIGTERM", "consumer-SIGINT"],
)
def test_sigterm_lets_in_flight_stream_finish_and_exits_0(
    cluster: Cluster, backends: Backends, pki: DevPki, victim: str, sig: int
) -> None:
    ticks = 30
    ticker = backends.ticker(ticks, 0.1)  # a 3 s response, trickled
    relay = cluster.start_relay()
    grace = ["--shutdown-grace", "8"]
    provider = cluster.start_agent(
        pki.agent(0), relay, name="provider", expose={"slow": ticker.addr}, args=grace
    )
    consumer = cluster.start_agent(
        pki.agent(1), relay, name="consumer", consume=["slow"], args=grace
    )
    agent = consumer if victim == "consumer" else provider
    with connect(consumer.port("slow"), timeout=20) as sock:
        first = sock.recv(64)
        assert first.startswith(b"tick 0"), first
        t0 = time.monotonic()
        agent.send_signal(sig)
        agent.wait_for("shutdown: waiting for in-flight streams", streams=1, timeout=5)
        # It stopped accepting new work while the old stream drains.
        if victim == "consumer":
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", consumer.port("slow")), timeout=2).close()
        else:
            assert_closed_without_data(consumer.port("slow"), "new stream to a stopping provider")
        assert agent.running, "exited before the in-flight stream finished"
        rest, how = read_until_closed(sock, 15)
    data = first + rest
    assert how == "eof", f"in-flight stream ended by {how} after {data!r}"
    assert data == b"".join(b"tick %d\n" % i for i in range(ticks)), data
    code = agent.wait_exit(10)
    elapsed = time.monotonic() - t0
    assert code == 0, f"{victim} exit code {code}\n{agent.tail()}"
    assert elapsed < 8 + 3, f"{victim} took {elapsed:.1f}s to exit"


def _sigterm_during_endless_stream(
    cluster: Cluster, backends: Backends, pki: DevPki
) -> tuple[Agent, int, float, str]:
    """SIGTERM a consumer (grace 2 s) whose stream never ends; (agent, code, seconds, how)."""
    ticker = backends.ticker(100_000, 0.1)  # never finishes on its own
    relay = cluster.start_relay()
    cluster.start_agent(pki.agent(0), relay, name="provider", expose={"endless": ticker.addr})
    consumer = cluster.start_agent(
        pki.agent(1), relay, name="consumer", consume=["endless"], args=["--shutdown-grace", "2"]
    )
    with connect(consumer.port("endless"), timeout=20) as sock:
        assert sock.recv(64).startswith(b"tick 0")
        t0 = time.monotonic()
        consumer.send_signal(signal.SIGTERM)
        code = consumer.wait_exit(2 + 6)
        elapsed = time.monotonic() - t0
        _, how = read_until_closed(sock, 5)
    return consumer, code, elapsed, how


@pytest.mark.timeout(60)
def test_sigterm_grace_is_bounded(cluster: Cluster, backends: Backends, pki: DevPki) -> None:
    consumer, code, elapsed, how = _sigterm_during_endless_stream(cluster, backends, pki)
    assert code == 0, f"exit code {code}\n{consumer.tail()}"
    assert elapsed >= 1.5, f"exited after {elapsed:.1f}s: did not wait for the in-flight stream"
    assert how in ("eof", "reset"), f"app connection not closed after the agent exited: {how}"


@pytest.mark.timeout(60)
def test_sigterm_grace_expiry_logs_no_traceback(
    cluster: Cluster, backends: Backends, pki: DevPki
) -> None:
    consumer, code, _, _ = _sigterm_during_endless_stream(cluster, backends, pki)
    assert code == 0
    stray = [ln for ln in consumer.text().splitlines() if ln.strip() and not ln.startswith("{")]
    assert not stray, "non-JSON output on stderr:\n" + "\n".join(stray[:20])
