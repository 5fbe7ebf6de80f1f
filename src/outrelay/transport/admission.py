"""What a listener may spend on peers that have proved nothing yet (sans-IO).

A QUIC Initial or a TCP SYN costs the sender a datagram; before this module
each one cost the relay a connection object, a TLS context and a timer for up
to ~10 s. The listeners (:mod:`outrelay.transport.quic`,
:mod:`outrelay.transport.tcp`) ask here before they allocate anything:

* :class:`TokenBucket` / :class:`SourceBuckets`: the rate of new handshakes,
  per source address and in total.
* :class:`HalfOpen`: handshakes in progress, in total and per source; the
  listener closes a handshake that has not finished by its deadline and
  reports it here.
* :class:`QuicAdmission`: the QUIC listener's policy. An Initial without a
  token is admitted while everything is quiet; under pressure (too many
  unvalidated handshakes, a source or the whole listener over its rate) it
  is answered with a stateless Retry instead (RFC 9000 §8.1.2), for
  :data:`RETRY_HOLD` seconds after the pressure was last seen. Only a client
  that echoes the Retry token, proving it receives at its address, gets state.

No I/O, no clock: every method takes ``now`` (seconds, any monotonic origin).
Sources are IP address strings (the port is not part of it: a host picks
ports at will).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MAX_HALF_OPEN",
    "MAX_HALF_OPEN_PER_SOURCE",
    "MAX_SOURCES",
    "NEW_HANDSHAKE_BURST",
    "NEW_HANDSHAKE_RATE",
    "RETRY_HOLD",
    "RETRY_THRESHOLD",
    "TOTAL_HANDSHAKE_BURST",
    "TOTAL_HANDSHAKE_RATE",
    "UNVALIDATED_PER_SOURCE",
    "HalfOpen",
    "QuicAdmission",
    "RetryMode",
    "SourceBuckets",
    "TokenBucket",
    "Verdict",
]

MAX_HALF_OPEN = 512
"""Handshakes in progress on one listener, all sources together. One aioquic
server connection mid-handshake holds ~50-100 KiB (TLS state, crypto
buffers, our connection object), so 512 of them stay under ~50 MiB; a relay
sees a few hundred agents reconnect at once after a restart, and a
handshake takes milliseconds, so legitimate load never comes close."""
MAX_HALF_OPEN_PER_SOURCE = 64
"""Handshakes in progress from one IP address: one host (or NAT) cannot take
more than an eighth of :data:`MAX_HALF_OPEN`."""
RETRY_THRESHOLD = 64
"""``--quic-retry auto``: Retry is switched on when this many handshakes from
unvalidated addresses are in progress. Below it a relay that just restarted
lets its agents back in without the extra round trip."""
UNVALIDATED_PER_SOURCE = 8
"""Handshakes in progress from one unvalidated IP address before ``auto``
switches Retry on (``never``: further Initials from it are dropped). Eight
agents behind one NAT reconnecting at once still get in at first try."""
NEW_HANDSHAKE_RATE = 20.0
"""New unvalidated handshakes per second from one IP address (token bucket
refill). Over it, ``auto`` answers with Retry and ``never`` drops: a source
cannot make the relay build connections faster than this."""
NEW_HANDSHAKE_BURST = 40.0
"""Bucket size for :data:`NEW_HANDSHAKE_RATE`: a host may start 40 agents at once."""
TOTAL_HANDSHAKE_RATE = 500.0
"""New unvalidated handshakes per second on one listener, all sources
together: a flood from spoofed or many addresses (each with a full bucket)
still cannot make the relay build more connections than this."""
TOTAL_HANDSHAKE_BURST = 1000.0
"""Bucket size for :data:`TOTAL_HANDSHAKE_RATE`."""
RETRY_HOLD = 10.0
"""``auto`` keeps Retry on this long after pressure was last seen. Without
it, Retry would flap: pressure clears as soon as Retry has starved the
flood of new state, and the next burst would build state again."""
MAX_SOURCES = 4096
"""Per-source buckets kept. Full buckets carry no information and are
pruned first; if all of them are busy (a flood from many addresses), a new
source is treated as over its rate."""


class RetryMode(enum.Enum):
    """The relay's ``--quic-retry``: when clients must prove their address first."""

    AUTO = "auto"
    """Retry under pressure only (the default)."""
    ALWAYS = "always"
    """Every new client gets a Retry first (one more round trip per connect)."""
    NEVER = "never"
    """No Retry is sent; over the caps, Initials are dropped."""


class Verdict(enum.Enum):
    """What a listener does with a connection attempt."""

    ADMIT = "admit"
    """Build the connection and start the handshake."""
    RETRY = "retry"
    """Answer with a stateless Retry; keep nothing."""
    DROP = "drop"
    """Ignore it; keep nothing, send nothing."""


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate=rate, burst=burst, tokens=burst, stamp=now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False (and nothing spent) if not."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class SourceBuckets:
    """One :class:`TokenBucket` per source, at most ``max_sources`` of them."""

    def __init__(self, rate: float, burst: float, max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str, now: float) -> bool:
        """Spend one of ``source``'s tokens; False if it has none (or no bucket fits)."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self.prune(now)
                if len(self._buckets) >= self.max_sources:
                    return False
            bucket = self._buckets[source] = TokenBucket.full(self.rate, self.burst, now)
        return bucket.take(now)

    def prune(self, now: float) -> None:
        """Forget every full bucket (a source that has been quiet long enough)."""
        for source in [s for s, b in self._buckets.items() if b.is_full(now)]:
            del self._buckets[source]


class HalfOpen:
    """Handshakes in progress, in total and per source, under two caps."""

    def __init__(self, total_cap: int, per_source_cap: int) -> None:
        self.total_cap = total_cap
        self.per_source_cap = per_source_cap
        self.total = 0
        self._by_source: dict[str, int] = {}

    def of(self, source: str) -> int:
        return self._by_source.get(source, 0)

    @property
    def sources(self) -> int:
        return len(self._by_source)

    def fits(self, source: str) -> bool:
        """Would one more handshake from ``source`` stay within both caps?"""
        return self.total < self.total_cap and self.of(source) < self.per_source_cap

    def open(self, source: str) -> None:
        """Count a handshake that started (callers check :meth:`fits` first)."""
        self.total += 1
        self._by_source[source] = self._by_source.get(source, 0) + 1

    def close(self, source: str) -> None:
        """A handshake finished, failed or expired: uncount it (exactly once per open)."""
        count = self._by_source.get(source, 0)
        if count <= 0:
            raise ValueError(f"no handshake in progress from {source}")
        self.total -= 1
        if count == 1:
            del self._by_source[source]
        else:
            self._by_source[source] = count - 1


class QuicAdmission:
    """The QUIC listener's decisions for connection attempts (see the module docstring)."""

    def __init__(
        self,
        mode: RetryMode = RetryMode.AUTO,
        *,
        max_half_open: int = MAX_HALF_OPEN,
        max_half_open_per_source: int = MAX_HALF_OPEN_PER_SOURCE,
        retry_threshold: int = RETRY_THRESHOLD,
        unvalidated_per_source: int = UNVALIDATED_PER_SOURCE,
        rate: float = NEW_HANDSHAKE_RATE,
        burst: float = NEW_HANDSHAKE_BURST,
        total_rate: float = TOTAL_HANDSHAKE_RATE,
        total_burst: float = TOTAL_HANDSHAKE_BURST,
        retry_hold: float = RETRY_HOLD,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self.mode = mode
        self.half_open = HalfOpen(max_half_open, max_half_open_per_source)
        """Every handshake in progress, validated or not."""
        self.unvalidated = HalfOpen(retry_threshold, unvalidated_per_source)
        """The subset whose client has not echoed a Retry token."""
        self._buckets = SourceBuckets(rate, burst, max_sources)
        self._total = TokenBucket.full(total_rate, total_burst, 0.0)
        self._retry_hold = retry_hold
        self._pressure_until = float("-inf")
        self.stats: dict[str, int] = {v.value: 0 for v in Verdict}
        """How many attempts got each verdict (``admit``/``retry``/``drop``)."""

    def retry_active(self, now: float) -> bool:
        """Is a token-less Initial answered with Retry right now?"""
        if self.mode is RetryMode.ALWAYS:
            return True
        return self.mode is RetryMode.AUTO and now < self._pressure_until

    def check_new(self, source: str, now: float) -> Verdict:
        """An Initial without a token from ``source`` (an address nobody vouched for)."""
        verdict = self._check_new(source, now)
        self.stats[verdict.value] += 1
        return verdict

    def _check_new(self, source: str, now: float) -> Verdict:
        if self.retry_active(now):
            return Verdict.RETRY
        if self.mode is RetryMode.NEVER:
            if self.half_open.fits(source) and self._take(source, now):
                return Verdict.ADMIT
            return Verdict.DROP
        if (
            self.half_open.fits(source)
            and self.unvalidated.fits(source)
            and self._take(source, now)
        ):
            return Verdict.ADMIT
        self._pressure_until = now + self._retry_hold
        return Verdict.RETRY

    def check_validated(self, source: str) -> Verdict:
        """An Initial whose Retry token proved ``source``: only the hard caps apply."""
        verdict = Verdict.ADMIT if self.half_open.fits(source) else Verdict.DROP
        self.stats[verdict.value] += 1
        return verdict

    def allow_reply(self, source: str, now: float) -> bool:
        """May a stateless reply other than Retry (Version Negotiation) go to ``source``?

        Spends the same tokens as a new handshake: garbage with random
        versions must not turn the listener into a packet generator.
        """
        return self._take(source, now)

    def _take(self, source: str, now: float) -> bool:
        # Per source first: a flooding source must not drain the shared bucket.
        return self._buckets.take(source, now) and self._total.take(now)

    def opened(self, source: str, *, validated: bool) -> None:
        """An admitted attempt now holds state until :meth:`closed`."""
        self.half_open.open(source)
        if not validated:
            self.unvalidated.open(source)

    def closed(self, source: str, *, validated: bool) -> None:
        """The handshake completed, failed or expired."""
        self.half_open.close(source)
        if not validated:
            self.unvalidated.close(source)
