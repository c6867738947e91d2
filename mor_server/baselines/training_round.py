"""A training round of the parameter-sharing baselines as pure logic (no grpc, no asyncio, no clock of its own).

Like a scoring round (:class:`mor_server.federation.rounds.Round`, whose participant/deadline/replay/dropout rules it
inherits), but each participant answers with a parameter update: its trained values of the tensors the task names,
validated here against the broadcast shapes (:func:`mor.training.decode_tensors`) so every malformed update
is refused with a status naming its field and never reaches an aggregation rule.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mor.training import METHODS, TensorProblem, decode_tensors
from mor_server.federation.rounds import ReportRejected, Round


@dataclass(frozen=True)
class TrainingSpec:
    """What a training round broadcasts and expects back."""

    method: str
    shapes: Mapping[str, tuple[int, ...]]
    """Every broadcast tensor's shape."""
    update_names: tuple[str, ...]
    """The tensors each client must send back (a subset of ``shapes``)."""
    value_bound: float = 1e4
    max_num_examples: int = 10_000_000

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.update_names:
            raise ValueError("update_names is empty: a training round must ask for at least one tensor")
        unknown = [n for n in self.update_names if n not in self.shapes]
        if unknown:
            raise ValueError(f"update_names: {unknown[0]!r} is not a broadcast tensor")
        if not (self.value_bound > 0) or not (self.max_num_examples >= 1):
            raise ValueError("value_bound must be > 0 and max_num_examples >= 1")

    @property
    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.shapes[n]) for n in self.update_names}

    @property
    def update_bytes(self) -> int:
        """Raw tensor bytes of one client's update."""
        return sum(4 * math.prod(s) for s in self.update_shapes.values())


@dataclass(frozen=True)
class ClientUpdate:
    """A validated update: the client's trained values, its example count (aggregation weight), the epsilon it
    reports (informational) and a digest of the tensors it sent (for the audit log)."""

    tensors: dict[str, np.ndarray]
    num_examples: int
    epsilon: float
    loss: float
    digest: str
    bytes: int


def validate_update(spec: TrainingSpec, tensors: Sequence, num_examples: int, epsilon: float = math.inf,
                    loss: float = float("nan"), *, field_prefix: str = "report.update") -> ClientUpdate:
    """Check one ParameterUpdate against ``spec``; raises :class:`ReportRejected` (INVALID_ARGUMENT, the field)."""
    try:
        arrays = decode_tensors(tensors, spec.update_shapes, f"{field_prefix}.tensors", value_bound=spec.value_bound)
    except TensorProblem as e:
        raise ReportRejected("INVALID_ARGUMENT", e.field, e.message) from None
    n = int(num_examples)
    if not 1 <= n <= spec.max_num_examples:
        raise ReportRejected("INVALID_ARGUMENT", f"{field_prefix}.num_examples",
                             f"{field_prefix}.num_examples is {n}; it must be in 1..{spec.max_num_examples} (the "
                             "examples this client trained on: its aggregation weight)")
    eps = float(epsilon)
    if math.isnan(eps) or eps < 0:
        raise ReportRejected("INVALID_ARGUMENT", f"{field_prefix}.epsilon_charged",
                             f"{field_prefix}.epsilon_charged is {eps}; use >= 0, or +inf when trained without DP")
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode() + b"\0" + arrays[name].astype("<f4").tobytes())
    return ClientUpdate(arrays, n, eps, float(loss), h.hexdigest(), sum(4 * a.size for a in arrays.values()))


@dataclass
class TrainingRound(Round):
    """One training round: :class:`Round`'s rules plus the update validation of :attr:`spec`."""

    spec: TrainingSpec | None = None
    total_bytes: int = field(default=0)

    def submit_update(self, client_id: str, tensors: Sequence, num_examples: int, epsilon: float, loss: float,
                      now: float, *, field_prefix: str = "report.update") -> ClientUpdate:
        """Validate then accept; raises ReportRejected (round state unchanged). The participant, deadline and
        replay checks come first, so an intruder learns nothing from the validation message."""
        if client_id not in self.participants:
            raise ReportRejected("PERMISSION_DENIED", "report.round_id",
                                 f"client {client_id!r} is not a participant of round {self.round_id}")
        if self.state.value != "open" or now > self.deadline or client_id in self.reports \
                or client_id in self.dropped:
            self.submit(client_id, None, now)  # raises the precise status (closed, replay, dropped)
        upd = validate_update(self.spec, tensors, num_examples, epsilon, loss, field_prefix=field_prefix)
        self.submit(client_id, upd, now)
        self.total_bytes += upd.bytes
        return upd
