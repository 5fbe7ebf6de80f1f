"""Consumer role: an intercepted local connection becomes an OPEN_STREAM.

Spec 03 §3.5 with its [REC] (a)–(c): the relay's answer is read properly.

* STREAM_READY on the control stream: bridge at once (splice mode).
* Data on the data stream before any mode signal: if it is a complete
  STREAM_REJECT frame followed by EOF, the open was refused -- log the code
  and reason, reset the application's connection; never hand the frame to
  the application as data. Anything else is an inter-relay splice (which
  gets no STREAM_READY): bridge now, delivering the bytes already read.
* Neither within 10 s: bridge as splice, like the reference.
* Pipelining (``orp.CAP_PIPELINE``, only when our relay echoed it): while the answer
  is awaited, the application's bytes already go onto the relay stream, right behind
  OPEN_STREAM (at most :data:`PIPELINE_MAX`), and are kept: in splice mode they enter
  the resume ring as sent; in forward mode (where the relay discards them) they are
  sent first on the end-to-end connection; on a reject they are dropped.
* ALLOC_GRANTED (forward mode): end-to-end QUIC over the relay's forward
  plane (:mod:`outrelay.agent.forward`); the relay stream is kept open as
  the liveness link and is never resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from outrelay.agent.bridge import AccessLog, bridge
from outrelay.agent.forward import run_forward_consumer
from outrelay.agent.resumable import ResumableStream
from outrelay.agent.session import NotConnected, RelaySession, StreamMode
from outrelay.agent.udp import DatagramStream
from outrelay.observe import hop, hop_marks, kv
from outrelay.orp import StreamRejected, classify_open_answer
from outrelay.splice import copy_until
from outrelay.transport import Stream, TransportError

__all__ = ["CONSUMER_MODE_WAIT", "handle_consumer_connection"]

log = logging.getLogger("outrelay.agent.consumer")

CONSUMER_MODE_WAIT = 10.0  # spec 03 §3.5 / §10
READ_CHUNK = 64 * 1024
PIPELINE_MAX = 64 * 1024
"""At most this many application bytes are pipelined before the relay's answer: they are
held until then (replayed in forward mode), and one splice buffer's worth covers every
request-first protocol's first flight."""


async def _await_answer(
    stream: Stream, mode: asyncio.Future[str], wait: float
) -> tuple[str | StreamRejected, bytes]:
    """Wait for the relay's verdict on an open.

    Returns:
        (``StreamMode.SPLICE``/``FORWARD`` or a :class:`~outrelay.orp.StreamRejected`,
        bytes already read from the stream that belong to the application).
    """
    buffered = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    eof = False
    while True:
        if mode.done():
            verdict = StreamMode.SPLICE if mode.cancelled() else mode.result()
            return verdict, bytes(buffered)
        remaining = deadline - loop.time()
        if remaining <= 0 or eof:
            if eof and not buffered:
                # EOF with nothing at all: the relay closed the stream (e.g. the
                # provider's stream ended before it answered).
                return StreamRejected(0, "stream closed by relay before any answer"), b""
            return StreamMode.SPLICE, bytes(buffered)
        read = loop.create_task(stream.receive_some(READ_CHUNK))
        waitables: set[asyncio.Future[Any]] = {read, mode}
        try:
            done, _ = await asyncio.wait(
                waitables, timeout=remaining, return_when="FIRST_COMPLETED"
            )
        except BaseException:
            read.cancel()
            raise
        if read not in done:
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                data = await read
                buffered += data  # pragma: no cover - cancellation raced a completed read
            continue
        data = read.result()
        if not data:
            eof = True
        buffered += data
        answer = classify_open_answer(bytes(buffered), eof)
        if answer is None:
            continue  # maybe a STREAM_REJECT still arriving
        if isinstance(answer, StreamRejected):
            return answer, b""
        return StreamMode.SPLICE, bytes(buffered)


async def handle_consumer_connection(
    session: RelaySession,
    local: Stream,
    service: str,
    *,
    mode_wait: float = CONSUMER_MODE_WAIT,
    on_answer: Callable[[str | StreamRejected | Exception], None] | None = None,
) -> None:
    """Carry one accepted application connection to ``service``.

    ``on_answer`` (the Python API, :mod:`outrelay.api`) is told the open's outcome once:
    the stream mode (``StreamMode.SPLICE``/``FORWARD``), the relay's
    :class:`~outrelay.orp.StreamRejected`, or the exception that failed the open.
    """

    def answer(outcome: str | StreamRejected | Exception) -> None:
        if on_answer is not None:
            on_answer(outcome)

    accepted_at = time.monotonic()
    peername = getattr(local, "peername", None)  # a SocketStream's or a UDP flow's
    peer = f"{peername[0]}:{peername[1]}" if peername else "?"
    access = AccessLog("consumer", service, session.link_address or "", "app", stats=session.stats)
    try:
        stream, sid, mode, may_pipeline = await session.open_stream(service)
    except (NotConnected, TransportError) as exc:
        log.warning("session dial", extra=kv(svc=service, err=str(exc)))
        access.failed(str(exc))
        answer(exc)
        local.abort()
        return
    access.stream_id = sid
    access.peer = session.link_address or ""
    session.track(sid)
    hop("c_accept", sid, at=accepted_at)
    hop("c_open_sent", sid)
    log.debug("session: stream opened", extra=kv(svc=service, stream_id=sid, app=peer))
    pipelined = bytearray()  # every application byte written behind OPEN_STREAM
    try:
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pump = (
            asyncio.get_running_loop().create_task(
                copy_until(local, stream, answered, limit=PIPELINE_MAX, keep=pipelined)
            )
            if may_pipeline
            else None
        )
        try:
            verdict, prefix = await _await_answer(stream, mode, mode_wait)
        except TransportError as exc:
            log.warning(
                "stream lost before the relay answered", extra=kv(svc=service, err=str(exc))
            )
            access.failed(f"lost before the relay answered: {exc}")
            answer(exc)
            stream.abort()
            local.abort()
            return
        finally:
            session.forget_mode(sid, mode)
            answered.set_result(None)
            if pump is not None:
                await pump
                access.pipelined = len(pipelined)
        hop("c_answer", sid, verdict=str(verdict), early=len(prefix), pipelined=len(pipelined))
        answer(verdict)
        if isinstance(verdict, StreamRejected):
            log.warning(
                "stream rejected",
                extra=kv(svc=service, stream_id=sid, code=verdict.code, reason=verdict.reason),
            )
            access.rejected(verdict.code, verdict.reason)
            local.abort()
            await stream.aclose()
            return
        if verdict == StreamMode.FORWARD:
            grant = session.take_grant(sid)
            if grant is None:  # pragma: no cover - FORWARD is only delivered with a grant
                local.abort()
                await stream.aclose()
                return
            # The relay discarded what we pipelined (spec 02 §6.4): it goes
            # first on the end-to-end connection.
            await run_forward_consumer(
                grant,
                stream,
                local,
                tls=session.config.tls,
                relay_host=session.relay_host,
                service=service,
                replay=bytes(pipelined),
            )
            return
        relay_stream = session.wrap(sid, stream, prefix, sent=bytes(pipelined))
        if isinstance(local, DatagramStream):
            local.attach(sid)  # a UDP flow: QUIC DATAGRAM frames beside the stream
        marks = hop_marks(sid, "c_up_first", "c_down_first")
        live = access.live()
        try:
            p2p = session.p2p
            if p2p is not None and isinstance(relay_stream, ResumableStream):
                # P2P (--p2p-listen): promotion runs beside the bridge and
                # ends with it (spec 03 §7.5).
                async with asyncio.TaskGroup() as tg:
                    promotion = tg.create_task(p2p.promote(relay_stream))
                    try:
                        result = await bridge(
                            local, relay_stream, on_first_bytes=marks, result=live
                        )
                    finally:
                        promotion.cancel()
            else:
                result = await bridge(local, relay_stream, on_first_bytes=marks, result=live)
        finally:
            session.unwrap(relay_stream)
            access.ended(live, relay_stream)
        log.debug(
            "bridge teardown",
            extra=kv(
                svc=service,
                stream_id=sid,
                sent=result.a_to_b.bytes,
                received=result.b_to_a.bytes,
            ),
        )
        access.bridged(result, relay_stream)
    finally:
        session.untrack(sid)
