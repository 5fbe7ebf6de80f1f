"""The bridge between a local socket and a relay stream, and its access log line.

Spec 03 §5, with our close semantics ([REC] beyond spec 03 §4.2, see
``orp.extensions``):

* a FIN in either direction is a half-close: the other direction goes on;
* the local side breaking -- the application (consumer) or backend (provider)
  resets its connection, or refuses our writes because it closed while bytes
  were still flowing -- is *not* a link failure: the relay stream is reset
  with ``APPLICATION_CLOSED``, our relay passes that on, and the agent at the
  other end resets its own socket at once instead of parking the stream for
  the resume window;
* the relay stream ending for good (the peer's final code, or a resume that
  failed) resets the local socket (TCP RST), so the application knows.

A link failure never reaches the bridge: :class:`ResumableStream` resumes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from outrelay.agent.resumable import ABORTED, ResumableStream
from outrelay.agent.stats import StreamStats
from outrelay.observe import kv
from outrelay.orp import StreamEndCode, end_code_name, is_final
from outrelay.splice import DirectionResult, FirstBytes, SpliceResult, splice
from outrelay.transport import BrokenResourceError, Stream, TransportError

__all__ = ["AccessLog", "bridge"]

log = logging.getLogger("outrelay.agent.access")


def _application_closed(_: TransportError) -> int:
    return StreamEndCode.APPLICATION_CLOSED


async def bridge(
    local: Stream,
    relay: Stream,
    *,
    on_first_bytes: FirstBytes | None = None,
    result: SpliceResult | None = None,
) -> SpliceResult:
    """Copy both ways between ``local`` and ``relay`` until both directions end.

    ``on_first_bytes``: timing marks (:data:`outrelay.splice.FirstBytes`); ``result``:
    counts readable while the bridge runs (:class:`outrelay.agent.stats.StreamStats`).

    Returns:
        The splice's byte counts and errors (``a`` is ``local``, ``b`` is ``relay``).
    """
    return await splice(
        local,
        relay,
        abort_a_on_b_error=True,
        abort_b_on_a_error=_application_closed,
        abort_source_on_write_error=True,
        on_first_bytes=on_first_bytes,
        result=result,
    )


@dataclass
class AccessLog:
    """One info line per stream, on both agents: who, how much, how long, how it ended.

    ``role`` is ``consumer`` or ``provider``; ``local`` names our side's
    socket in outcomes (``app`` or ``backend``).
    """

    role: str
    service: str
    peer: str
    """The other agent's URI (provider side), or the relay's address (consumer side)."""
    local: str
    stream_id: int = 0
    started: float = 0.0
    pipelined: int = 0
    """Application bytes the consumer wrote behind OPEN_STREAM (``orp.CAP_PIPELINE``);
    logged when not 0."""
    stats: StreamStats | None = None
    """The agent's counters (``/metrics``): opens, rejects, live bytes."""

    def __post_init__(self) -> None:
        if not self.started:
            self.started = time.monotonic()

    def _emit(self, outcome: str, sent: int, received: int, **more: object) -> None:
        if self.pipelined:
            more["pipelined"] = self.pipelined
        log.info(
            "stream",
            extra=kv(
                role=self.role,
                svc=self.service,
                peer=self.peer,
                id=self.stream_id,
                sent=sent,
                received=received,
                duration_ms=int((time.monotonic() - self.started) * 1000),
                outcome=outcome,
                **more,
            ),
        )

    def rejected(self, code: int, reason: str) -> None:
        """The open was refused (by the relay, the provider agent or ourselves)."""
        if self.stats is not None:
            self.stats.reject(self.service, self.role, code)
        self._emit("rejected", 0, 0, code=code, reason=reason)

    def live(self) -> SpliceResult:
        """The counts a bridge should update in place: the metrics read them while it runs.

        Pair with :meth:`ended` in a ``finally``.
        """
        result = SpliceResult(DirectionResult(), DirectionResult())
        if self.stats is not None:
            self.stats.bridge_started(self.service, self.role, result, self.pipelined)
        return result

    def ended(self, result: SpliceResult, relay: Stream) -> None:
        """The bridge counting into ``result`` is over (however it ended)."""
        if self.stats is not None:
            resumes = relay.resumes if isinstance(relay, ResumableStream) else 0
            self.stats.bridge_ended(result, resumes)

    def failed(self, reason: str) -> None:
        """The stream never got as far as the bridge (no relay, lost during the open)."""
        if self.stats is not None:
            self.stats.failed[(self.service, self.role)] += 1
        self._emit("failed", 0, 0, reason=reason)

    def bridged(self, result: SpliceResult, relay: Stream) -> None:
        """The bridge is over: name who ended it."""
        resumes = relay.resumes if isinstance(relay, ResumableStream) else 0
        self._emit(
            outcome_of(result, relay, self.local),
            result.a_to_b.bytes + self.pipelined,
            result.b_to_a.bytes,
            resumes=resumes,
        )


def outcome_of(result: SpliceResult, relay: Stream, local: str) -> str:
    """``closed``, ``reset_by_<local>``, ``reset_by_peer_<code>``, ``lost`` or ``aborted``.

    The relay stream's own record decides first: once the peer ended it, our
    side's socket is reset by us, and whichever copy direction noticed first
    does not change who ended the stream.
    """
    end_code = relay.end_code if isinstance(relay, ResumableStream) else None
    up, down = result.a_to_b, result.b_to_a  # local -> relay, relay -> local
    error = down.read_error or up.write_error
    if end_code is None and isinstance(error, BrokenResourceError):
        end_code = error.code
    if is_final(end_code):
        return f"reset_by_peer_{end_code_name(end_code)}"
    if isinstance(up.read_error, BrokenResourceError) or isinstance(
        down.write_error, BrokenResourceError
    ):
        return f"reset_by_{local}"
    if error is None and up.clean and down.clean:
        return "closed"
    if isinstance(relay, ResumableStream) and relay.lost_reason not in (None, ABORTED):
        return "lost"
    return "aborted"
