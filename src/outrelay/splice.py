"""Copy bytes both ways between two streams, with half-close (spec 02 §6.5).

Used by the relay (consumer stream <-> provider stream) and by the agent
(local socket <-> relay stream, spec 03 §5). Each direction is a copy loop
with a fixed buffer; when its source ends (EOF, or an error), the
destination's send half is closed (FIN). The splice ends when both
directions have ended; both streams are then closed.

A direction may instead *abort* its destination when the source broke (not
a clean EOF): the agent uses that to reset the application's socket when the
relay stream is lost for good (spec 03 §5.2 [REC]).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from outrelay.orp import is_final
from outrelay.transport import SendClosedError, Stream, TransportError

__all__ = [
    "DirectionResult",
    "FirstBytes",
    "ResetCode",
    "SpliceResult",
    "copy_until",
    "splice",
]

SPLICE_BUFFER = 64 * 1024  # spec 02 §12: 64 KiB per direction


@dataclass
class DirectionResult:
    """What one copy direction did."""

    bytes: int = 0
    read_error: TransportError | None = None
    """Set when the source broke instead of ending with EOF."""
    write_error: TransportError | None = None
    """Set when the destination refused bytes."""

    @property
    def clean(self) -> bool:
        return self.read_error is None and self.write_error is None


@dataclass
class SpliceResult:
    a_to_b: DirectionResult
    b_to_a: DirectionResult


ResetCode = Callable[[TransportError], int]
"""Given how one stream broke, the error code to reset the other one with."""
FirstBytes = Callable[[str], None]
"""Called once per direction (``"a_to_b"`` / ``"b_to_a"``) when its first bytes were written
(timing marks, ``observe.hop``)."""


def _reset_code(option: bool | ResetCode, error: TransportError) -> int | None:
    """The code for resetting the other stream, or None to leave it (FIN)."""
    if option is False:
        return None
    if option is True:
        return 0
    return option(error)


async def _pump(
    src: Stream,
    dst: Stream,
    prefix: bytes,
    result: DirectionResult,
    abort_dst_on_src_error: bool | ResetCode,
    abort_src_on_dst_error: bool | ResetCode,
    buffer_size: int,
    abort_source_on_write_error: bool = False,
    first: Callable[[], None] | None = None,
) -> None:
    try:
        if prefix:
            await dst.send_all(prefix)
            result.bytes += len(prefix)
            if first is not None:
                first()
                first = None
        while True:
            try:
                data = await src.receive_some(buffer_size)
            except TransportError as exc:
                result.read_error = exc
                break
            if not data:
                break
            await dst.send_all(data)
            result.bytes += len(data)
            if first is not None:
                first()
                first = None
    except TransportError as exc:
        result.write_error = exc
        if abort_source_on_write_error and not isinstance(exc, SendClosedError):
            # The destination refused (not: we ended its sending half ourselves,
            # like the relay's REQUIRED timeout): tell the writer at once.
            src_code = _reset_code(abort_src_on_dst_error, exc) or 0
            src.abort(src_code)
            if is_final(src_code):
                dst.abort(src_code)  # an application's close ends both directions at once
    if result.read_error is not None:
        code = _reset_code(abort_dst_on_src_error, result.read_error)
        if code is not None:
            dst.abort(code)
            if is_final(code):
                src.abort(code)  # an application's close ends both directions at once
            return
    with contextlib.suppress(TransportError):
        await dst.send_eof()


async def copy_until(
    src: Stream,
    dst: Stream,
    stop: asyncio.Future[Any],
    *,
    limit: int | None = None,
    keep: bytearray | None = None,
    buffer_size: int = SPLICE_BUFFER,
) -> int:
    """Copy ``src`` to ``dst`` until ``stop`` is done (pipelining, ``orp.CAP_PIPELINE``).

    Also ends when ``src`` ends or breaks, ``dst`` refuses bytes, or ``limit`` bytes were
    copied; never raises a transport error and never closes either stream: whatever ended
    the copy shows again to the next reader or writer (a splice that takes over).
    A read that races ``stop`` is still written: its bytes were taken from ``src``.
    Cancel-safe reads only (our streams' ``receive_some``: a cancelled read takes nothing).

    Args:
        keep: every byte read from ``src`` is appended here too.

    Returns:
        How many bytes were read from ``src`` (all written, unless ``dst`` failed).
    """
    copied = 0
    loop = asyncio.get_running_loop()
    while not stop.done() and (limit is None or copied < limit):
        size = buffer_size if limit is None else min(buffer_size, limit - copied)
        read = loop.create_task(src.receive_some(size))
        waitables: set[asyncio.Future[Any]] = {read, stop}
        try:
            await asyncio.wait(waitables, return_when="FIRST_COMPLETED")
        finally:
            if not read.done():
                read.cancel()
        data = b""
        with contextlib.suppress(asyncio.CancelledError, TransportError):
            data = await read
        if not data:
            break
        copied += len(data)
        if keep is not None:
            keep += data
        try:
            await dst.send_all(data)
        except TransportError:
            break
    return copied


def _first(hook: FirstBytes | None, direction: str) -> Callable[[], None] | None:
    return None if hook is None else lambda: hook(direction)


async def splice(
    a: Stream,
    b: Stream,
    *,
    a_to_b_prefix: bytes = b"",
    b_to_a_prefix: bytes = b"",
    abort_a_on_b_error: bool | ResetCode = False,
    abort_b_on_a_error: bool | ResetCode = False,
    abort_source_on_write_error: bool = False,
    buffer_size: int = SPLICE_BUFFER,
    on_first_bytes: FirstBytes | None = None,
    result: SpliceResult | None = None,
) -> SpliceResult:
    """Run both copy directions until both have ended, then close both streams.

    Args:
        a_to_b_prefix: bytes already read from ``a`` (e.g. the surplus after a
            frame) that ``b`` must receive first.
        b_to_a_prefix: likewise for the other direction.
        abort_a_on_b_error: if reading ``b`` fails (not EOF), reset ``a``
            instead of sending it a FIN: with code 0 for ``True``, or with the
            code a callable derives from ``b``'s error (the relay passes an
            application's close on, see ``orp.StreamEndCode``). A final code
            (``orp.is_final``) ends the whole splice: ``b`` is reset too.
        abort_b_on_a_error: the mirror image.
        abort_source_on_write_error: if a destination refuses bytes (reset,
            STOP_SENDING, connection lost), reset that direction's source too,
            so its writer learns at once (the relay: its agent then resumes);
            the code is the one the other option derives from the
            destination's error.
        on_first_bytes: see :data:`FirstBytes`.
        result: where to count, if the caller wants to read the counts while the
            copy runs (the agent's live byte metrics); a fresh one otherwise.

    Returns:
        Byte counts and errors per direction. Never raises transport errors;
        cancellation propagates after both streams are aborted.
    """
    if result is None:
        result = SpliceResult(DirectionResult(), DirectionResult())
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                _pump(
                    a,
                    b,
                    a_to_b_prefix,
                    result.a_to_b,
                    abort_b_on_a_error,
                    abort_a_on_b_error,
                    buffer_size,
                    abort_source_on_write_error,
                    _first(on_first_bytes, "a_to_b"),
                )
            )
            tg.create_task(
                _pump(
                    b,
                    a,
                    b_to_a_prefix,
                    result.b_to_a,
                    abort_a_on_b_error,
                    abort_b_on_a_error,
                    buffer_size,
                    abort_source_on_write_error,
                    _first(on_first_bytes, "b_to_a"),
                )
            )
    except BaseException:
        a.abort()
        b.abort()
        raise
    await asyncio.gather(a.aclose(), b.aclose(), return_exceptions=True)
    return result
