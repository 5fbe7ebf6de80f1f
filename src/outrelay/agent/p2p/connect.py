"""Connectivity checks, the shell (spec 03 §7.5): dial an answer's candidates as planned.

:class:`~outrelay.agent.p2p.checks.CheckPlan` decides when each candidate is
dialled and which success wins; this runs the dials from the shared UDP socket
and keeps the winning QUIC connection (every other one is closed).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from outrelay.agent.p2p.candidates import Candidate
from outrelay.agent.p2p.checks import CheckOutcome, CheckPlan
from outrelay.observe import kv
from outrelay.pki.verify import first_uri_san
from outrelay.transport import Connection, SharedUdpEndpoint

__all__ = ["check_candidates"]

log = logging.getLogger("outrelay.agent.p2p")


async def check_candidates(
    endpoint: SharedUdpEndpoint, remote: list[Candidate], expect_uri: str = ""
) -> tuple[Connection, Candidate, float]:
    """Concurrent, staggered checks; the first full QUIC+mTLS handshake wins.

    With ``expect_uri`` (the peer told it through the relay) a handshake
    with an agent whose certificate names someone else is a failed check:
    a private address can lead to another agent of the same CA.

    Returns:
        The direct connection, the candidate it reached and the check's RTT.

    Raises:
        ConnectionError: no candidate answered (the plan's outcome says why).
    """
    loop = asyncio.get_running_loop()
    plan = CheckPlan(remote)
    plan.start(loop.time())
    dials: dict[asyncio.Task[Any], Candidate] = {}
    try:
        while plan.outcome is CheckOutcome.RUNNING:
            for candidate in plan.poll(loop.time()):
                task = loop.create_task(
                    endpoint.connect(
                        candidate.ip, candidate.port, handshake_timeout=plan.pair_timeout
                    )
                )
                dials[task] = candidate
            deadline = plan.next_deadline()
            if deadline is None:
                break
            running = {t for t in dials if not t.done()}
            if not running:
                await asyncio.sleep(max(deadline - loop.time(), 0))
                continue
            done, _ = await asyncio.wait(
                running, timeout=max(deadline - loop.time(), 0), return_when="FIRST_COMPLETED"
            )
            for task in done:
                candidate = dials[task]
                if task.exception() is not None:
                    plan.failed(candidate, loop.time())
                elif expect_uri and _server_uri(task.result()) != expect_uri:
                    log.warning(
                        "p2p: direct dial reached another agent",
                        extra=kv(
                            to=f"{candidate.ip}:{candidate.port}",
                            got=_server_uri(task.result()),
                            want=expect_uri,
                        ),
                    )
                    task.result().close(0, "")
                    del dials[task]
                    plan.failed(candidate, loop.time())
                elif plan.succeeded(candidate, loop.time()):
                    assert plan.rtt is not None
                    winner = task.result()
                    del dials[task]
                    return winner, candidate, plan.rtt
                else:
                    task.result().close(0, "")
        raise ConnectionError(f"no direct pair ({plan.outcome.value})")
    finally:
        for task in dials:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                task.result().close(0, "")


def _server_uri(conn: Connection) -> str:
    certificate = conn.peer.certificate
    return (first_uri_san(certificate) or "") if certificate is not None else ""
