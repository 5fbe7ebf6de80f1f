"""Per-agent bounds of the relay: one agent may cost the relay only so much.

Each bound is a named constant with its reason; the README lists them. Others live
where they are enforced: the control queue in :mod:`outrelay.relay.outbox`
(``QUEUE_MAX``, ``DROP_ABOVE``, ``WRITE_TIMEOUT``), concurrent data streams per
connection in the transports (``MAX_INCOMING_STREAMS``: 1,024 on QUIC, 100 on
yamux), the records of broken splices and agent processes in
:mod:`outrelay.relay.pairs`.

Sans-IO: :class:`TokenBucket` takes ``now`` as an argument.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CONTROL_BURST",
    "CONTROL_FRAMES_PER_SECOND",
    "MAX_CONTROL_FRAME",
    "MAX_PARKED_HALVES_PER_AGENT",
    "MAX_REGISTRATIONS_PER_AGENT",
    "MAX_SERVICE_NAME",
    "TokenBucket",
]

CONTROL_FRAMES_PER_SECOND: Final = 20_000.0
"""Control frames one agent may send per second, sustained. Our agents send one
STREAM_CHECKPOINT per moving stream every 100 ms, so 1,000 busy streams are 10,000
frames/s; twice that leaves room. Beyond it the agent's connection is closed."""
CONTROL_BURST: Final = 40_000.0
"""Frames one agent may send at once above the sustained rate (two seconds' worth)."""
MAX_CONTROL_FRAME: Final = 64 << 10
"""Largest control frame accepted from an agent: 64 KiB. HELLO, REGISTER and a
candidate offer with dozens of addresses are a few hundred bytes; the codec's
16 MiB cap (spec 01) would let one frame make the relay buffer 16 MiB."""
MAX_REGISTRATIONS_PER_AGENT: Final = 256
"""Services one agent connection may register. A sidecar exposes a handful; the
bound keeps one agent from filling the registry."""
MAX_SERVICE_NAME: Final = 253
"""Longest service name accepted, in bytes: a DNS name's limit (tproxy mode answers
``<service>.outrelay`` queries)."""
MAX_PARKED_HALVES_PER_AGENT: Final = 1024
"""Resume halves one agent URI may have waiting at once: as many as one connection
may open streams (1,024 on QUIC). A parked half outlives its connection for the
resume window, so without a cap reconnecting agents could pile them up."""


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per event."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._last = now

    def take(self, now: float, tokens: float = 1.0) -> bool:
        """Spend ``tokens`` if there are enough at ``now``; False leaves the bucket as it was."""
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        if self._tokens < tokens:
            return False
        self._tokens -= tokens
        return True
