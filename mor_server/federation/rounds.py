"""Round orchestration as pure logic: no grpc, no asyncio, no clocks of its own (times are passed in).

A *round* sends one scoring task to a set of participants and gathers their reports until every participant has
answered or dropped, or the deadline passes. It completes with the responders when at least ``min_clients``
answered; otherwise it fails with a reason. A participant that disconnects mid-round is *dropped*: it is never
counted as a zero score.

Validation errors are :class:`ReportRejected` with a gRPC status-code *name* (the servicer maps it to the wire) and
the offending field path, so the client is told exactly what was wrong and the round carries on.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
log = logging.getLogger("mor.rounds")


class RoundState(str, Enum):
    OPEN = "open"
    COMPLETED = "completed"
    FAILED = "failed"


class ReportRejected(Exception):
    """A client's report was refused; ``code`` is a gRPC status-code name, ``field`` the offending field path."""

    def __init__(self, code: str, field: str, message: str):
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message


class RoundFailed(Exception):
    """A scoring round did not produce a usable result (too few clients, deadline, cancelled...)."""


class RoundCancelled(RoundFailed, TimeoutError):
    """A round was cancelled before it ended (its caller's bound passed, or the server stopped)."""


@dataclass(frozen=True)
class RetryPolicy:
    """THE retry policy of scoring rounds, used by the one layer that retries (``MoRReward`` for GRPO rewards,
    ``calibrate_router`` for calibration; the federated backend runs exactly one round per call).

    Each attempt is one round that ends by its own deadline inside the server (``round_timeout_s``; a round still
    running past it plus a margin is cancelled, never left running), so attempts never overlap and a ``secagg+dp``
    round is charged at most once per attempt."""

    attempts: int = 2
    """Rounds tried per logical request (1 = no retry)."""
    round_timeout_s: float = 60.0
    """Deadline of one attempt, enforced by the server."""
    backoff_s: float = 0.0
    """Pause between attempts."""

    def __post_init__(self):
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be an integer >= 1, got {self.attempts!r}")
        if not self.round_timeout_s > 0:
            raise ValueError(f"RetryPolicy.round_timeout_s must be > 0, got {self.round_timeout_s!r}")
        if not self.backoff_s >= 0:
            raise ValueError(f"RetryPolicy.backoff_s must be >= 0, got {self.backoff_s!r}")

    @classmethod
    def from_retries(cls, retries: int, round_timeout_s: float = 60.0, backoff_s: float = 0.0) -> "RetryPolicy":
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        return cls(retries + 1, round_timeout_s, backoff_s)

    def run(self, attempt: Callable[[int], T], *, what: str = "scoring round",
            on_failure: Callable[[int, RoundFailed], None] | None = None) -> T:
        """Call ``attempt(i)`` until it returns; retries only :class:`RoundFailed` (anything else is a bug and
        propagates). Raises RoundFailed naming the last reason after ``attempts`` failures."""
        last: RoundFailed | None = None
        for i in range(self.attempts):
            try:
                return attempt(i)
            except RoundFailed as e:
                last = e
                if on_failure is not None:
                    on_failure(i, e)
                if i + 1 < self.attempts:
                    log.warning("%s failed (%s); retrying (%d/%d)", what, e, i + 1, self.attempts - 1)
                    if self.backoff_s:
                        time.sleep(self.backoff_s)
        raise RoundFailed(f"{what} failed {self.attempts} time(s); last reason: {last}")


@dataclass(frozen=True)
class RoundOutcome:
    """How a round ended. What the server learned is in exactly one of two fields, by the kind of round:

    * ``reports``: one validated payload per responding client, for rounds where each client's answer reaches the
      server (``plain``: the flat score list; ``dp``: ``{"scores", "epsilon"}``; training rounds: a
      ``ClientUpdate``); empty for secure-aggregation rounds.
    * ``aggregate``: what a secure-aggregation round unmasks, and nothing per client (scoring:
      ``{"sum", "survivors", "out_of_range"}``; training: ``{"mean", "num_examples", "survivors"}``); empty for
      every other round and for a failed one.
    """

    round_id: str
    state: RoundState
    participants: tuple[str, ...]
    responders: tuple[str, ...]
    dropped: dict[str, str]            # client -> why (disconnected, deadline, refused: ...)
    reports: dict[str, object]         # client -> validated payload (only responders; never in SecAgg+ rounds)
    reason: str = ""
    started_at: float = 0.0
    closed_at: float = 0.0
    aggregate: dict[str, object] = field(default_factory=dict)  # SecAgg+ rounds only: the unmasked aggregate

    @property
    def ok(self) -> bool:
        return self.state is RoundState.COMPLETED

    @property
    def latency(self) -> float:
        return self.closed_at - self.started_at


def validate_scores(values: Sequence[float], expected: int, field_path: str) -> list[float]:
    """Check a flat score vector: exact length, every value finite. Returns it as a list of floats."""
    if len(values) != expected:
        raise ReportRejected("INVALID_ARGUMENT", field_path,
                             f"{field_path} has {len(values)} values; the task expects {expected} "
                             "(one per candidate, item-major)")
    out = []
    for i, v in enumerate(values):
        fv = float(v)
        if not math.isfinite(fv):
            raise ReportRejected("INVALID_ARGUMENT", f"{field_path}[{i}]",
                                 f"{field_path}[{i}] is {fv}; scores must be finite numbers")
        out.append(fv)
    return out


@dataclass
class Round:
    """One scoring round. ``expected`` is the number of score values each participant must return."""

    round_id: str
    participants: tuple[str, ...]
    min_clients: int
    deadline: float
    started_at: float
    expected: int
    mode: str = "plain"
    state: RoundState = RoundState.OPEN
    reports: dict[str, object] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    outcome: RoundOutcome | None = None

    def __post_init__(self):
        if not self.participants:
            raise ValueError("a round needs at least one participant")
        if len(set(self.participants)) != len(self.participants):
            raise ValueError(f"round {self.round_id}: participants must be distinct, got {list(self.participants)}")
        if not 1 <= self.min_clients <= len(self.participants):
            raise ValueError(f"min_clients={self.min_clients} must be between 1 and the number of participants "
                             f"({len(self.participants)})")

    # -- events -----------------------------------------------------------------------------------------------------
    def submit(self, client_id: str, payload: object, now: float) -> None:
        """Accept a validated payload from ``client_id``; raises ReportRejected (round state unchanged)."""
        if client_id not in self.participants:
            raise ReportRejected("PERMISSION_DENIED", "report.round_id",
                                 f"client {client_id!r} is not a participant of round {self.round_id}")
        if self.state is not RoundState.OPEN or now > self.deadline:
            raise ReportRejected("DEADLINE_EXCEEDED", "report.round_id",
                                 f"round {self.round_id} is closed ({self.state.value}); the report came too late")
        if client_id in self.reports:
            raise ReportRejected("ALREADY_EXISTS", "report.round_id",
                                 f"client {client_id!r} already reported for round {self.round_id}; replays are refused")
        if client_id in self.dropped:
            raise ReportRejected("FAILED_PRECONDITION", "report.round_id",
                                 f"client {client_id!r} was dropped from round {self.round_id} "
                                 f"({self.dropped[client_id]})")
        self.reports[client_id] = payload

    def drop(self, client_id: str, reason: str) -> bool:
        """Mark a participant as dropped (disconnect, refusal). Returns False if it already answered or is unknown."""
        if self.state is not RoundState.OPEN or client_id not in self.participants:
            return False
        if client_id in self.reports or client_id in self.dropped:
            return False
        self.dropped[client_id] = reason
        return True

    @property
    def settled(self) -> bool:
        """Every participant has either answered or dropped: nothing more can arrive."""
        return len(self.reports) + len(self.dropped) == len(self.participants)

    def cancel(self, now: float, reason: str) -> RoundOutcome:
        """Close the round as FAILED because it was cancelled; idempotent like :meth:`close`."""
        if self.outcome is not None:
            return self.outcome
        for c in self.participants:
            if c not in self.reports and c not in self.dropped:
                self.dropped[c] = "round cancelled"
        self.state = RoundState.FAILED
        responders = tuple(c for c in self.participants if c in self.reports)
        self.outcome = RoundOutcome(self.round_id, self.state, self.participants, responders, dict(self.dropped),
                                    {}, reason, self.started_at, now)
        return self.outcome

    def close(self, now: float) -> RoundOutcome:
        """Close the round (idempotent): participants that did not answer are dropped at the deadline."""
        if self.outcome is not None:
            return self.outcome
        for c in self.participants:
            if c not in self.reports and c not in self.dropped:
                self.dropped[c] = "no report before the deadline"
        n = len(self.reports)
        if n >= self.min_clients:
            self.state, reason = RoundState.COMPLETED, ""
        else:
            self.state = RoundState.FAILED
            reason = (f"only {n} of {len(self.participants)} clients reported (min_clients={self.min_clients}); "
                      "dropped: " + ", ".join(f"{c} ({why})" for c, why in sorted(self.dropped.items())))
        responders = tuple(c for c in self.participants if c in self.reports)
        self.outcome = RoundOutcome(self.round_id, self.state, self.participants, responders, dict(self.dropped),
                                    dict(self.reports), reason, self.started_at, now)
        return self.outcome


class RoundBook:
    """Open rounds plus a bounded memory of closed ones, so late and replayed reports get a precise answer."""

    def __init__(self, remember_closed: int = 4096):
        self.open: dict[str, Round] = {}
        self._closed: OrderedDict[str, RoundState] = OrderedDict()
        self._remember = remember_closed

    def add(self, rnd: Round) -> Round:
        if rnd.round_id in self.open or rnd.round_id in self._closed:
            raise ValueError(f"round id {rnd.round_id!r} was already used")
        self.open[rnd.round_id] = rnd
        return rnd

    def lookup(self, round_id: str) -> Round:
        if not round_id:
            raise ReportRejected("INVALID_ARGUMENT", "report.round_id", "report.round_id is empty")
        rnd = self.open.get(round_id)
        if rnd is not None:
            return rnd
        if round_id in self._closed:
            raise ReportRejected("DEADLINE_EXCEEDED", "report.round_id",
                                 f"round {round_id} is already closed ({self._closed[round_id].value}); "
                                 "the report came too late")
        raise ReportRejected("NOT_FOUND", "report.round_id", f"unknown round id {round_id!r}")

    def finish(self, round_id: str, now: float) -> RoundOutcome:
        rnd = self.open.pop(round_id)
        outcome = rnd.close(now)
        self._closed[round_id] = outcome.state
        while len(self._closed) > self._remember:
            self._closed.popitem(last=False)
        return outcome

    def drop_everywhere(self, client_id: str, reason: str) -> list[Round]:
        """Drop a client from every open round it takes part in (e.g. it disconnected)."""
        return [r for r in self.open.values() if r.drop(client_id, reason)]


def check_bound(values: Sequence[float], bound: float, field_path: str) -> None:
    """Every score within the task's declared range ``|score| <= bound`` (``ScoringTask.score_bound``)."""
    for i, v in enumerate(values):
        if abs(v) > bound:
            raise ReportRejected("INVALID_ARGUMENT", f"{field_path}[{i}]",
                                 f"{field_path}[{i}] is {v:g}, outside the task's declared range |score| <= "
                                 f"{bound:g} (task.score_bound); scores are rewards, higher is better, on a bounded "
                                 "scale")


PAYLOAD_FOR_MODE = {"plain": "plain", "dp": "dp"}
"""The report payload of each mode a plain scoring round runs in (secure aggregation sends ``report.secagg``)."""


def stage_key(round_id: str, stage: str) -> str:
    """The round-book key of one stage of a secure-aggregation round."""
    return f"{round_id}/{stage}"
