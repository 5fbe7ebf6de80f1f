"""The peer control stream: checkpoints and candidates of pairs split across relays (ours).

Spec 02 §10 has no control channel between relays, so STREAM_CHECKPOINT and CANDIDATE_*
cannot reach an agent on another relay. Each connection between two of our relays carries
one bidirectional stream whose first frame is PEER_CONTROL (no payload), opened by the
dialling relay as part of the dial (:mod:`.peers`) and served on both ends
(:meth:`~.peer_server.PeerServer.serve_connection`). Control dispatch (:mod:`.control`)
posts a frame of a pair whose other member is remote to that relay's channel
(:class:`~.remote.PeerControls`, bounded outbox, never waits); the receiving relay delivers
it to its local member's control stream (:func:`deliver_from_peer`). The frames travel as
the agent sent them, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from outrelay.observe import kv
from outrelay.orp import Frame, FrameType, OrpError, decode_message, encode_frame
from outrelay.relay.outbox import ControlOutbox
from outrelay.relay.state import RelayState, log, now_ms
from outrelay.transport import Connection, Stream, TransportError
from outrelay.wire import FrameReader

__all__ = ["ROUTED", "deliver_from_peer", "serve_peer_control"]

ROUTED: Final = (
    FrameType.STREAM_CHECKPOINT,
    FrameType.CANDIDATE_OFFER,
    FrameType.CANDIDATE_ANSWER,
)
"""The frame types a peer control stream carries."""


async def serve_peer_control(
    state: RelayState, relay_id: str, conn: Connection, stream: Stream, reader: FrameReader
) -> None:
    """Carry STREAM_CHECKPOINT / CANDIDATE_* of split pairs both ways until it ends."""

    def overflow(reason: str) -> None:
        log.warning(
            "peer relay not reading its control stream", extra=kv(relay=relay_id, err=reason)
        )
        conn.close(0, "peer control stream not read")

    outbox = ControlOutbox(stream, on_overflow=overflow)
    state.peer_controls.add(relay_id, outbox)
    writer = asyncio.get_running_loop().create_task(outbox.run())
    try:
        while True:
            try:
                frame = await reader.read_frame()
            except (TransportError, OrpError) as exc:
                log.debug("peer control stream ended", extra=kv(relay=relay_id, err=str(exc)))
                return
            if frame is None:
                return
            if frame.type in ROUTED:
                with contextlib.suppress(OrpError):
                    deliver_from_peer(state, relay_id, frame)
    finally:
        state.peer_controls.remove(relay_id, outbox)
        outbox.close()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


def deliver_from_peer(state: RelayState, relay_id: str, frame: Frame) -> None:
    """A frame of the remote member of a split pair: to the pair's local agent.

    Only from the relay the remote member is on (:class:`~.remote.RemoteSides`); a
    checkpoint also for a pair forgotten less than ``CLOSED_PAIR_TTL_MS`` ago.

    Raises:
        OrpError: The payload does not decode.
    """
    sid = int(getattr(decode_message(frame), "stream_id", 0))
    now = now_ms()
    member = state.remote.get(sid, now)
    if member is None or member.relay_id != relay_id:
        return
    checkpoint = frame.type == FrameType.STREAM_CHECKPOINT
    target_uri = state.pairs.route(sid, member.uri)
    if target_uri is None and checkpoint:
        target_uri = state.pairs.route_closed(sid, member.uri, now)
    target = state.agents.get(target_uri) if target_uri else None
    if target is None:
        return
    data = encode_frame(frame.type, frame.payload, version=frame.version, flags=frame.flags)
    target.ctrl.post_raw(data, droppable=checkpoint)
