"""P2P promotion shell (spec 03 §2.3, §7.5–§7.9), **off unless ``--p2p-listen`` is given**.

What runs when enabled:

* the **shared UDP socket** (:mod:`outrelay.transport.quic.shared_udp`) bound at
  ``--p2p-listen``: the relay connection, the direct-path QUIC listener
  (ALPN ``orp/1``, client certificate required and verified), the checks and
  the warm-up punches all use it, so the srflx address the relay observes is
  the mapping a peer dials;
* **candidates**: ``--p2p-advertise`` (100), srflx from OBSERVED_ADDR_QUERY
  (re-asked after every reconnect; [REC] priority 65), host addresses of the
  interfaces (§7.1), ordered by priority ([REC] §7.5), one per address;
* the responder (provider) answers every CANDIDATE_OFFER with its candidates
  and first sends the one-byte warm-up punch to each offered address (§7.6,
  before the answer so the initiator's first dial finds the pinhole open);
* the initiator (consumer) offers 1 s after a splice starts, checks the
  answer's candidates concurrently and staggered (:class:`CheckPlan`), sends
  MIGRATE_TO_P2P on ctrl and swaps the stream onto the direct connection;
* **symmetric swap** when both ends are ours (capability ``p2p-resume-v2``,
  in HELLO and as a marker entry in the offer/answer): each side detaches
  its relay stream, sends STREAM_RESUME with its positions on the direct
  stream, retransmits what the peer lacks, installs the direct stream, and
  only then FINs the old relay stream. Against a **reference peer** the wire
  is the reference's (§7.7: the initiator sends STREAM_RESUME and reads no
  echo; the responder retransmits and sends none); as initiator we swap only
  once the peer has acknowledged every byte we sent, so nothing is lost;
* the responder accepts a direct stream only from the stream's known peer
  (the dialling certificate's URI SAN must equal the consumer's URI);
* **p2p_mode** (§7.9): our relay tells it in STREAM_READY; FORBIDDEN means no
  offer at all; REQUIRED promotes without the 1 s delay;
* **demotion** (§7.8 [REC]): when the direct path dies (peer close, or no
  answer to keep-alives within the QUIC silence bound), the ResumableStream
  resumes through the relay with STREAM_RESUME, like after a relay loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from outrelay.agent.p2p.candidates import (
    Candidate,
    capability_marker,
    host_candidates,
    identity_marker,
    local_candidates,
    punch_targets,
    split_capabilities,
)
from outrelay.agent.p2p.connect import check_candidates
from outrelay.agent.p2p.interfaces import interface_addresses
from outrelay.agent.p2p.swap import (
    SWAP_TIMEOUT,
    accept_checkpoints,
    apply_checkpoints,
    close_quietly,
    send_checkpoints,
    swap_reference,
    swap_symmetric,
)
from outrelay.agent.resumable import (
    ResumableStream,
    resume_frame,
)
from outrelay.agent.session import NotConnected, RelaySession
from outrelay.observe import kv, ms
from outrelay.orp import (
    CAP_P2P_RESUME_V2,
    CandidateAnswer,
    CandidateOffer,
    FrameType,
    MigrateToP2P,
    OrpError,
    P2PMode,
    StreamResume,
)
from outrelay.orp import Candidate as CandidateMessage
from outrelay.pki import ClientVerifier, load_certificates
from outrelay.resume import ResumeError, retransmit_range
from outrelay.transport import (
    PUNCH,
    Connection,
    QuicTlsConfig,
    SharedUdpEndpoint,
    Stream,
    TransportError,
    open_shared_udp,
)
from outrelay.wire import FrameReader, expect_message

__all__ = ["P2PConfig", "P2PService"]

log = logging.getLogger("outrelay.agent.p2p")

PROMOTION_DELAY = 1.0  # spec 03 §7.5
PROMOTION_BUDGET = 5.0  # spec 03 §7.5
ANSWER_QUEUE = 64
"""Offers waiting for an answer; more are dropped (the initiator times out)."""
SRFLX_POLL = 1.0
"""How often the candidate task looks for a new relay connection."""
REFERENCE_DRAIN = 0.5
"""Responder to a reference initiator: how long our reader may take what is still in
flight on the relay stream before we stop reading it."""
PEER_CAPS_MAX = 4096
"""Streams whose peer capabilities we remember (oldest forgotten first)."""


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, int]
    """``--p2p-listen``: where the direct-path QUIC listener binds."""
    advertise: tuple[str, int] | None = None
    """``--p2p-advertise``: an address peers can reach us at (priority 100)."""
    reference_wire: bool = False
    """``--p2p-reference-wire``: no capability marker, the reference's asymmetric
    swap, p2p mode ignored (interop tests)."""


def _to_message(c: Candidate) -> CandidateMessage:
    return CandidateMessage(kind=c.kind, ip=c.ip, port=c.port, priority=c.priority)


def _from_message(m: CandidateMessage) -> Candidate:
    return Candidate(m.kind, m.ip, int(m.port), int(m.priority))


class P2PService:
    """Listener, auto-answer and promotion for one agent; ``run()`` owns its tasks."""

    session: RelaySession
    """The relay session, from :meth:`start` on (it was given this service at construction)."""

    def __init__(self, tls: QuicTlsConfig, config: P2PConfig) -> None:
        self.tls = tls
        self.config = config
        self.endpoint: SharedUdpEndpoint | None = None
        """The shared UDP socket once started; the session dials the relay from it."""
        self.address: tuple[str, int] | None = None
        self._answers: dict[int, asyncio.Future[list[Candidate]]] = {}
        self._offers: asyncio.Queue[tuple[int, list[Candidate]]] = asyncio.Queue(ANSWER_QUEUE)
        self._incoming: asyncio.Queue[Connection] = asyncio.Queue(ANSWER_QUEUE)
        self._hosts: list[Candidate] = []
        self._candidates: list[Candidate] = []
        self._peer_caps: dict[int, frozenset[str]] = {}
        """Stream id -> capabilities the peer's offer announced (responder side)."""
        self._direct: set[Connection] = set()

    def reload_tls(self) -> None:
        """Certificate reload: inbound direct dials get our new certificate and are
        verified against the new CA bundle (the files at ``tls``'s paths changed).

        Raises:
            OSError, ValueError, PkiError: the files cannot be loaded (nothing changed).
        """
        verifier = ClientVerifier(load_certificates(self.tls.ca_file))
        if self.endpoint is not None:
            self.endpoint.reload_tls(self.tls)
        self._verifier = verifier

    @property
    def candidates(self) -> list[Candidate]:
        """What we offer and answer now (advertised, srflx, hosts)."""
        return list(self._candidates)

    async def start(self, session: RelaySession) -> None:
        """Bind the shared socket; from now on ``session`` (built with us) dials from it.

        Raises:
            OSError: the listen address could not be bound.
        """
        self.session = session
        self._verifier = ClientVerifier(load_certificates(self.tls.ca_file))
        host, port = self.config.listen
        self.endpoint = await open_shared_udp(
            host,
            port,
            self.tls,
            # Looked up per handshake: :meth:`reload_tls` swaps the verifier.
            verify_client=lambda leaf, chain: self._verifier.verify(leaf, chain),
            on_connection=self._on_connection,
            on_refused=lambda addr, why: log.warning(
                "p2p: direct dial refused", extra=kv(remote=f"{addr[0]}:{addr[1]}", reason=why)
            ),
        )
        self.address = self.endpoint.address
        bound = self.address[0]
        addresses = interface_addresses() if bound in ("0.0.0.0", "::") else [bound]
        self._hosts = host_candidates(addresses, self.address[1])
        self._candidates = local_candidates(self._hosts, advertised=self.config.advertise)
        log.info(
            "p2p: listening",
            extra=kv(
                addr=f"{self.address[0]}:{self.address[1]}", candidates=_show(self._candidates)
            ),
        )

    async def run(self) -> None:
        """Answer offers, keep srflx fresh and serve direct connections until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._answer_loop())
                tg.create_task(self._srflx_loop())
                while True:
                    conn = await self._incoming.get()
                    tg.create_task(_guard(self._serve_direct(conn), "direct connection"))
        finally:
            for conn in list(self._direct):
                conn.close(0, "")

    def close(self) -> None:
        """Close the shared socket (after the session: the relay connection uses it)."""
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.close()

    def _offered(self) -> list[Candidate]:
        """Our candidates, plus markers for a peer of ours: the symmetric swap, and who we are."""
        if self.config.reference_wire:
            return list(self._candidates)
        return [
            *self._candidates,
            capability_marker(CAP_P2P_RESUME_V2),
            identity_marker(self.session.config.uri),
        ]

    def _mode(self, sid: int) -> P2PMode | None:
        """The relay's p2p mode for ``sid`` (None: not told; the reference agent never is)."""
        return None if self.config.reference_wire else self.session.p2p_mode(sid)

    async def _srflx_loop(self) -> None:
        """Ask the relay for our srflx address after every (re)connect (spec 03 §7.2)."""
        seen = -1
        while True:
            await self.session.connected.wait()
            generation = self.session.link_generation
            if generation != seen:
                seen = generation
                srflx: tuple[str, int] | None = None
                if self.session.on_shared_socket:
                    try:
                        srflx = await self.session.observed_address()
                    except (NotConnected, TimeoutError, TransportError, OrpError) as exc:
                        log.info("p2p: no srflx candidate", extra=kv(err=str(exc) or repr(exc)))
                self._candidates = local_candidates(
                    self._hosts, srflx=srflx, advertised=self.config.advertise
                )
                log.info(
                    "p2p: candidates",
                    extra=kv(
                        srflx=f"{srflx[0]}:{srflx[1]}" if srflx else "",
                        candidates=_show(self._candidates),
                    ),
                )
            await asyncio.sleep(SRFLX_POLL)

    # -- responder ---------------------------------------------------------------------

    def on_candidates(self, frame_type: int, message: CandidateOffer | CandidateAnswer) -> None:
        """CANDIDATE_OFFER / ANSWER from the session's control reader (never blocks)."""
        if isinstance(message, CandidateOffer):
            offered = [_from_message(c) for c in message.candidates]
            try:
                self._offers.put_nowait((message.stream_id, offered))
            except asyncio.QueueFull:
                log.debug("p2p: offer dropped (queue full)", extra=kv(id=message.stream_id))
        elif isinstance(message, CandidateAnswer):
            waiter = self._answers.get(message.stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_result([_from_message(c) for c in message.candidates])

    async def _answer_loop(self) -> None:
        while True:
            sid, offered = await self._offers.get()
            remote, markers = split_capabilities(offered)
            self._peer_caps.pop(sid, None)
            self._peer_caps[sid] = markers.capabilities
            while len(self._peer_caps) > PEER_CAPS_MAX:
                del self._peer_caps[next(iter(self._peer_caps))]
            # (Under FORBIDDEN no offer reaches us: our relay answers it itself.)
            if self.session.is_active(sid):  # never punch for a stream we do not serve
                self._punch(sid, remote)
            answer = CandidateAnswer(
                stream_id=sid, candidates=[_to_message(c) for c in self._offered()]
            )
            try:
                await self.session.send_control(FrameType.CANDIDATE_ANSWER, answer)
            except Exception as exc:  # NotConnected, TransportError
                log.debug("p2p: answer not sent", extra=kv(id=sid, err=str(exc)))

    def _punch(self, sid: int, remote: list[Candidate]) -> None:
        """One 0x00 byte from the shared socket to each offered address (spec 03 §7.6)."""
        if self.endpoint is None or not self.session.on_shared_socket:
            return
        targets = punch_targets(remote)
        for host, port in targets:
            try:
                self.endpoint.send_raw(PUNCH, host, port)
            except OSError as exc:
                log.debug("p2p: punch failed", extra=kv(id=sid, to=f"{host}:{port}", err=str(exc)))
        if targets:
            log.debug("p2p: punched", extra=kv(id=sid, to=",".join(f"{h}:{p}" for h, p in targets)))

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
                    # A connection that carries no stream (a check that lost
                    # the race, a scanner) is not kept alive by keep-alives.
                    async with asyncio.timeout(2 * SWAP_TIMEOUT):
                        first = await conn.accept_stream()
                    tg.create_task(_guard(self._direct_stream(conn, first), "direct stream"))
                    while True:
                        stream = await conn.accept_stream()
                        tg.create_task(_guard(self._direct_stream(conn, stream), "direct stream"))
                except TimeoutError:
                    log.debug("p2p: idle direct connection closed", extra=kv(remote=_path(conn)))
                    conn.close(0, "")
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
            if frame.type == FrameType.STREAM_CHECKPOINT:
                await apply_checkpoints(reader, self._peer_stream(conn), frame)
                return
            resume = expect_message(frame, FrameType.STREAM_RESUME, StreamResume)
        except (TimeoutError, TransportError, OrpError) as exc:
            log.warning("p2p: bad direct stream", extra=kv(err=str(exc) or repr(exc)))
            stream.abort()
            return
        sid = resume.stream_id
        target = self._peer_stream(conn)(sid)
        if target is None:
            log.warning(
                "p2p: direct stream refused: not the stream's peer",
                extra=kv(
                    id=sid,
                    dialler=getattr(conn, "identity", ""),
                    known=self.session.resumable(sid) is not None,
                ),
            )
            stream.abort()
            return
        symmetric = not self.config.reference_wire and CAP_P2P_RESUME_V2 in self._peer_caps.get(
            sid, frozenset()
        )
        if not symmetric:
            # A reference initiator swapped already and will not retransmit:
            # give our reader a moment to take what is still in flight on the
            # relay stream before we stop reading it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFERENCE_DRAIN):
                    await target.wait_received(resume.my_position)
        old = target.detach()
        if old is None:
            log.info("p2p: stream not migratable now", extra=kv(id=sid))
            stream.abort()
            return
        try:
            gap = retransmit_range(resume.peer_ack_position, target.ring)
            target.apply_checkpoint(resume.my_position, resume.peer_ack_position)
            if symmetric:  # spec 03 §7.7: the reference responder writes no STREAM_RESUME back
                async with asyncio.timeout(SWAP_TIMEOUT):
                    await stream.send_all(resume_frame(target))
        except (TimeoutError, TransportError, ResumeError) as exc:
            log.warning("p2p: migration failed; back to the relay", extra=kv(id=sid, err=str(exc)))
            stream.abort()
            target.fail_migration(old, str(exc) or repr(exc))
            return
        lost = resume.my_position - target.positions.received
        if not symmetric and lost > 0:
            log.warning(
                "p2p: reference initiator: bytes in flight on the relay are lost",
                extra=kv(id=sid, bytes=lost),
            )
        target.install(stream, reader.take_leftover())
        target.path = "direct"
        self.session.stats.promotions += 1
        log.info(
            "p2p: migrated to direct",
            extra=kv(
                id=sid,
                role="responder",
                path=_path(conn),
                rtt_ms=ms(conn.rtt),
                retransmitted=len(gap),
                swap="symmetric" if symmetric else "reference",
            ),
        )
        await target.retransmit(stream, gap)
        await close_quietly(old)
        if symmetric:
            await send_checkpoints(conn, target)

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
        mode = self._mode(sid)
        if mode == P2PMode.FORBIDDEN:
            log.info("p2p: not promoting", extra=kv(id=sid, reason="p2p_mode forbidden"))
            return
        # REQUIRED: the relay closes the stream 10 s after the open without a
        # MIGRATE_TO_P2P (spec 02 §7.5), so do not wait the usual second.
        await asyncio.sleep(0.05 if mode == P2PMode.REQUIRED else PROMOTION_DELAY)
        if not self._candidates:
            # [REC] §7.5: nothing to offer, nothing to gain from an offer.
            log.info("p2p: not promoting", extra=kv(id=sid, reason="no local candidates"))
            return
        conn: Connection | None = None
        try:
            started = time.monotonic()
            try:
                async with asyncio.timeout(PROMOTION_BUDGET):
                    answer = await self._exchange(sid)
                    remote, markers = split_capabilities(answer)
                    if not remote:
                        raise ConnectionError("the peer answered no candidates")
                    symmetric = (
                        not self.config.reference_wire and CAP_P2P_RESUME_V2 in markers.capabilities
                    )
                    if not symmetric and stream.positions.peer_acked == 0 and stream.positions.sent:
                        # The reference agent sends no checkpoints: we could
                        # never know that our bytes arrived before the swap.
                        raise ConnectionError(
                            "the peer acknowledges nothing (reference agent): a reference "
                            "swap would lose bytes"
                        )
                    if self.endpoint is None:
                        raise ConnectionError("no shared UDP socket")
                    conn, winner, rtt = await check_candidates(
                        self.endpoint, remote, markers.identity
                    )
                    await self.session.send_control(
                        FrameType.MIGRATE_TO_P2P,
                        MigrateToP2P(stream_id=sid, selected=_to_message(winner)),
                    )
            except Exception as exc:
                level = logging.WARNING if mode == P2PMode.REQUIRED else logging.INFO
                log.log(
                    level,
                    "p2p: stayed on relay",
                    extra=kv(
                        id=sid, reason=str(exc) or repr(exc), required=mode == P2PMode.REQUIRED
                    ),
                )
                if conn is not None:
                    conn.close(0, "")
                return
            linger: Stream | None = None
            if symmetric:
                swapped = await swap_symmetric(stream, conn)
            else:
                linger = await swap_reference(stream, conn)
                swapped = linger is not None
            if not swapped:
                conn.close(0, "")
                return
            self.session.stats.promotions += 1
            log.info(
                "p2p: migrated to direct",
                extra=kv(
                    id=sid,
                    role="initiator",
                    path=f"{winner.ip}:{winner.port}",
                    kind=winner.kind,
                    rtt_ms=f"{rtt * 1000:.1f}",
                    took_ms=int((time.monotonic() - started) * 1000),
                    swap="symmetric" if symmetric else "reference",
                ),
            )
            try:
                if linger is not None:
                    # A reference peer swaps when our STREAM_RESUME arrives on the
                    # direct path; a FIN on the relay stream could overtake it and
                    # read as the end of our data. FIN the relay stream later.
                    await asyncio.sleep(SWAP_TIMEOUT)
                    await close_quietly(linger)
                    linger = None
                if symmetric:
                    # The relay forgets the pair once its splice ends, so its
                    # ctrl no longer carries our checkpoints: they go direct.
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(send_checkpoints(conn, stream))
                        tg.create_task(accept_checkpoints(conn, stream))
                else:
                    await conn.wait_closed()  # the direct path lives as long as the stream
            finally:
                if linger is not None:
                    linger.abort()
        finally:
            if conn is not None:
                conn.close(0, "")

    def _peer_stream(self, conn: Connection) -> Callable[[int], ResumableStream | None]:
        """Stream id -> our stream, if the agent on ``conn`` is that stream's peer."""
        dialler = getattr(conn, "identity", "") or ""

        def lookup(sid: int) -> ResumableStream | None:
            peer = self.session.peer_of(sid)
            return self.session.resumable(sid) if peer and peer == dialler else None

        return lookup

    async def _exchange(self, sid: int) -> list[Candidate]:
        waiter: asyncio.Future[list[Candidate]] = asyncio.get_running_loop().create_future()
        self._answers[sid] = waiter
        try:
            await self.session.send_control(
                FrameType.CANDIDATE_OFFER,
                CandidateOffer(stream_id=sid, candidates=[_to_message(c) for c in self._offered()]),
            )
            return await waiter
        finally:
            self._answers.pop(sid, None)


def _show(candidates: list[Candidate]) -> str:
    return ",".join(f"{c.kind}:{c.ip}:{c.port}/{c.priority}" for c in candidates)


async def _guard(coro: Coroutine[Any, Any, None], what: str) -> None:
    """Run a child task; a bug in one connection must not stop the listener."""
    try:
        await coro
    except Exception:
        log.exception("p2p: task failed", extra=kv(task=what))


def _path(conn: Connection) -> str:
    host, port = conn.peer.address
    return f"{host}:{port}"
