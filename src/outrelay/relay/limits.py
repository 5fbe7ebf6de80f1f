"""Per-agent bounds of the relay: one agent may cost the relay only so much.

Each bound is a named constant with its reason; the README lists them. Others live
where they are enforced: the control queue in :mod:`outrelay.relay.outbox`
(``QUEUE_MAX``, ``DROP_ABOVE``, ``WRITE_TIMEOUT``), concurrent data streams per
connection in the transports (``MAX_INCOMING_STREAMS``: 1,024 on QUIC, 100 on
yamux), the records of broken splices and agent processes in
:mod:`outrelay.relay.pairs`.

The control-frame rate is enforced with ``transport.admission.TokenBucket``, the one the
listeners use against handshake floods.
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
