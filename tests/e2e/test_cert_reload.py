"""Certificate rotation without a restart (issue 17 item 4): SIGHUP and ``--watch-certs``.

Real relay and agent processes on 127.0.0.1. Agents get identities of their own
(written under the test's directory, never the session's dev PKI files), so the
tests can overwrite them as a certificate manager would:

* an agent's certificate rotated mid-transfer: it reconnects with the new serial,
  the stream resumes, sha256 equal;
* a relay's server certificate and CA rotated: established agents stay, a new
  agent whose certificate and trust are only the new CA's gets in;
* a reload of garbage or a mismatched key keeps the old identity (a redial after
  a relay restart still works) and says why;
* ``--watch-certs`` reloads on a Kubernetes-style symlink swap, no SIGHUP.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from devpki import DevPki, Identity
from quicbackends import QUIC_BACKEND_PARAMS

from outrelay.pki import create_ca, issue_relay
from outrelay.pki.issue import Issued

from .harness import Agent, Backends, Cluster, Relay, Transfer, free_tcp_port, free_udp_port

pytestmark = [pytest.mark.e2e]

MiB = 1 << 20


def _serial(path: Path) -> str:
    return f"{x509.load_pem_x509_certificate(path.read_bytes()).serial_number:x}"


def _fresh(pki: DevPki, name: str, out: Path, uri: str | None = None) -> Identity:
    """A new agent identity in ``out``; with ``uri``, the same agent (same UUID) re-issued."""
    agent_id = uuid.UUID(uri.rsplit("/", 1)[1]) if uri else None
    return pki.issue_agent(name, out=out, agent_id=agent_id)


def _replace(src: Identity, dst: Identity) -> None:
    """Put ``src``'s files in place of ``dst``'s the way a renewer does (rename over)."""
    for a, b in ((src.cert, dst.cert), (src.key, dst.key)):
        tmp = b.with_suffix(b.suffix + ".tmp")
        shutil.copyfile(a, tmp)
        os.replace(tmp, b)


def _echo_once(port: int, payload: bytes = b"still here\n") -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(64)
            assert chunk, "echo closed early"
            got += chunk
    assert got == payload


def _pair(
    cluster: Cluster, backends: Backends, relay: Relay, tmp: Path, *extra: str
) -> tuple[Agent, Agent]:
    return _pair_with(cluster, backends, relay, tmp, list(extra), list(extra))


def _pair_with(
    cluster: Cluster,
    backends: Backends,
    relay: Relay,
    tmp: Path,
    provider_args: list[str],
    consumer_args: list[str],
) -> tuple[Agent, Agent]:
    """An echo provider and a consumer with identities of their own under ``tmp``."""
    echo = backends.echo()
    prov_id = _fresh(cluster.pki, "provider", tmp / "provider")
    cons_id = _fresh(cluster.pki, "consumer", tmp / "consumer")
    provider = cluster.start_agent(
        prov_id, relay, expose={"echo": echo.addr}, name="provider", args=provider_args
    )
    consumer = cluster.start_agent(
        cons_id, relay, consume=["echo"], name="consumer", args=consumer_args
    )
    return provider, consumer


@pytest.mark.timeout(180)
@pytest.mark.parametrize("quic_backend", QUIC_BACKEND_PARAMS)  # the agents' dialling library
def test_rotation_during_a_transfer_resumes_every_stream(
    cluster: Cluster, backends: Backends, tmp_path: Path
) -> None:
    relay = cluster.start_relay()
    provider, consumer = _pair(cluster, backends, relay, tmp_path)
    transfer = Transfer(consumer.port("echo"), 16 * MiB, pace=0.05)  # ~64 writes, ~3+ s
    transfer.wait_received(0.2, timeout=60)
    marks = {a.name: a.count() for a in (provider, consumer)}
    relay_since = relay.count()
    new_serials = {}
    for agent in (consumer, provider):
        renewed = _fresh(cluster.pki, "renewed", tmp_path / f"{agent.name}-new", agent.uri)
        _replace(renewed, agent.identity)
        new_serials[agent.name] = _serial(agent.identity.cert)
        agent.send_signal(signal.SIGHUP)
    for agent in (consumer, provider):
        since = marks[agent.name]
        done = agent.wait_for("certificate reloaded", since=since, timeout=10)
        assert done["serial"] == new_serials[agent.name], done
        agent.wait_for("session: reconnecting", since=since, timeout=10)
        agent.wait_for("session: reconnected", since=since, timeout=30)
        # The relay saw the new certificate on the new connection.
        relay.wait_for(
            "agent connected", uri=agent.uri, serial=new_serials[agent.name], since=relay_since
        )
    transfer.wait(timeout=120)
    transfer.check_exact()
    resumed = sum(
        len(a.find("session: stream resumed", since=marks[a.name])) for a in (provider, consumer)
    )
    assert resumed >= 1, cluster.log_tail(40)
    assert not consumer.find("certificate reload failed") and not provider.find(
        "certificate reload failed"
    )


def _tcp_server_serial(port: int, ident: Identity, ca_file: Path) -> str:
    """The serial of the certificate the relay's TLS+yamux listener presents to a new client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(ident.cert, ident.key)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.set_alpn_protocols(["orp/1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return f"{x509.load_der_x509_certificate(der).serial_number:x}"


def _write_ca_bundle(path: Path, *cas: Issued) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(ca.cert_pem() for ca in cas))
    return path


@pytest.mark.timeout(180)
def test_relay_rotation_keeps_agents_and_new_handshakes_see_the_new_certificate(
    cluster: Cluster, backends: Backends, pki: DevPki, tmp_path: Path
) -> None:
    rdir = tmp_path / "relay"
    rdir.mkdir()
    cert, key, ca = rdir / "relay.crt", rdir / "relay.key", rdir / "ca.crt"
    shutil.copyfile(pki.relay_cert, cert)
    shutil.copyfile(pki.relay_key, key)
    shutil.copyfile(pki.ca_cert, ca)
    tcp_port = free_tcp_port()
    relay = cluster.start_relay(
        args=[
            *("--cert", str(cert), "--key", str(key), "--ca", str(ca)),
            *("--listen-tcp", f"127.0.0.1:{tcp_port}"),
        ]
    )
    _provider, consumer = _pair(cluster, backends, relay, tmp_path)
    _echo_once(consumer.port("echo"))
    old_serial = _serial(cert)
    assert _tcp_server_serial(tcp_port, consumer.identity, pki.ca_cert) == old_serial

    # A second CA: the new server certificate comes from it, and the bundle
    # trusts both (old agents keep working, new ones may come from either).
    ca2 = create_ca("Rotated CA")
    new_cert, new_key = pki.write("relay-new", issue_relay(ca2), out=tmp_path / "new")
    since = relay.count()
    bundle = _write_ca_bundle(tmp_path / "new" / "bundle.crt", pki.ca, ca2)
    os.replace(bundle, ca)
    os.replace(new_cert, cert)
    os.replace(new_key, key)
    relay.send_signal(signal.SIGHUP)
    done = relay.wait_for("certificate reloaded", since=since, timeout=10)
    assert done["serial"] == _serial(cert)

    # Existing connections stay and carry new streams.
    _echo_once(consumer.port("echo"))
    time.sleep(0.5)
    assert not relay.find("agent disconnected", since=since), cluster.log_tail(30)

    # A new agent that trusts only the new CA (and has a certificate from it)
    # gets in: the relay presented the new certificate and verifies clients
    # against the new bundle.
    ca2_file = _write_ca_bundle(tmp_path / "ca2" / "ca.crt", ca2)
    newcomer = pki.issue_agent("newcomer", out=tmp_path / "ca2", ca=ca2)
    cluster.start_agent(newcomer, relay, consume=["echo"], args=["--ca", str(ca2_file)])
    relay.wait_for("agent connected", uri=newcomer.uri, since=since)
    # TCP/443 too: a new TLS handshake gets the new certificate (verified against CA2 only).
    assert _tcp_server_serial(tcp_port, newcomer, ca2_file) == done["serial"] != old_serial


@pytest.mark.timeout(180)
def test_a_failed_reload_keeps_the_old_identity_and_says_why(
    cluster: Cluster, backends: Backends, tmp_path: Path
) -> None:
    relay = cluster.start_relay()
    provider, consumer = _pair(cluster, backends, relay, tmp_path)
    old_serial = _serial(consumer.identity.cert)
    good_cert = consumer.identity.cert.read_bytes()

    since = consumer.count()
    consumer.identity.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    consumer.send_signal(signal.SIGHUP)
    why = consumer.wait_for("certificate reload failed; keeping the current identity", since=since)
    assert why["level"] == "WARN" and why["err"], why

    # A key that belongs to another certificate.
    consumer.identity.cert.write_bytes(good_cert)
    shutil.copyfile(provider.identity.key, consumer.identity.key)
    since = consumer.count()
    consumer.send_signal(signal.SIGHUP)
    why = consumer.wait_for("certificate reload failed; keeping the current identity", since=since)
    assert "does not match" in why["err"], why
    assert not consumer.find("session: reconnecting")

    # Prove the old identity is still in use for new handshakes: restart the
    # relay on the same port so both agents must dial again with the files
    # they loaded before (the ones on disk are now broken).
    relay.kill()
    time.sleep(1)
    relay = cluster.start_relay(port=relay.port, name="relay")
    relay.wait_for("agent connected", uri=consumer.uri, serial=old_serial, timeout=30)
    relay.wait_for("agent connected", uri=provider.uri, timeout=30)
    consumer.wait_for("session: reconnected", since=since, timeout=30)
    time.sleep(0.5)
    _echo_once(consumer.port("echo"))


@pytest.mark.timeout(180)
def test_relay_failed_reload_keeps_serving(
    cluster: Cluster, backends: Backends, pki: DevPki, tmp_path: Path
) -> None:
    rdir = tmp_path / "relay"
    rdir.mkdir()
    cert, key = rdir / "relay.crt", rdir / "relay.key"
    shutil.copyfile(pki.relay_cert, cert)
    shutil.copyfile(pki.relay_key, key)
    relay = cluster.start_relay(args=["--cert", str(cert), "--key", str(key)])
    since = relay.count()
    other = issue_relay(pki.ca)  # same CA, but its own key
    key.write_bytes(other.key_pem())
    relay.send_signal(signal.SIGHUP)
    why = relay.wait_for("certificate reload failed; keeping the current identity", since=since)
    assert "does not match" in why["err"], why
    # New handshakes still work (with the old certificate and key).
    _provider, consumer = _pair(cluster, backends, relay, tmp_path)
    _echo_once(consumer.port("echo"))


@pytest.mark.timeout(180)
def test_watch_certs_reloads_a_symlink_swap_without_sighup(
    cluster: Cluster, backends: Backends, tmp_path: Path
) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    provider_id = _fresh(cluster.pki, "provider", tmp_path / "provider")
    provider = cluster.start_agent(provider_id, relay, expose={"echo": echo.addr}, name="provider")
    # A Secret volume: <dir>/tls.crt -> ..data/tls.crt, ..data -> ..<version>.
    vol = tmp_path / "secret"
    first = _fresh(cluster.pki, "v1", vol / "..v1")
    (vol / "..v1" / "v1.crt").rename(vol / "..v1" / "tls.crt")
    (vol / "..v1" / "v1.key").rename(vol / "..v1" / "tls.key")
    (vol / "..data").symlink_to("..v1")
    (vol / "tls.crt").symlink_to("..data/tls.crt")
    (vol / "tls.key").symlink_to("..data/tls.key")
    ident = Identity(name="consumer", uri=first.uri, cert=vol / "tls.crt", key=vol / "tls.key")
    consumer = cluster.start_agent(
        ident,
        relay,
        consume=["echo"],
        name="consumer",
        args=["--watch-certs", "--watch-certs-interval", "0.5"],
    )
    _echo_once(consumer.port("echo"))
    since = consumer.count()
    second = _fresh(cluster.pki, "v2", vol / "..v2", first.uri)
    (vol / "..v2" / "v2.crt").rename(vol / "..v2" / "tls.crt")
    (vol / "..v2" / "v2.key").rename(vol / "..v2" / "tls.key")
    tmp_link = vol / "..data_tmp"
    tmp_link.symlink_to("..v2")
    os.replace(tmp_link, vol / "..data")
    done = consumer.wait_for("certificate reloaded", since=since, timeout=15)
    assert done["trigger"] == "file change"
    assert done["serial"] == _serial(vol / "..v2" / "tls.crt") != _serial(vol / "..v1" / "tls.crt")
    consumer.wait_for("session: reconnected", since=since, timeout=30)
    relay.wait_for("agent connected", uri=first.uri, serial=done["serial"])
    _echo_once(consumer.port("echo"))
    assert second.uri == first.uri
    assert provider.running


@pytest.mark.timeout(180)
def test_rotation_with_direct_paths_keeps_promoting(
    cluster: Cluster, backends: Backends, tmp_path: Path
) -> None:
    """With --p2p-listen: a promoted stream survives the reload (the P2P listener's
    certificate and peer verifier are reloaded too), and a stream opened afterwards
    is promoted again."""
    relay = cluster.start_relay()
    p2p = [[f"--p2p-listen=127.0.0.1:{free_udp_port()}"] for _ in range(2)]
    provider, consumer = _pair_with(cluster, backends, relay, tmp_path, p2p[0], p2p[1])
    transfer = Transfer(consumer.port("echo"), 8 * MiB, pace=0.05)
    consumer.wait_for("p2p: migrated to direct", timeout=15)
    marks = {a.name: a.count() for a in (provider, consumer)}
    for agent in (consumer, provider):
        renewed = _fresh(cluster.pki, "renewed", tmp_path / f"{agent.name}-new", agent.uri)
        _replace(renewed, agent.identity)
        agent.send_signal(signal.SIGHUP)
    for agent in (consumer, provider):
        agent.wait_for("certificate reloaded", since=marks[agent.name], timeout=10)
        agent.wait_for("session: reconnected", since=marks[agent.name], timeout=30)
    transfer.wait(timeout=120)
    transfer.check_exact()
    since = consumer.count()
    second = Transfer(consumer.port("echo"), 8 * MiB, pace=0.1)
    consumer.wait_for("p2p: migrated to direct", since=since, timeout=15)
    second.wait(timeout=120)
    second.check_exact()
