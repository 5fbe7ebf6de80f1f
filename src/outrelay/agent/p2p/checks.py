"""The connectivity-check schedule (spec 03 §7.4 with the [REC] of §7.5), sans-IO.

The reference dials remote candidates one at a time, 2 s each, inside a 5 s
promotion budget. [REC]: run the checks concurrently, staggered (ICE-lite
style), so a slow or dead private address does not eat the budget. The plan
below decides *when* each candidate is dialled and when an attempt or the
whole check has failed; the shell does the dialling. Time is an argument.

Usage: ``plan.start(now)``; at every :meth:`CheckPlan.next_deadline` (and
after each report) call :meth:`CheckPlan.poll`, dial what it returns, and
report :meth:`CheckPlan.succeeded` / :meth:`CheckPlan.failed`. The first
success wins; :attr:`CheckPlan.outcome` then stays fixed, and the shell
cancels the other dials.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from outrelay.agent.p2p.candidates import Candidate, order_remote

__all__ = ["CHECK_BUDGET", "PAIR_TIMEOUT", "STAGGER", "CheckOutcome", "CheckPlan"]

PAIR_TIMEOUT = 2.0  # spec 03 §7.4: the binary's per-pair timeout
STAGGER = 0.1  # [REC] §7.5: ~100 ms between starts
CHECK_BUDGET = 5.0  # spec 03 §7.5: the whole promotion budget


class CheckOutcome(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    NO_PAIR = "no pair"
    """Every candidate failed or timed out (ErrNoPair)."""
    BUDGET_EXPIRED = "budget expired"


@dataclass
class _Attempt:
    candidate: Candidate
    started: float
    done: bool = False


@dataclass
class CheckPlan:
    remote: Sequence[Candidate]
    pair_timeout: float = PAIR_TIMEOUT
    stagger: float = STAGGER
    budget: float = CHECK_BUDGET
    outcome: CheckOutcome = CheckOutcome.RUNNING
    winner: Candidate | None = None
    rtt: float | None = None
    """The winning dial's duration (spec 03 §7.4)."""
    _queue: list[Candidate] = field(default_factory=list)
    _attempts: dict[Candidate, _Attempt] = field(default_factory=dict)
    _start: float = 0.0
    _next_start: float = 0.0

    def start(self, now: float) -> None:
        self._queue = order_remote(self.remote)
        self._start = now
        self._next_start = now
        if self.pair_timeout <= 0:
            self.pair_timeout = PAIR_TIMEOUT  # zero or negative values are ignored (§7.4)
        if not self._queue:
            self.outcome = CheckOutcome.NO_PAIR

    def poll(self, now: float) -> list[Candidate]:
        """Candidates to dial now; also expires attempts and the budget."""
        if self.outcome is not CheckOutcome.RUNNING:
            return []
        if now - self._start >= self.budget:
            self.outcome = CheckOutcome.BUDGET_EXPIRED
            return []
        for attempt in self._attempts.values():
            if not attempt.done and now - attempt.started >= self.pair_timeout:
                attempt.done = True
        due: list[Candidate] = []
        while self._queue and now >= self._next_start:
            candidate = self._queue.pop(0)
            self._attempts[candidate] = _Attempt(candidate, now)
            due.append(candidate)
            self._next_start += self.stagger
        self._check_exhausted()
        return due

    def succeeded(self, candidate: Candidate, now: float) -> bool:
        """A dial completed; True if it wins (the first success within its timeouts)."""
        attempt = self._attempts.get(candidate)
        if self.outcome is not CheckOutcome.RUNNING or attempt is None or attempt.done:
            return False
        if now - attempt.started > self.pair_timeout or now - self._start > self.budget:
            attempt.done = True
            self._check_exhausted()
            return False
        attempt.done = True
        self.outcome = CheckOutcome.SUCCEEDED
        self.winner = candidate
        self.rtt = now - attempt.started
        return True

    def failed(self, candidate: Candidate, now: float) -> None:
        attempt = self._attempts.get(candidate)
        if attempt is not None:
            attempt.done = True
        self._check_exhausted()

    def pending(self) -> list[Candidate]:
        """Dials started and not finished (the shell cancels them once decided)."""
        return [a.candidate for a in self._attempts.values() if not a.done]

    def next_deadline(self) -> float | None:
        if self.outcome is not CheckOutcome.RUNNING:
            return None
        deadlines = [self._start + self.budget]
        if self._queue:
            deadlines.append(self._next_start)
        deadlines += [a.started + self.pair_timeout for a in self._attempts.values() if not a.done]
        return min(deadlines)

    def _check_exhausted(self) -> None:
        if (
            self.outcome is CheckOutcome.RUNNING
            and not self._queue
            and all(a.done for a in self._attempts.values())
        ):
            self.outcome = CheckOutcome.NO_PAIR
