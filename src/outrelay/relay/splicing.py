"""The splice glue: join two agents' data streams, or refuse one (spec 02 §6.5, §13).

:func:`splice_pair` runs :func:`outrelay.splice.splice` with our close semantics: a source
that breaks (not a clean EOF) resets the other side with the code from :func:`end_code`, so
its agent resumes, or ends the stream when the application or the agent at the broken end is
gone; a splice that broke is remembered with both ends (:class:`~.pairs.EndedPairs`).
:func:`reject` answers a data stream with STREAM_REJECT. :func:`splice_with_peer` splices an
agent's stream with a peer relay's stream (issue 18): a final code passes through the hop,
a broken peer stream resets the agent's with ``LINK``.
"""

from __future__ import annotations

import asyncio
import contextlib

from outrelay.observe import kv
from outrelay.orp import (
    Frame,
    FrameType,
    OrpError,
    StreamEndCode,
    StreamReject,
    encode_reject,
    is_final,
)
from outrelay.relay.pairs import EndedPairs, Member
from outrelay.relay.state import AgentSession, RelayState, log, now_ms
from outrelay.splice import FirstBytes, SpliceResult, copy_until, splice
from outrelay.transport import BrokenResourceError, Stream, TransportError
from outrelay.wire import FrameReader, expect_message

__all__ = [
    "REJECT_DRAIN_TIMEOUT",
    "end_code",
    "peer_end_code",
    "read_answer",
    "reject",
    "rejection",
    "splice_pair",
    "splice_with_peer",
]

REJECT_DRAIN_TIMEOUT = 5.0
"""After a STREAM_REJECT we read (and drop) what the consumer still sends, so
it never gets STOP_SENDING (the reference leaves C's direction untouched)."""


async def read_answer(
    reader: FrameReader,
    within: float,
    sid: int,
    who: str,
    carry: tuple[Stream, Stream] | None = None,
) -> tuple[Frame | None, int]:
    """Read the answer to an INCOMING_STREAM or FORWARD_STREAM (spec 02 §6.1 step 7, §10).

    While it waits, ``carry = (src, dst)`` copies the consumer's pipelined bytes on
    (``orp.CAP_PIPELINE``); the copy stops once the answer is in.

    Args:
        reader: Reads the answering stream.
        within: How long the answer may take (seconds).
        sid: The stream id, for the log.
        who: Who answers, for the log line ``"<who> did not answer"``.
        carry: The streams to copy between meanwhile, or None.

    Returns:
        The STREAM_ACCEPT or STREAM_REJECT frame, or None when no answer came (timeout, a
        broken stream, a malformed or any other frame); and the bytes carried meanwhile.
    """
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[None] = loop.create_future()
    pump = loop.create_task(copy_until(*carry, answered)) if carry is not None else None
    carried = 0
    try:
        async with asyncio.timeout(within):
            answer: Frame | None = await reader.read_frame()
    except (TimeoutError, TransportError, OrpError) as exc:
        log.info(f"{who} did not answer", extra=kv(stream_id=sid, err=repr(exc)))
        answer = None
    finally:
        answered.set_result(None)
        if pump is not None:
            carried = await pump
    if answer is not None and answer.type not in (FrameType.STREAM_ACCEPT, FrameType.STREAM_REJECT):
        answer = None
    return answer, carried


def rejection(answer: Frame, code: int, reason: str) -> tuple[int, str]:
    """A STREAM_REJECT's code and reason, ``code``/``reason`` where it gives none or cannot
    be decoded ([REC] spec 02 §13: the rejecting side's code and reason are passed on)."""
    with contextlib.suppress(OrpError):
        rejected = expect_message(answer, FrameType.STREAM_REJECT, StreamReject)
        code, reason = rejected.code or code, rejected.reason or reason
    return code, reason


async def reject(stream: Stream, code: int, reason: str) -> None:
    """STREAM_REJECT then FIN (spec 02 §13).

    What the consumer still sends is read and dropped for a few seconds
    instead of answered with STOP_SENDING: the reference leaves the
    consumer's direction untouched.
    """
    try:
        await stream.send_all(encode_reject(code, reason))
        await stream.send_eof()
        async with asyncio.timeout(REJECT_DRAIN_TIMEOUT):
            while await stream.receive_some():
                pass
    except (TransportError, TimeoutError):
        pass
    await stream.aclose()


def end_code(broken: AgentSession, error: TransportError) -> int:
    """The code for resetting the other half of a splice when ``broken``'s half broke.

    An application's close (a final code) passes through, so the other agent
    ends its stream too; a gone agent ends it with ``AGENT_GONE``; anything
    else is a link failure (code 0), and the other agent resumes.
    """
    if broken.gone:
        return StreamEndCode.AGENT_GONE
    code = error.code if isinstance(error, BrokenResourceError) else None
    return code if code is not None and is_final(code) else StreamEndCode.LINK


async def splice_pair(
    ended: EndedPairs,
    sid: int,
    a: AgentSession,
    a_stream: Stream,
    b: AgentSession,
    b_stream: Stream,
    a_prefix: bytes,
    b_prefix: bytes,
    *,
    on_first_bytes: FirstBytes | None = None,
) -> SpliceResult:
    """Splice two agents' streams (spec 02 §6.5 with our close semantics, module docstring).

    Args:
        ended: Where a splice that broke is noted, for the resume flow.
        sid: The stream id.
        a, b: The two agents; ``a_stream``/``b_stream`` their data streams.
        a_prefix, b_prefix: Bytes already read from ``a_stream``/``b_stream`` after their
            first frame, written to the other side first.
    """
    result = await splice(
        a_stream,
        b_stream,
        a_to_b_prefix=a_prefix,
        b_to_a_prefix=b_prefix,
        abort_a_on_b_error=lambda exc: end_code(b, exc),
        abort_b_on_a_error=lambda exc: end_code(a, exc),
        abort_source_on_write_error=True,
        on_first_bytes=on_first_bytes,
    )
    if not (result.a_to_b.clean and result.b_to_a.clean):
        ended.note(sid, a.member, b.member, now_ms())
    return result


def peer_end_code(error: TransportError) -> int:
    """The reset code for an agent's stream when its peer stream broke: a final code
    passes through (the far agent's application closed, or the agent left), anything
    else (the peer relay or the link between the relays failed) is ``LINK``: resume."""
    code = error.code if isinstance(error, BrokenResourceError) else None
    return code if code is not None and is_final(code) else StreamEndCode.LINK


async def splice_with_peer(
    state: RelayState,
    sid: int,
    local: AgentSession,
    l_stream: Stream,
    remote: Member,
    r_stream: Stream,
    l_prefix: bytes,
    r_prefix: bytes,
) -> SpliceResult:
    """Splice an agent's stream with a peer stream (close semantics: module docstring);
    a splice that broke is noted with both ends for the resume flow. While it runs,
    ``l_stream`` is the pair's entry in ``state.split_streams``."""
    split = state.split_streams
    if sid:
        split[sid] = l_stream
    try:
        result = await splice(
            l_stream,
            r_stream,
            a_to_b_prefix=l_prefix,
            b_to_a_prefix=r_prefix,
            abort_a_on_b_error=peer_end_code,
            abort_b_on_a_error=lambda exc: end_code(local, exc),
            abort_source_on_write_error=True,
        )
    finally:
        if split.get(sid) is l_stream:
            del split[sid]
    if not (result.a_to_b.clean and result.b_to_a.clean):
        state.ended.note(sid, local.member, remote, now_ms())
    return result
