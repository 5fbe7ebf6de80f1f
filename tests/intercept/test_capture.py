"""Tproxy mode put together: TransparentCapture, the Agent wiring and the CLI flags.

No iptables here: the original destination is faked (see ``test_tproxy.py``);
``tests/e2e/test_tproxy.py`` runs the real thing in a network namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from devpki import DevPki

import outrelay.agent.intercept.tproxy as tproxy_module
from outrelay.agent import agent as agent_module
from outrelay.agent import cli as agent_cli
from outrelay.agent.agent import Agent, AgentConfig, ListenerError
from outrelay.agent.intercept import (
    InterceptError,
    TproxyConfig,
    TransparentCapture,
    VipAllocator,
    check_platform,
    parse_dns_upstream,
)
from outrelay.agent.session import SessionConfig
from outrelay.transport import SocketStream

from .records import Records

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0


def no_op(local: SocketStream, service: str, dst: tuple[str, int]) -> None:
    local.abort()


def dns_query(addr: tuple[str, int], name: str, rdtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT)
        s.sendto(q.to_wire(), addr)
        data, _ = s.recvfrom(65535)
    return dns.message.from_wire(data)


def config(**kw: Any) -> TproxyConfig:
    base: dict[str, Any] = {
        "services": ("svc-web", "svc-payments"),
        "listen": ("127.0.0.1", 0),
        "dns_listen": "127.0.0.1:0",
        "dns_upstream": "none",
    }
    base.update(kw)
    return TproxyConfig(**base)


# -- small pieces -----------------------------------------------------------------------------


def test_check_platform() -> None:
    check_platform("linux")
    for other in ("darwin", "win32", "freebsd14"):
        with pytest.raises(InterceptError, match="intercept: tproxy mode requires linux"):
            check_platform(other)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("auto", "auto"),
        ("AUTO", "auto"),
        ("none", None),
        ("off", None),
        ("", None),
        ("10.0.0.10", ("10.0.0.10", 53)),
        ("10.0.0.10:5353", ("10.0.0.10", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5300", ("::1", 5300)),
    ],
)
def test_parse_dns_upstream(value: str, want: object) -> None:
    assert parse_dns_upstream(value) == want


@pytest.mark.parametrize("value", ["dns.google", "dns.google:53", "10.0.0.1:x", "10.0.0.1:99999"])
def test_parse_dns_upstream_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_dns_upstream(value)


# -- TransparentCapture -------------------------------------------------------------------------


async def test_start_allocates_in_flag_order_and_serves_dns(logs: Records) -> None:
    capture = TransparentCapture(config(services=("svc-web", "svc-payments", "svc-web")), no_op)
    await capture.start()
    try:
        assert capture.vips.items() == [
            ("svc-web", ipaddress.IPv4Address("100.64.0.1")),
            ("svc-payments", ipaddress.IPv4Address("100.64.0.2")),
        ]
        allocated = logs.find("vip allocated")
        assert allocated == [
            {"svc": "svc-web", "vip": "100.64.0.1"},
            {"svc": "svc-payments", "vip": "100.64.0.2"},
        ]
        assert capture.listener is not None and capture.listener.address is not None
        (bound,) = logs.find("intercept: tproxy listener bound")
        assert bound["addr"] == f"127.0.0.1:{capture.listener.address[1]}"
        assert capture.dns is not None and capture.dns.address is not None
        (running,) = logs.find("intercept: dns server running")
        assert running["suffix"] == ".outrelay" and running["upstream"] == "none"
        r = await asyncio.to_thread(dns_query, capture.dns.address, "svc-payments.outrelay")
        assert [rd.address for rd in r.answer[0]] == ["100.64.0.2"]
        messages = logs.messages()
        assert messages.index("vip allocated") < messages.index("intercept: tproxy listener bound")
    finally:
        await capture.close()
    assert capture.listener is None and capture.dns is None


async def test_not_linux_is_refused_before_anything_is_bound() -> None:
    capture = TransparentCapture(config(), no_op, platform="darwin")
    with pytest.raises(InterceptError, match="requires linux"):
        await capture.start()
    assert capture.listener is None and len(capture.vips) == 0


async def test_vip_exhaustion_is_fatal() -> None:
    capture = TransparentCapture(
        config(services=("a", "b", "c")), no_op, vips=VipAllocator("10.0.0.0/30")
    )
    with pytest.raises(InterceptError, match="VIP pool exhausted"):
        await capture.start()
    assert capture.listener is None


async def test_tproxy_listen_bind_failure_is_fatal_with_a_reason() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        capture = TransparentCapture(config(listen=("127.0.0.1", port)), no_op)
        with pytest.raises(InterceptError, match=f"127.0.0.1:{port}.*in use"):
            await capture.start()
    assert capture.listener is None and capture.dns is None


async def test_tproxy_listen_on_a_foreign_address_names_the_cause() -> None:
    capture = TransparentCapture(config(listen=("192.0.2.123", 15001)), no_op)
    with pytest.raises(InterceptError, match="not assigned"):
        await capture.start()


@pytest.mark.parametrize("bad", ["busy", "127.0.0.1:notaport", "192.0.2.123:5353"])
async def test_dns_listen_failure_is_logged_not_fatal(logs: Records, bad: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        dns_listen = f"127.0.0.1:{busy.getsockname()[1]}" if bad == "busy" else bad
        capture = TransparentCapture(config(dns_listen=dns_listen), no_op)
        await capture.start()
    try:
        assert capture.listener is not None  # still intercepting
        assert capture.dns is None
        (err,) = logs.find("dns server")
        assert "running without DNS" in err["err"]
        assert not logs.find("intercept: dns server running")
    finally:
        await capture.close()


async def test_upstream_auto_reads_resolv_conf(tmp_path: Path, logs: Records) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nnameserver 10.0.0.10\n")
    capture = TransparentCapture(
        config(dns_listen="127.0.0.1:0", dns_upstream="auto", resolv_conf=resolv), no_op
    )
    await capture.start()
    try:
        (running,) = logs.find("intercept: dns server running")
        # :0 is not port 53, so 127.0.0.1 (port 53) is not the agent itself
        assert running["upstream"] == "127.0.0.1:53"
        assert capture.dns is not None and capture.dns.responder.forwarding
    finally:
        await capture.close()


async def test_upstream_auto_without_another_nameserver_refuses(
    tmp_path: Path, logs: Records
) -> None:
    capture = TransparentCapture(
        config(dns_upstream="auto", resolv_conf=tmp_path / "missing"), no_op
    )
    await capture.start()
    try:
        assert capture.dns is not None and capture.dns.address is not None
        assert logs.find("intercept: dns server running")[0]["upstream"] == "none"
        r = await asyncio.to_thread(dns_query, capture.dns.address, "example.com")
        assert r.rcode() == dns.rcode.REFUSED
    finally:
        await capture.close()


# -- the Agent -----------------------------------------------------------------------------------


@pytest.fixture
def pki(dev_pki: DevPki) -> DevPki:
    return dev_pki


def agent_uri(pki: DevPki) -> str:
    return pki.agent(1).uri


def session_config(pki: DevPki) -> SessionConfig:
    # Nothing listens on the discard port: the session keeps retrying in the background.
    return SessionConfig(relays=(("127.0.0.1", 9),), uri=agent_uri(pki), tls=pki.tls(pki.agent(1)))


async def test_agent_hands_intercepted_connections_to_the_consumer_path(
    pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tproxy_module, "original_dst", lambda sock: ("100.64.0.2", 8443))
    calls: list[str] = []

    async def fake_consumer(session: Any, local: SocketStream, service: str, **kw: Any) -> None:
        calls.append(service)
        await local.send_all(f"consumer path for {service}\n".encode())

    monkeypatch.setattr(agent_module, "handle_consumer_connection", fake_consumer)
    agent = Agent(AgentConfig(session=session_config(pki), tproxy=config()))
    await agent.start()
    try:
        assert agent.capture is not None and agent.capture.listener is not None
        addr = agent.capture.listener.address
        assert addr is not None
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(*addr)
            data = await reader.read()  # the agent closes after the consumer path returns
        writer.close()
        assert data == b"consumer path for svc-payments\n"
        assert calls == ["svc-payments"]
    finally:
        await agent.shutdown()
    assert agent.capture.listener is None


async def test_agent_start_fails_cleanly_when_tproxy_cannot_bind(pki: DevPki) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        agent = Agent(
            AgentConfig(
                session=session_config(pki),
                consumes=[("svc-x", "127.0.0.1:0")],
                tproxy=config(listen=("127.0.0.1", port)),
            )
        )
        with pytest.raises(ListenerError, match="in use"):
            await agent.start()
    assert agent.capture is None
    assert not agent.started  # nothing started


# -- CLI -----------------------------------------------------------------------------------------


def base_argv(pki: DevPki) -> list[str]:
    return [
        "--relay",
        "127.0.0.1:9",
        "--uri",
        agent_uri(pki),
        "--cert",
        str(pki.agent(1).cert),
        "--key",
        str(pki.agent(1).key),
        "--ca",
        str(pki.ca_cert),
    ]


def build(argv: list[str]) -> AgentConfig:
    parser = agent_cli.build_parser()
    return agent_cli.build_config(parser.parse_args(argv))


def test_cli_builds_the_tproxy_config(pki: DevPki) -> None:
    cfg = build(
        [
            *base_argv(pki),
            "--intercept",
            "tproxy",
            "--consume",
            "svc-web",
            "--consume",
            "odd@name",
            "--tproxy-listen",
            "127.0.0.1:15002",
            "--dns-listen",
            "127.0.0.1:53",
            "--dns-suffix",
            "mesh",
            "--dns-upstream",
            "10.0.0.10",
        ]
    )
    assert cfg.consumes == []
    assert cfg.tproxy == TproxyConfig(
        services=("svc-web", "odd@name"),  # the whole value is the service name
        listen=("127.0.0.1", 15002),
        dns_listen="127.0.0.1:53",
        dns_suffix="mesh",
        dns_upstream="10.0.0.10",
    )


def test_cli_defaults(pki: DevPki) -> None:
    cfg = build([*base_argv(pki), "--intercept", "tproxy", "--consume", "svc-web"])
    assert cfg.tproxy == TproxyConfig(services=("svc-web",))
    assert cfg.tproxy.listen == ("127.0.0.1", 15001)
    assert cfg.tproxy.dns_listen == "127.0.0.1:5353"
    assert cfg.tproxy.dns_suffix == "outrelay"
    assert cfg.tproxy.dns_upstream == "auto"


def test_cli_tproxy_without_consume_starts_nothing(pki: DevPki) -> None:
    assert build([*base_argv(pki), "--intercept", "tproxy"]).tproxy is None


def test_cli_go_style_spellings(pki: DevPki) -> None:
    argv = [*base_argv(pki), "-intercept=tproxy", "-consume=svc-web", "-dns-listen=127.0.0.1:53"]
    parser = agent_cli.build_parser()
    args = parser.parse_args(agent_cli.go_style_argv(argv, parser))
    cfg = agent_cli.build_config(args)
    assert cfg.tproxy is not None and cfg.tproxy.dns_listen == "127.0.0.1:53"


def test_cli_not_linux_exits_1(
    pki: DevPki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    code = agent_cli.main([*base_argv(pki), "--intercept", "tproxy", "--consume", "svc-web"])
    assert code == 1
    assert "intercept: tproxy mode requires linux" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--tproxy-listen", "--dns-listen"])
def test_cli_malformed_tproxy_addresses_exit_2(
    pki: DevPki, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    argv = [*base_argv(pki), "--intercept", "tproxy", "--consume", "a", flag, "x"]
    assert agent_cli.main(argv) == 2
    assert f"{flag} 'x' is not host:port" in capsys.readouterr().err


def test_cli_bad_dns_upstream_exits_2(pki: DevPki, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*base_argv(pki), "--intercept", "tproxy", "--consume", "a", "--dns-upstream", "x.y"]
    assert agent_cli.main(argv) == 2
    assert "--dns-upstream" in capsys.readouterr().err


def test_cli_unknown_mode_exits_2(pki: DevPki, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_cli.main([*base_argv(pki), "--intercept", "TPROXY", "--consume", "a"]) == 2
    assert "argument --intercept: invalid choice: 'TPROXY'" in capsys.readouterr().err


def test_cli_tproxy_listen_in_use_exits_1(pki: DevPki, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        argv = [
            *base_argv(pki),
            "--intercept",
            "tproxy",
            "--consume",
            "svc-web",
            "--tproxy-listen",
            f"127.0.0.1:{port}",
            "--dns-listen",
            "127.0.0.1:0",
        ]
        assert agent_cli.main(argv) == 1
    text = capsys.readouterr().err
    assert "start interceptor" in text and f"127.0.0.1:{port}" in text
    assert 'msg="vip allocated" svc=svc-web vip=100.64.0.1' in text
