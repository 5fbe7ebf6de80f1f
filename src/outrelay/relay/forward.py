"""Forward sessions: allocations instead of a splice (spec 02 §6.4, §8).

When the caller-side rule says ``relay_mode=forward`` and the relay has a forward plane
(``--listen-forward``), the open flow hands both agents a pair of allocations in ALLOC_GRANTED
on their control streams; their data then travels as UDP datagrams through the plane
(:mod:`.plane`). The two data streams stay open for liveness only: when either ends, both
allocations are released.
"""

from __future__ import annotations

import asyncio

from outrelay.observe import kv
from outrelay.orp import AllocGranted, FrameType, RejectCode
from outrelay.relay.plane import ForwardPlane
from outrelay.relay.splicing import reject
from outrelay.relay.state import AgentSession, RelayState, log
from outrelay.transport import Stream
from outrelay.wire import discard

__all__ = ["forward_session"]


async def forward_session(
    state: RelayState,
    consumer: AgentSession,
    c_stream: Stream,
    provider: AgentSession,
    p_stream: Stream,
    sid: int,
    plane: ForwardPlane,
) -> None:
    """Spec 02 §6.4: allocations instead of a splice; the data streams are liveness only.

    Called once the provider accepted; closes both streams before it returns.
    """
    current_provider = state.agents.get(provider.uri)
    if current_provider is None:
        await p_stream.aclose()
        await reject(
            c_stream, RejectCode.BAD_GATEWAY, "forward: provider control channel unavailable"
        )
        return
    a_c, a_p = plane.allocate_pair()
    endpoint = plane.endpoint
    try:
        for agent, mine, theirs in ((consumer, a_c, a_p), (current_provider, a_p, a_c)):
            grant = AllocGranted(
                stream_id=sid,
                my_allocation=mine,
                peer_allocation=theirs,
                forward_endpoint=endpoint,
            )
            if agent.ctrl.post(FrameType.ALLOC_GRANTED, grant) is None:
                log.info(
                    "alloc granted write failed",
                    extra=kv(stream_id=sid, err=agent.ctrl.dead or "queue full"),
                )
                return
        log.info(
            "forward session",
            extra=kv(stream_id=sid, consumer_alloc=a_c, provider_alloc=a_p, endpoint=endpoint),
        )
        # Under REQUIRED only C's FIN happens here (spec 02 §7.5; armed by the open flow).
        async with asyncio.TaskGroup() as tg:
            drains = [tg.create_task(discard(c_stream)), tg.create_task(discard(p_stream))]
            await asyncio.wait(drains, return_when=asyncio.FIRST_COMPLETED)
            for task in drains:
                task.cancel()
    finally:
        plane.release(a_c, a_p)
        log.info("allocation reclaimed", extra=kv(stream_id=sid, allocations=f"{a_c},{a_p}"))
        await asyncio.gather(p_stream.aclose(), c_stream.aclose())
