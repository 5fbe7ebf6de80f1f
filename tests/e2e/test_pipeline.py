"""Issue 16: the consumer pipelines the application's first bytes behind OPEN_STREAM.

Real relay and agents on 127.0.0.1. Our relay echoes ``pipeline`` in HELLO_ACK, so the
consumer writes what the application sends before the relay's answer right behind
OPEN_STREAM, and the relay hands it to the provider behind INCOMING_STREAM. The
consumer's access line (``msg=stream``) says how many bytes went that way
(``pipelined``); each test looks for at least one such stream, since whether the
application's first write beats the relay's answer is up to the scheduler.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pytest

from .harness import Agent, Backends, Cluster, Transfer, connect, read_until_closed

pytestmark = [pytest.mark.e2e]

MiB = 1 << 20
TRIES = 8
"""Connections per check: at least one must have pipelined (in practice all do)."""


def _echo_pair(cluster: Cluster, backends: Backends) -> tuple[int, Agent, Agent]:
    relay = cluster.start_relay()
    echo = backends.echo()
    provider = cluster.start_agent(cluster.pki.agent(0), relay, expose={"echo": echo.addr})
    consumer = cluster.start_agent(cluster.pki.agent(1), relay, consume=["echo", "nope"])
    return consumer.port("echo"), provider, consumer


def _pipelined(consumer: Agent, since: int, outcome: str | None = None) -> list[int]:
    lines = consumer.find("stream", since=since, role="consumer")
    return [
        int(r["pipelined"])
        for r in lines
        if r.get("pipelined") and (outcome is None or r.get("outcome") == outcome)
    ]


@pytest.mark.timeout(60)
def test_client_first_bytes_are_pipelined_and_arrive_intact(
    cluster: Cluster, backends: Backends
) -> None:
    port, _provider, consumer = _echo_pair(cluster, backends)
    since = consumer.count()
    for i in range(TRIES):
        request = b"GET /%d HTTP/1.0\r\n\r\n" % i + os.urandom(3000)
        with connect(port) as sock:
            sock.sendall(request)  # before the open can have been answered
            sock.shutdown(socket.SHUT_WR)
            data, how = read_until_closed(sock, 20)
        assert (data, how) == (request, "eof"), f"connection {i}: {len(data)} bytes, {how}"
    consumer.wait_for("stream", since=since, role="consumer", outcome="closed")
    deadline = time.monotonic() + 10
    while len(consumer.find("stream", since=since, role="consumer")) < TRIES:
        assert time.monotonic() < deadline, consumer.tail()
        time.sleep(0.05)
    assert _pipelined(consumer, since), f"no stream pipelined:\n{consumer.tail()}"


@pytest.mark.timeout(60)
def test_server_first_backend_still_greets(cluster: Cluster, backends: Backends) -> None:
    relay = cluster.start_relay()
    greeting = b"220 greetings from a server that speaks first\r\n"
    closer = backends.close_first(greeting)
    cluster.start_agent(cluster.pki.agent(0), relay, expose={"smtp": closer.addr})
    consumer = cluster.start_agent(cluster.pki.agent(1), relay, consume=["smtp"])
    for _ in range(3):
        with connect(consumer.port("smtp")) as sock:
            data, how = read_until_closed(sock, 20)  # the app never writes
        assert (data, how) == (greeting, "eof")


@pytest.mark.timeout(60)
def test_rejected_open_with_pipelined_bytes_gets_the_normal_reject(
    cluster: Cluster, backends: Backends
) -> None:
    _port, _provider, consumer = _echo_pair(cluster, backends)
    since = consumer.count()
    for _ in range(3):
        try:
            sock = connect(consumer.port("nope"))
        except ConnectionResetError:
            continue
        with sock:
            try:
                sock.sendall(b"bytes for a service nobody provides\n")
            except (ConnectionResetError, BrokenPipeError):
                continue
            data, how = read_until_closed(sock, 20)
        # Never the STREAM_REJECT frame (nor anything else) as application data.
        assert data == b"" and how in ("eof", "reset"), (data, how)
    consumer.wait_for("stream rejected", since=since, code=404)
    consumer.wait_for("stream", since=since, role="consumer", outcome="rejected", code=404)


@pytest.mark.timeout(120)
def test_bulk_transfer_with_pipelining_is_sha256_exact(
    cluster: Cluster, backends: Backends
) -> None:
    port, _provider, consumer = _echo_pair(cluster, backends)
    since = consumer.count()
    transfer = Transfer(port, 16 * MiB)  # the first write is 256 KiB, sent at once
    transfer.wait(timeout=90)
    transfer.check_exact()
    record = consumer.wait_for("stream", since=since, role="consumer")
    assert record["outcome"] == "closed", record
    assert record["sent"] == len(transfer.data), record  # pipelined bytes counted once
    print(f"pipelined before the answer: {record.get('pipelined', 0)} bytes")


@pytest.mark.timeout(300)
def test_relay_restart_right_after_a_pipelined_open_loses_nothing(
    cluster: Cluster, backends: Backends
) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    provider = cluster.start_agent(cluster.pki.agent(0), relay, expose={"echo": echo.addr})
    consumer = cluster.start_agent(cluster.pki.agent(1), relay, consume=["echo"])
    since = consumer.count()
    transfer = Transfer(consumer.port("echo"), 4 * MiB, pace=0.1)
    # The pipelined bytes are on their way back: kill the relay before the agents'
    # checkpoints can have acknowledged them all, so a resume must resend them.
    transfer.wait_received(0.001, timeout=30)
    relay.kill()
    time.sleep(1.0)
    cluster.start_relay(port=relay.port, name="relay")
    transfer.wait(timeout=120)
    transfer.check_exact()
    resumed = sum(len(a.find("session: stream resumed")) for a in (provider, consumer))
    assert resumed >= 2, cluster.log_tail(30)
    # The access line comes when the stream is wound up, which after a resume can take
    # a while longer than the application's transfer.
    record = consumer.wait_for("stream", since=since, role="consumer", timeout=90)
    assert record["outcome"] == "closed", record
    print(f"pipelined before the answer: {record.get('pipelined', 0)} bytes")


@pytest.mark.timeout(60)
def test_many_small_pipelined_requests_each_get_their_own_answer(
    cluster: Cluster, backends: Backends
) -> None:
    port, _provider, _consumer = _echo_pair(cluster, backends)
    digests = []
    for i in range(20):
        payload = hashlib.sha256(b"%d" % i).digest() * 4
        with connect(port) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(4096)
                assert chunk, f"connection {i} closed after {len(got)} bytes"
                got += chunk
        digests.append(got == payload)
    assert all(digests)
