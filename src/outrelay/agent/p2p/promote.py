"""P2P promotion shell (spec 03 §7.5–§7.8), **off unless ``--p2p-listen`` is given**.

What runs when enabled:

* a QUIC listener (ALPN ``orp/1``, client certificate required and verified)
  on ``--p2p-listen``; its own UDP socket, *not* yet shared with the relay
  connection (issue 7 item 1 is still open);
* the responder (provider) answers every CANDIDATE_OFFER with its local
  candidates (``--p2p-advertise`` first, then host candidates);
* the initiator (consumer) offers its candidates 1 s after a splice starts,
  checks the answer's candidates concurrently and staggered (:class:`CheckPlan`),
  sends MIGRATE_TO_P2P on ctrl, and swaps the stream onto the direct
  connection;
* the swap is symmetric (both ends are ours): each side :meth:`detaches
  <outrelay.agent.resumable.ResumableStream.detach>` its relay stream,
  sends STREAM_RESUME with its positions on the direct stream, retransmits
  what the peer has not received, installs the direct stream, and only then
  closes the old relay stream. No byte is lost or duplicated;
* the responder accepts a direct stream only from the stream's known peer
  (the dialling certificate's URI SAN must equal the consumer's URI);
* demotion: when the direct path breaks, the ResumableStream resumes through
  the relay with STREAM_RESUME (spec 03 §7.8 [REC]), like after a relay loss.

Missing (issue 7): the shared socket with CID routing, srflx in the offer,
the warm-up punch, a HELLO capability to fall back to the reference's
asymmetric migration, p2p_mode from the relay, the NAT namespace tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from outrelay.agent.p2p.candidates import Candidate, host_candidates, local_candidates
from outrelay.agent.p2p.checks import CheckOutcome, CheckPlan
from outrelay.agent.resumable import ResumableStream, ResumeFailed, exchange_resume
from outrelay.agent.session import RelaySession
from outrelay.observe import kv
from outrelay.orp import Candidate as CandidateMessage
from outrelay.orp import (
    CandidateAnswer,
    CandidateOffer,
    FrameType,
    MigrateToP2P,
    OrpError,
    StreamResume,
    encode_message,
)
from outrelay.pki import ClientVerifier, load_certificates
from outrelay.resume import ResumeError, retransmit_range
from outrelay.transport import (
    Connection,
    QuicServerHandle,
    QuicTlsConfig,
    Stream,
    TransportError,
    connect_quic,
    serve_quic,
)
from outrelay.wire import FrameReader, expect_message

__all__ = ["P2PConfig", "P2PService"]

log = logging.getLogger("outrelay.agent.p2p")

PROMOTION_DELAY = 1.0  # spec 03 §7.5
PROMOTION_BUDGET = 5.0  # spec 03 §7.5
SWAP_TIMEOUT = 5.0
"""Ours: the STREAM_RESUME exchange on the direct stream."""
ANSWER_QUEUE = 64
"""Offers waiting for an answer; more are dropped (the initiator times out)."""


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, int]
    """``--p2p-listen``: where the direct-path QUIC listener binds."""
    advertise: tuple[str, int] | None = None
    """``--p2p-advertise``: an address peers can reach us at (priority 100)."""


def _to_message(c: Candidate) -> CandidateMessage:
    return CandidateMessage(kind=c.kind, ip=c.ip, port=c.port, priority=c.priority)


def _from_message(m: CandidateMessage) -> Candidate:
    return Candidate(m.kind, m.ip, int(m.port), int(m.priority))


def _interface_addresses() -> list[str]:
    with contextlib.suppress(OSError):
        infos = socket.getaddrinfo(socket.gethostname(), None)
        return list(dict.fromkeys(str(i[4][0]) for i in infos))
    return []


class P2PService:
    """Listener, auto-answer and promotion for one agent; ``run()`` owns its tasks."""

    def __init__(self, session: RelaySession, tls: QuicTlsConfig, config: P2PConfig) -> None:
        self.session = session
        self.tls = tls
        self.config = config
        self._verifier = ClientVerifier(load_certificates(tls.ca_file))
        self._server: QuicServerHandle | None = None
        self.address: tuple[str, int] | None = None
        self._answers: dict[int, asyncio.Future[list[Candidate]]] = {}
        self._offers: asyncio.Queue[int] = asyncio.Queue(ANSWER_QUEUE)
        self._incoming: asyncio.Queue[Connection] = asyncio.Queue(ANSWER_QUEUE)
        self._candidates: list[Candidate] = []
        self._direct: set[Connection] = set()

    async def start(self) -> None:
        """Bind the listener and hook the session's candidate frames.

        Raises:
            OSError: the listen address could not be bound.
        """
        host, port = self.config.listen
        self._server = await serve_quic(
            host,
            port,
            self.tls,
            verify_client=self._verifier.verify,
            on_connection=self._on_connection,
            on_refused=lambda addr, why: log.warning(
                "p2p: direct dial refused", extra=kv(remote=f"{addr[0]}:{addr[1]}", reason=why)
            ),
        )
        self.address = self._server.address
        hosts = host_candidates(_interface_addresses(), self.address[1])
        self._candidates = local_candidates(hosts, advertised=self.config.advertise)
        self.session.on_candidates = self._on_candidates
        log.info(
            "p2p: listening",
            extra=kv(
                addr=f"{self.address[0]}:{self.address[1]}",
                candidates=",".join(f"{c.ip}:{c.port}/{c.priority}" for c in self._candidates),
            ),
        )

    async def run(self) -> None:
        """Answer offers and serve direct connections until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._answer_loop())
                while True:
                    conn = await self._incoming.get()
                    tg.create_task(_guard(self._serve_direct(conn), "direct connection"))
        finally:
            self.session.on_candidates = None
            if self._server is not None:
                self._server.close()
            for conn in list(self._direct):
                conn.close(0, "")

    # -- responder ---------------------------------------------------------------------

    def _on_candidates(self, frame_type: int, message: object) -> None:
        if isinstance(message, CandidateOffer):
            try:
                self._offers.put_nowait(message.stream_id)
            except asyncio.QueueFull:
                log.debug("p2p: offer dropped (queue full)", extra=kv(id=message.stream_id))
        elif isinstance(message, CandidateAnswer):
            waiter = self._answers.get(message.stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_result([_from_message(c) for c in message.candidates])

    async def _answer_loop(self) -> None:
        while True:
            sid = await self._offers.get()
            answer = CandidateAnswer(
                stream_id=sid, candidates=[_to_message(c) for c in self._candidates]
            )
            try:
                await self.session.send_control(FrameType.CANDIDATE_ANSWER, answer)
            except Exception as exc:  # NotConnected, TransportError
                log.debug("p2p: answer not sent", extra=kv(id=sid, err=str(exc)))

    def _on_connection(self, conn: Connection) -> None:
        try:
            self._incoming.put_nowait(conn)
        except asyncio.QueueFull:
            conn.close(0, "")

    async def _serve_direct(self, conn: Connection) -> None:
        self._direct.add(conn)
        try:
            async with asyncio.TaskGroup() as tg:
                try:
                    while True:
                        stream = await conn.accept_stream()
                        tg.create_task(_guard(self._direct_stream(conn, stream), "direct stream"))
                except TransportError:
                    pass
        finally:
            self._direct.discard(conn)

    async def _direct_stream(self, conn: Connection, stream: Stream) -> None:
        """Spec 03 §7.7 responder, made symmetric: verify, detach, echo, retransmit, swap."""
        reader = FrameReader(stream)
        try:
            async with asyncio.timeout(SWAP_TIMEOUT):
                frame = await reader.read_frame()
            if frame is None:
                raise OrpError("direct stream ended before STREAM_RESUME")
            resume = expect_message(frame, FrameType.STREAM_RESUME, StreamResume)
        except (TimeoutError, TransportError, OrpError) as exc:
            log.warning("p2p: bad direct stream", extra=kv(err=str(exc) or repr(exc)))
            stream.abort()
            return
        sid = resume.stream_id
        target = self.session.resumable(sid)
        peer = self.session.peer_of(sid)
        dialler = getattr(conn, "identity", "") or ""
        if target is None or not peer or dialler != peer:
            log.warning(
                "p2p: direct stream refused: not the stream's peer",
                extra=kv(id=sid, dialler=dialler, known=bool(target)),
            )
            stream.abort()
            return
        old = target.detach()
        if old is None:
            log.info("p2p: stream not migratable now", extra=kv(id=sid))
            stream.abort()
            return
        try:
            gap = retransmit_range(resume.peer_ack_position, target.ring)
            target.apply_checkpoint(resume.my_position, resume.peer_ack_position)
            async with asyncio.timeout(SWAP_TIMEOUT):
                await stream.send_all(
                    encode_message(
                        FrameType.STREAM_RESUME,
                        StreamResume(
                            stream_id=sid,
                            my_position=target.positions.sent,
                            peer_ack_position=target.positions.received,
                        ),
                    )
                )
        except (TimeoutError, TransportError, ResumeError) as exc:
            log.warning("p2p: migration failed; back to the relay", extra=kv(id=sid, err=str(exc)))
            stream.abort()
            target.fail_migration(old, str(exc) or repr(exc))
            return
        target.install(stream, reader.take_leftover())
        target.path = "direct"
        log.info(
            "p2p: migrated to direct",
            extra=kv(id=sid, role="responder", path=_path(conn), retransmitted=len(gap)),
        )
        await target.retransmit(stream, gap)
        await _close_quietly(old)

    # -- initiator -----------------------------------------------------------------------

    async def promote(self, stream: ResumableStream) -> None:
        """Consumer: offer, check, migrate (spec 03 §7.5). Failures leave the stream on the relay.

        A direct connection that carried the stream is closed when this
        returns (cancelled with the bridge). Never raises, except when cancelled.
        """
        try:
            await self._promote(stream)
        except Exception:
            log.exception("p2p: promotion failed", extra=kv(id=stream.stream_id))

    async def _promote(self, stream: ResumableStream) -> None:
        sid = stream.stream_id
        await asyncio.sleep(PROMOTION_DELAY)
        conn: Connection | None = None
        try:
            started = time.monotonic()
            try:
                async with asyncio.timeout(PROMOTION_BUDGET):
                    remote = await self._exchange(sid)
                    conn, winner, rtt = await self._check(remote)
                    await self.session.send_control(
                        FrameType.MIGRATE_TO_P2P,
                        MigrateToP2P(stream_id=sid, selected=_to_message(winner)),
                    )
            except Exception as exc:
                log.debug("p2p: stayed on relay", extra=kv(id=sid, err=str(exc) or repr(exc)))
                if conn is not None:
                    conn.close(0, "")
                return
            if not await self._swap(stream, conn):
                conn.close(0, "")
                return
            log.info(
                "p2p: migrated to direct",
                extra=kv(
                    id=sid,
                    role="initiator",
                    path=f"{winner.ip}:{winner.port}",
                    rtt_ms=f"{rtt * 1000:.1f}",
                    took_ms=int((time.monotonic() - started) * 1000),
                ),
            )
            await conn.wait_closed()  # the direct path lives as long as the stream
        finally:
            if conn is not None:
                conn.close(0, "")

    async def _exchange(self, sid: int) -> list[Candidate]:
        waiter: asyncio.Future[list[Candidate]] = asyncio.get_running_loop().create_future()
        self._answers[sid] = waiter
        try:
            await self.session.send_control(
                FrameType.CANDIDATE_OFFER,
                CandidateOffer(
                    stream_id=sid, candidates=[_to_message(c) for c in self._candidates]
                ),
            )
            return await waiter
        finally:
            self._answers.pop(sid, None)

    async def _check(self, remote: list[Candidate]) -> tuple[Connection, Candidate, float]:
        """Concurrent, staggered checks; the first full QUIC+mTLS handshake wins."""
        loop = asyncio.get_running_loop()
        plan = CheckPlan(remote)
        plan.start(loop.time())
        dials: dict[asyncio.Task[Any], Candidate] = {}
        try:
            while plan.outcome is CheckOutcome.RUNNING:
                for candidate in plan.poll(loop.time()):
                    task = loop.create_task(
                        connect_quic(
                            candidate.ip,
                            candidate.port,
                            self.tls,
                            handshake_timeout=plan.pair_timeout,
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

    async def _swap(self, stream: ResumableStream, conn: Connection) -> bool:
        sid = stream.stream_id
        old = stream.detach()
        if old is None:
            return False
        try:
            async with asyncio.timeout(SWAP_TIMEOUT):
                direct, leftover, gap = await exchange_resume(conn, stream)
        except (TimeoutError, TransportError, OrpError, ResumeError, ResumeFailed) as exc:
            log.warning(
                "p2p: migration failed; back to the relay",
                extra=kv(id=sid, err=str(exc) or repr(exc)),
            )
            stream.fail_migration(old, str(exc) or repr(exc))
            return False
        stream.install(direct, leftover)
        stream.path = "direct"
        await stream.retransmit(direct, gap)
        await _close_quietly(old)  # FIN the old relay stream after the swap ([REC] §7.7)
        return True


async def _guard(coro: Coroutine[Any, Any, None], what: str) -> None:
    """Run a child task; a bug in one connection must not stop the listener."""
    try:
        await coro
    except Exception:
        log.exception("p2p: task failed", extra=kv(task=what))


async def _close_quietly(stream: Stream) -> None:
    with contextlib.suppress(TransportError):
        await stream.aclose()


def _path(conn: Connection) -> str:
    host, port = conn.peer.address
    return f"{host}:{port}"
