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

from outrelay.orp import (
    StreamEndCode,
    encode_reject,
    is_final,
)
from outrelay.relay.pairs import EndedPairs, Member
from outrelay.relay.state import AgentSession, RelayState, now_ms
from outrelay.splice import FirstBytes, SpliceResult, splice
from outrelay.transport import BrokenResourceError, Stream, TransportError

__all__ = [
    "REJECT_DRAIN_TIMEOUT",
    "end_code",
    "peer_end_code",
    "reject",
    "splice_pair",
    "splice_with_peer",
]

REJECT_DRAIN_TIMEOUT = 5.0
"""After a STREAM_REJECT we read (and drop) what the consumer still sends, so
it never gets STOP_SENDING (the reference leaves C's direction untouched)."""


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
