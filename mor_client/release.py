"""What a client releases for a task, as pure logic: plain scores, DP-noised scores, or a refusal.

The SDK's transport calls :meth:`ReleasePolicy.release` with the task's mode and the scorer's raw scores; this module
decides what may leave the institution. DP releases are charged to the client's privacy ledger *before* the scores
are returned (a crash can over-count the budget, never under-count it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Release:
    """kind: "plain" | "dp" | "refuse". For refusals, ``code`` is a gRPC status-code name."""

    kind: str
    scores: tuple[float, ...] = ()
    clip: float = 0.0
    noise_multiplier: float = 0.0
    epsilon_total: float = 0.0
    code: str = ""
    reason: str = ""
    remaining_epsilon: float = math.nan


@dataclass
class ReleasePolicy:
    """The client's rules for releasing scores.

    supported_modes: privacy modes this client accepts; a task in another mode is refused.
    ledger: a ``privacy.ledger.PrivacyLedger`` charged for every ``dp`` release (required for ``dp``).
    min_noise_multiplier: the smallest noise multiplier the client accepts for ``dp`` (the server cannot ask for
        less noise than this).
    """

    supported_modes: tuple[str, ...] = ("plain",)
    ledger: object | None = None
    min_noise_multiplier: float = 0.5
    stats: dict = field(default_factory=lambda: {"released": 0, "refused": 0})

    def release(self, *, mode: str, round_id: str, scores: Sequence[float], clip: float = 0.0,
                noise_multiplier: float = 0.0) -> Release:
        if mode not in self.supported_modes:
            return self._refuse("FAILED_PRECONDITION", f"mode {mode!r} is not enabled on this client "
                                f"(supported: {', '.join(self.supported_modes)})")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            return self._refuse("INTERNAL", f"the local scorer produced non-finite scores at positions {bad[:5]}")
        if mode == "plain":
            self.stats["released"] += 1
            return Release("plain", tuple(float(s) for s in scores))
        if mode == "dp":
            return self._release_dp(round_id, scores, clip, noise_multiplier)
        return self._refuse("UNIMPLEMENTED", f"mode {mode!r} is handled by the secure-aggregation path")

    def _refuse(self, code: str, reason: str, remaining: float = math.nan) -> Release:
        self.stats["refused"] += 1
        return Release("refuse", code=code, reason=reason, remaining_epsilon=remaining)

    def _release_dp(self, round_id: str, scores: Sequence[float], clip: float, noise_multiplier: float) -> Release:
        from privacy import dp
        from privacy.ledger import BudgetExceeded

        if self.ledger is None:
            return self._refuse("FAILED_PRECONDITION", "dp mode needs a privacy ledger on the client (--ledger)")
        if not (clip > 0 and math.isfinite(clip)):
            return self._refuse("INVALID_ARGUMENT", f"task.dp.clip must be a positive number, got {clip}")
        if not (noise_multiplier >= self.min_noise_multiplier and math.isfinite(noise_multiplier)):
            return self._refuse("INVALID_ARGUMENT", f"task.dp.noise_multiplier={noise_multiplier} is below this "
                                f"client's floor {self.min_noise_multiplier}")
        try:
            charge = self.ledger.charge_release(round_id=round_id, noise_multiplier=noise_multiplier, count=1,
                                                meta={"clip": clip, "m": len(scores)})
        except BudgetExceeded as e:
            return self._refuse("RESOURCE_EXHAUSTED", str(e), getattr(e, "remaining_epsilon", math.nan))
        noised = dp.gaussian_release(list(scores), clip=clip, noise_multiplier=noise_multiplier)
        self.stats["released"] += 1
        eps_total = float(getattr(charge, "epsilon_after", getattr(charge, "epsilon", math.nan)))
        return Release("dp", tuple(float(x) for x in noised), clip, noise_multiplier, eps_total)
