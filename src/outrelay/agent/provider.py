"""Provider role: INCOMING_STREAM -> dial the backend -> STREAM_ACCEPT -> bridge.

Spec 03 §3.6. Unknown service: ``STREAM_REJECT{404, "no handler"}``; backend
unreachable: ``STREAM_REJECT{502, <dial error>}`` (the reference relay shows
the consumer 503 either way). After accepting we wait for STREAM_READY (up to
5 s) -- or, our addition, for the consumer's first bytes, which prove the
relay spliced (inter-relay streams never get STREAM_READY). When our relay marks
INCOMING_STREAM ``outrelay_spliced`` (``orp.CAP_PIPELINE``) there is nothing to wait
for: the bridge starts right after STREAM_ACCEPT, with the consumer's pipelined
bytes that followed INCOMING_STREAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

from outrelay.agent.bridge import AccessLog, bridge
from outrelay.agent.forward import run_forward_provider
from outrelay.agent.session import RelaySession, StreamMode
from outrelay.agent.udp import DatagramRouter, DatagramStream, UdpDrops, open_udp_backend
from outrelay.observe import hop, hop_marks, kv
from outrelay.orp import (
    FrameType,
    IncomingStream,
    OrpError,
    RejectCode,
    encode_message,
    encode_reject,
)
from outrelay.transport import Stream, TransportError, open_tcp
from outrelay.wire import FrameReader, expect_message, frame_name

__all__ = ["PROVIDER_MODE_WAIT", "LocalBackend", "handle_incoming_stream"]

log = logging.getLogger("outrelay.agent.provider")

PROVIDER_MODE_WAIT = 5.0  # spec 03 §3.6 / §10
FIRST_FRAME_TIMEOUT = 10.0
"""Ours: a relay-opened stream must carry INCOMING_STREAM promptly."""
BACKEND_DIAL_TIMEOUT = 10.0

LocalBackend: TypeAlias = Callable[[], Awaitable[Stream]]
"""An in-process backend (the Python API's ``serve``): returns a fresh stream per call."""


def split_host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not host:port: {target!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _reject(stream: Stream, code: int, reason: str) -> None:
    with contextlib.suppress(TransportError):
        await stream.send_all(encode_reject(code, reason))
    await stream.aclose()


async def _wait_mode_or_data(
    stream: Stream, mode: asyncio.Future[str] | None, wait: float
) -> tuple[str, bytes]:
    """STREAM_READY / ALLOC_GRANTED, or the consumer's first bytes, or the timeout."""
    read = asyncio.get_running_loop().create_task(stream.receive_some(64 * 1024))
    waitables: set[asyncio.Future[Any]] = {read}
    if mode is not None:
        waitables.add(mode)
    await asyncio.wait(waitables, timeout=wait, return_when="FIRST_COMPLETED")
    data = b""
    if not read.done():
        read.cancel()
    with contextlib.suppress(asyncio.CancelledError, TransportError):
        data = await read  # bytes that raced the cancellation are kept
    if data:
        return StreamMode.SPLICE, data
    if mode is not None and mode.done() and not mode.cancelled():
        return mode.result(), b""
    return StreamMode.SPLICE, b""


async def handle_incoming_stream(
    session: RelaySession,
    stream: Stream,
    services: dict[str, str],
    *,
    mode_wait: float = PROVIDER_MODE_WAIT,
    udp_services: frozenset[str] = frozenset(),
    udp_drops: UdpDrops | None = None,
    udp_router: DatagramRouter | None = None,
    local_backends: Mapping[str, LocalBackend] | None = None,
) -> None:
    """Serve one relay-opened stream.

    A service in ``local_backends`` (the Python API's ``serve``) has no network backend:
    its connector returns a stream into this process (one end of a socket pair whose other
    end the handler holds); everything else is as for a TCP backend.

    A service in ``udp_services`` (``--expose-udp``) is a UDP backend: the stream
    carries length-prefixed datagrams (:mod:`outrelay.agent.udp`), the backend is a
    connected UDP socket, everything else (accept, mode, resume, bridge) is unchanged.
    """
    reader = FrameReader(stream)
    try:
        async with asyncio.timeout(FIRST_FRAME_TIMEOUT):
            frame = await reader.read_frame()
        if frame is None:
            await stream.aclose()
            return
        if frame.type != FrameType.INCOMING_STREAM:
            log.warning("agent: expected INCOMING_STREAM", extra=kv(got=frame_name(frame.type)))
            await stream.aclose()
            return
        incoming = expect_message(frame, FrameType.INCOMING_STREAM, IncomingStream)
    except (TimeoutError, TransportError, OrpError) as exc:
        log.debug("incoming stream dropped before INCOMING_STREAM", extra=kv(err=repr(exc)))
        stream.abort()
        return
    sid = incoming.stream_id
    hop("p_incoming", sid)
    service = incoming.target_service
    fields = {"svc": service, "stream_id": sid, "consumer": incoming.source_agent_uri}
    access = AccessLog(
        "provider", service, incoming.source_agent_uri, "backend", sid, stats=session.stats
    )
    target = services.get(service)
    if target is None:
        log.warning("stream for unknown service; rejecting 404", extra=kv(**fields))
        access.rejected(RejectCode.NOT_FOUND, "no handler")
        await _reject(stream, int(RejectCode.NOT_FOUND), "no handler")
        return
    try:
        backend: Stream
        connect_local = local_backends.get(service) if local_backends else None
        if connect_local is not None:
            backend = await connect_local()
        elif service in udp_services:
            host, port = split_host_port(target)
            backend = await open_udp_backend(host, port, udp_drops or UdpDrops(), udp_router)
        else:
            host, port = split_host_port(target)
            backend = await open_tcp(host, port, connect_timeout=BACKEND_DIAL_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as exc:
        proto = "udp" if service in udp_services else "tcp"
        reason = f"dial {proto} {target}: {exc or 'timeout'}"
        log.warning(
            "backend unreachable; rejecting 502", extra=kv(**fields, target=target, err=reason)
        )
        access.rejected(RejectCode.BAD_GATEWAY, reason)
        await _reject(stream, int(RejectCode.BAD_GATEWAY), reason)
        return

    hop("p_backend", sid)
    # Our relay says it splices this stream (orp.CAP_PIPELINE): bridge right after
    # STREAM_ACCEPT; the consumer's pipelined bytes may already follow INCOMING_STREAM.
    spliced = incoming.outrelay_spliced
    mode = session.expect_mode(sid) if sid != 0 and not spliced else None
    try:
        try:
            await stream.send_all(encode_message(FrameType.STREAM_ACCEPT))
        except TransportError as exc:
            log.info("relay stream lost before accept", extra=kv(**fields, err=str(exc)))
            access.failed(f"relay stream lost before accept: {exc}")
            backend.abort()
            stream.abort()
            return
        session.track(sid)
        hop("p_accept_sent", sid)
        if spliced:
            mode_result, early = StreamMode.SPLICE, b""
        else:
            mode_result, early = await _wait_mode_or_data(stream, mode, mode_wait)
        hop("p_mode", sid, mode=mode_result, early=len(early))
    finally:
        if mode is not None:
            session.forget_mode(sid, mode)
    try:
        if mode_result == StreamMode.FORWARD:
            grant = session.take_grant(sid)
            if grant is None:  # pragma: no cover - FORWARD is only delivered with a grant
                backend.abort()
                await stream.aclose()
                return
            await run_forward_provider(
                grant,
                stream,
                backend,
                tls=session.config.tls,
                relay_host=session.relay_host,
                fields=fields,
            )
            return
        prefix = reader.take_leftover() + early
        log.debug("bridging", extra=kv(**fields, target=target))
        relay_stream = session.wrap(sid, stream, prefix, peer_uri=incoming.source_agent_uri)
        if isinstance(backend, DatagramStream):
            backend.attach(sid)  # a UDP flow: QUIC DATAGRAM frames beside the stream
        live = access.live()
        try:
            result = await bridge(
                backend,
                relay_stream,
                on_first_bytes=hop_marks(sid, "p_from_backend_first", "p_to_backend_first"),
                result=live,
            )
        finally:
            session.unwrap(relay_stream)
            access.ended(live, relay_stream)
        log.debug(
            "bridge teardown",
            extra=kv(**fields, to_backend=result.b_to_a.bytes, from_backend=result.a_to_b.bytes),
        )
        access.bridged(result, relay_stream)
    finally:
        if sid:
            session.untrack(sid)
