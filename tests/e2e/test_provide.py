"""Same-tenant takeover, end to end: real relay and agents on 127.0.0.1.

    app -TCP-> consumer =QUIC=> relay =QUIC=> original provider -TCP-> backend "original"
                                      \\====> taker            -TCP-> backend "taker"

Both providers are agents of tenant ``acme`` exposing the same name ``echo``; each backend
answers ``<its tag>:<what it read>`` after the client's FIN, so a reply says which provider
served the stream.

* Without a provide rule the taker takes the name over (the reference's last writer wins);
  when its process stops, the original provider serves again: no 404 in between.
* With a provide rule that names only the original provider, the taker's REGISTER is refused
  (the relay logs why and audits it; the agent gets no REGISTER_ACK and says so) and the
  original keeps serving.
* SIGHUP reloads provide rules: a name open to everyone is locked, then opened to the taker.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from devpki import DevPki, Identity

from .harness import (
    Agent,
    Backends,
    Cluster,
    Handler,
    Relay,
    connect,
    read_until_closed,
    write_policy,
)

pytestmark = pytest.mark.e2e

SERVICE = "echo"
ALLOW_OPENS = [
    # Consume rules: every open allowed on both sides, so only provide rules matter here.
    {"id": "opens", "caller": "*", "target": "*", "decision": "allow"},
]
REGISTER_ACK_WAIT = 10.0
"""The agent's REGISTER_ACK timeout (spec 03 §3.3): a refused agent logs its failure then."""


def tagged_reply(tag: bytes) -> Handler:
    """Read until the client's FIN, answer ``tag + b":" + data``, close."""

    def handler(conn: socket.socket) -> None:
        data = bytearray()
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(tag + b":" + bytes(data))
        conn.shutdown(socket.SHUT_WR)

    return handler


def ask(consumer: Agent, payload: bytes = b"ping") -> bytes:
    """One stream through the consumer: send, FIN, read the answer to EOF."""
    with connect(consumer.port(SERVICE)) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data, how = read_until_closed(sock, 10.0)
    assert how == "eof", f"stream ended by {how} after {data!r}"
    return data


@pytest.fixture(scope="module")
def taker_identity(tmp_path_factory: pytest.TempPathFactory, pki: DevPki) -> Identity:
    """A third agent of tenant acme, issued by the session's dev CA."""
    taker = pki.issue_agent("taker", out=tmp_path_factory.mktemp("taker-pki"))
    assert taker.uri not in {a.uri for a in pki.agents}
    return taker


class Topology:
    """Relay, original provider, consumer and the two tagged backends."""

    def __init__(
        self,
        cluster: Cluster,
        backends: Backends,
        pki: DevPki,
        taker: Identity,
        policy: Path | None = None,
        audit: Path | None = None,
    ) -> None:
        self.cluster = cluster
        self.taker_identity = taker
        self.original_backend = backends.tcp(tagged_reply(b"original"), "original")
        self.taker_backend = backends.tcp(tagged_reply(b"taker"), "taker")
        self.relay: Relay = cluster.start_relay(policy=policy, audit=audit)
        self.original = cluster.start_agent(
            pki.agent(0), self.relay, name="original", expose={SERVICE: self.original_backend.addr}
        )
        self.consumer = cluster.start_agent(
            pki.agent(1), self.relay, name="consumer", consume=[SERVICE]
        )

    def start_taker(self, *, wait: bool = True) -> Agent:
        return self.cluster.start_agent(
            self.taker_identity,
            self.relay,
            name="taker",
            expose={SERVICE: self.taker_backend.addr},
            wait=wait,
        )

    def assert_served_by(self, tag: bytes) -> None:
        assert ask(self.consumer, b"ping") == tag + b":ping"


def read_audit(
    path: Path, predicate: Callable[[dict[str, Any]], bool], wait: float = 10.0
) -> list[dict[str, Any]]:
    """The audit lines matching ``predicate``, polled until one shows up (``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        lines = (
            [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if path.exists()
            else []
        )
        hits = [x for x in lines if predicate(x)]
        if hits or time.monotonic() >= deadline:
            return hits
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_takeover_without_provide_rule_then_the_original_serves_again(
    cluster: Cluster, backends: Backends, pki: DevPki, taker_identity: Identity
) -> None:
    top = Topology(cluster, backends, pki, taker_identity)
    top.assert_served_by(b"original")

    since = top.relay.count()
    taker = top.start_taker()
    rec = top.relay.wait_for("registered", since=since, name=SERVICE, agent=taker.uri)
    assert (rec["providers"], rec["took_over"]) == (2, top.original.uri), rec
    top.assert_served_by(b"taker")  # the reference's last writer wins

    # The taker's process goes away: the original provider, still connected, serves again.
    since, c_since = top.relay.count(), top.consumer.count()
    taker.stop()
    top.relay.wait_for("agent disconnected", since=since, uri=taker.uri, services=SERVICE)
    for _ in range(3):
        top.assert_served_by(b"original")
    assert not top.relay.find("open rejected: service not found", since=since)
    assert not top.consumer.find("stream rejected", since=c_since)
    assert top.taker_backend.connections == 1
    assert top.original_backend.connections == 4
    assert top.original.running


@pytest.mark.timeout(90)
def test_provide_rule_refuses_the_taker_and_the_original_keeps_serving(
    cluster: Cluster, backends: Backends, pki: DevPki, taker_identity: Identity, tmp_path: Path
) -> None:
    rules = [
        *ALLOW_OPENS,
        {
            "id": "echo-original",
            "provider": pki.agent(0).uri,
            "service": SERVICE,
            "decision": "allow",
        },
    ]
    policy = write_policy(tmp_path / "policy.json", rules)
    audit = tmp_path / "audit.jsonl"
    top = Topology(cluster, backends, pki, taker_identity, policy=policy, audit=audit)
    top.relay.wait_for("policy loaded", rules=1, provide_rules=1)
    top.assert_served_by(b"original")

    since = top.relay.count()
    taker = top.start_taker(wait=False)
    refused = top.relay.wait_for("register refused by policy", since=since, uri=taker.uri)
    assert (refused["name"], refused["reason"]) == (SERVICE, "no matching provide rule"), refused
    assert refused["level"] == "WARN", refused
    # The agent gets no REGISTER_ACK: it says its registration failed, and (never accepted
    # by this relay) exits 1, as for any refusal before first contact.
    failed = taker.wait_for("expose: registration failed", timeout=REGISTER_ACK_WAIT + 10)
    assert "no REGISTER_ACK" in failed["err"], failed
    assert taker.wait_exit(10) == 1, taker.tail()
    assert not taker.find("service registered")
    assert not top.relay.find("registered", since=since, agent=taker.uri)

    for _ in range(2):
        top.assert_served_by(b"original")
    assert top.taker_backend.connections == 0

    (deny,) = read_audit(audit, lambda a: a.get("side") == "provide" and a["caller"] == taker.uri)
    assert (deny["decision"], deny["reason"], deny["target"], deny["tenant"]) == (
        "DECISION_DENY",
        "no matching provide rule",
        SERVICE,
        "acme",
    ), deny
    (allow,) = read_audit(
        audit, lambda a: a.get("side") == "provide" and a["caller"] == top.original.uri
    )
    assert (allow["decision"], allow["reason"]) == ("DECISION_ALLOW", "echo-original"), allow


@pytest.mark.timeout(120)
def test_provide_rules_reload_on_sighup(
    cluster: Cluster, backends: Backends, pki: DevPki, taker_identity: Identity, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy.json", ALLOW_OPENS)
    audit = tmp_path / "audit.jsonl"
    top = Topology(cluster, backends, pki, taker_identity, policy=policy, audit=audit)
    top.relay.wait_for("policy loaded", rules=1, provide_rules=0)
    top.assert_served_by(b"original")
    # No provide rule covers the name: the registration involved no rule, so the audit has the
    # open's two decisions and nothing about providing (as before provide rules existed).
    assert len(read_audit(audit, lambda a: a.get("side") == "callee")) == 1
    assert not read_audit(audit, lambda a: a.get("side") == "provide", wait=0)

    # Lock the name to the original provider.
    only_original = {
        "id": "echo-original",
        "provider": top.original.uri,
        "service": SERVICE,
        "decision": "allow",
    }
    write_policy(policy, [*ALLOW_OPENS, only_original])
    since = top.relay.count()
    top.relay.send_signal(signal.SIGHUP)
    top.relay.wait_for("policy reloaded", since=since, rules=1, provide_rules=1)
    taker = top.start_taker(wait=False)
    rec = top.relay.wait_for("register refused by policy", since=since, uri=taker.uri)
    assert rec["reason"] == "no matching provide rule", rec
    top.assert_served_by(b"original")
    taker.stop()

    # Open it to the taker as well: its next REGISTER is accepted and it takes over.
    also_taker = {
        "id": "echo-taker",
        "provider": taker.uri,
        "service": SERVICE,
        "decision": "allow",
    }
    write_policy(policy, [*ALLOW_OPENS, only_original, also_taker])
    since = top.relay.count()
    top.relay.send_signal(signal.SIGHUP)
    top.relay.wait_for("policy reloaded", since=since, rules=1, provide_rules=2)
    taker = top.start_taker()
    rec = top.relay.wait_for("registered", since=since, name=SERVICE, agent=taker.uri)
    assert rec["took_over"] == top.original.uri, rec
    assert not top.relay.find("register refused by policy", since=since)
    top.assert_served_by(b"taker")
    assert top.taker_backend.connections == 1
