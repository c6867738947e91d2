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

    Secure aggregation (``secagg`` / ``secagg+dp``; enforced by ``privacy.secagg.SecAggClient`` on the signed
    round config, so the server cannot relax them):

    max_weight: the largest routing weight this client accepts on any item.
    min_contributors: the fewest *effective* contributors (this client included) on every item it contributes to.
    min_weight_fraction: a peer counts as a contributor on an item only if its weight there is at least this
        fraction of this client's own weight on that item (default 0.1).
    min_weight_grid_steps: ... and at least this many fixed-point steps (``steps * 2^-frac_bits``; default 16), so
        weights that round the peer's contribution to ~0 do not count.
    min_collusion_tolerance: the fewest colluding clients per neighbourhood (c) a round must tolerate; the client
        refuses a round whose config names a smaller c (default 1; c and the threshold t satisfy 2t > degree+1+c).
    """

    supported_modes: tuple[str, ...] = ("plain",)
    ledger: object | None = None
    min_noise_multiplier: float = 0.5
    max_weight: float = 1.0
    min_contributors: int = 2
    min_weight_fraction: float = 0.1
    min_weight_grid_steps: float = 16.0
    min_collusion_tolerance: int = 1
    stats: dict = field(default_factory=lambda: {"released": 0, "refused": 0})

    def __post_init__(self):
        if not (0.0 <= self.min_weight_fraction <= 1.0):
            raise ValueError(f"min_weight_fraction must be in [0, 1], got {self.min_weight_fraction!r}")
        if not (self.min_weight_grid_steps >= 0):
            raise ValueError(f"min_weight_grid_steps must be >= 0, got {self.min_weight_grid_steps!r}")
        if self.min_collusion_tolerance < 0:
            raise ValueError(f"min_collusion_tolerance must be >= 0, got {self.min_collusion_tolerance!r}")
        if self.min_contributors < 1:
            raise ValueError(f"min_contributors must be >= 1, got {self.min_contributors!r}")
        if not (0 < self.max_weight):
            raise ValueError(f"max_weight must be positive, got {self.max_weight!r}")

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
