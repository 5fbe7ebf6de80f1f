"""STUN-lite through the session's one control reader (spec 03 §7.2, [REC] §3.7), in process."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from outrelay.agent.session import NotConnected, RelaySession, SessionConfig
from outrelay.pki import create_ca, issue_agent, issue_relay, write_identity
from outrelay.relay import Relay, RelayConfig
from outrelay.transport import QuicTlsConfig


@pytest.mark.timeout(30)
async def test_observed_address_matches_by_request_id(tmp_path: Path) -> None:
    ca = create_ca()
    ca_file, _ = write_identity(tmp_path, "ca", ca)
    relay_crt, relay_key = write_identity(tmp_path, "relay", issue_relay(ca))
    agent, uri = issue_agent(ca, tenant="acme")
    agent_crt, agent_key = write_identity(tmp_path, "agent", agent)
    relay = Relay(RelayConfig(str(relay_crt), str(relay_key), str(ca_file), listen_port=0))
    host, port = await relay.start()
    session = RelaySession(
        SessionConfig(
            relays=((host, port),),
            uri=uri,
            tls=QuicTlsConfig(str(agent_crt), str(agent_key), str(ca_file)),
        ),
        on_incoming=lambda s: s.abort(),
    )
    with pytest.raises(NotConnected):
        await session.observed_address()
    runner = asyncio.create_task(session.run())
    try:
        async with asyncio.timeout(10):
            await session.connected.wait()
        answers = await asyncio.gather(*(session.observed_address() for _ in range(3)))
        assert len(set(answers)) == 1
        ip, observed_port = answers[0]
        assert ip == "127.0.0.1" and observed_port > 0
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await relay.stop()
