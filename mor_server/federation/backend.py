"""The federated reward backend: scoring rounds over gRPC behind the alignment engine's ``RewardBackend`` seam.

* ``client_scores`` (router calibration) runs a ``plain`` or ``dp`` round and returns per-client scores (DP-noised
  and charged to each client's ledger in ``dp`` mode).
* ``mixed_scores`` (GRPO rewards) returns the routed mixture ``sum_k w_k(x_i) * r_k(x_i, y_ij)``. In ``secagg`` and
  ``secagg+dp`` modes each client multiplies its own scores by its routing weight and masks them; the server unmasks
  only the weighted sum and never sees an individual client's score. In ``plain`` mode (trusted pilots) the server
  computes the same sum itself.

When a client drops, the mixture is renormalised over the clients that answered (per item: divide by the sum of
the responders' weights), so a dropout never turns into a zero reward. Each call runs exactly ONE round, which ends
by its own deadline inside the server (``timeout``); a failed round raises ``RoundFailed`` and the caller's
:class:`~mor_server.federation.rounds.RetryPolicy` (in ``MoRReward`` / ``calibrate_router``, the only layer that retries)
decides whether to try again. :meth:`FederatedBackend.cancel` cancels the round in flight on the server's loop and
waits until it has ended (recorded as failed, "cancelled"; clients told), so no abandoned round keeps running.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from mor.modes import MODES, PER_CLIENT_MODES, SECAGG_MODES
from mor.types import ScoringItem
from mor.wire import unflatten

from .rounds import RoundCancelled, RoundFailed
from .secagg_transport import DEFAULT_VALUE_RANGE
from .server import FederationServer
from .thread import ServerThread

log = logging.getLogger("mor.federated")


def secagg_value_range(bound: float, *, headroom: float = 1.5) -> float:
    """The secagg value range for scores seen up to ``bound`` in magnitude: ``headroom`` x ``bound`` rounded up to a
    power of two, at least :data:`DEFAULT_VALUE_RANGE` (a power of two keeps runs with similar bounds on one range,
    and the range is a round parameter every client sees)."""
    import math

    b = float(bound)
    if not math.isfinite(b) or b <= 0:
        return DEFAULT_VALUE_RANGE
    return max(DEFAULT_VALUE_RANGE, 2.0 ** math.ceil(math.log2(headroom * b)))


class FederatedBackend:
    def __init__(self, server: ServerThread, *, calibration_mode: str = "plain", mix_mode: str = "plain",
                 timeout: float = 60.0, min_clients: int = 1, dp_clip: float = 1.0,
                 dp_noise_multiplier: float = 1.0, secagg_options: dict | None = None,
                 isolation_floor: bool = True):
        """isolation_floor: in plain ``secagg``, move the smallest amount of an item's weight from its top client to its
        runner-up that the clients' default isolation rule accepts (``privacy.secagg.weights.floor_for_isolation``);
        otherwise a sharp router makes clients refuse the round."""
        if calibration_mode not in PER_CLIENT_MODES:
            raise ValueError(f"calibration_mode must be 'plain' or 'dp', got {calibration_mode!r}")
        if mix_mode not in MODES:
            raise ValueError(f"mix_mode must be plain, dp, secagg or secagg+dp, got {mix_mode!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.server = server
        self.calibration_mode, self.mix_mode = calibration_mode, mix_mode
        self.timeout, self.min_clients = timeout, min_clients
        self.dp_clip, self.dp_noise_multiplier = dp_clip, dp_noise_multiplier
        self.secagg_options = dict(secagg_options or {})
        self._explicit = set(self.secagg_options)
        self.isolation_floor = bool(isolation_floor)
        self.rounds = {"ok": 0, "failed": 0, "cancelled": 0}

    def set_score_bound(self, bound: float) -> None:
        """The largest score magnitude of the calibration round (``router.calibration["score_bound"]``, saved with
        the router, so a resumed run sets the same): secagg rounds then encode scores in
        :func:`secagg_value_range` of it instead of the transport's default 16. A client whose scores exceed the range
        is clipped, and answers it ranks apart can tie: with a colour client scoring up to 47, clipping at 16 took
        its ranking of the held-out colour questions from 91% to 53% (README, "Measured: the main job"). An explicit
        ``secagg_options["value_range"]`` wins. Plain ``secagg`` only: in ``secagg+dp`` the range is the DP clipping
        bound, and the noise grows with it, so it stays what the operator set (default 16)."""
        if self.mix_mode == "secagg" and "value_range" not in self._explicit:
            self.secagg_options["value_range"] = secagg_value_range(bound)

    def client_ids(self) -> list[str]:
        """The clients online now, in name order (not connection order: weights and the isolation floor are then
        computed in the same order on every run, so a rerun sends bit-identical weights)."""
        return sorted(self.server.online_clients())

    def cancel(self, reason: str = "abandoned by its caller") -> int:
        """Cancel the round(s) in flight on the server and wait until they have ended; returns how many."""
        return self.server.cancel_all(reason)

    def _round(self, items, mode: str, **kw):
        try:
            if mode in SECAGG_MODES:
                out = self.server.run_secagg_round(items, mode=mode, min_clients=self.min_clients,
                                                   timeout=self.timeout, **kw, **self.secagg_options)
            else:
                out = self.server.run_round(items, mode=mode, min_clients=self.min_clients, timeout=self.timeout,
                                            dp_clip=self.dp_clip, dp_noise_multiplier=self.dp_noise_multiplier, **kw)
        except RoundCancelled as e:
            self.rounds["cancelled"] += 1
            raise RoundFailed(f"{mode} scoring round {e}") from None
        if out.ok:
            self.rounds["ok"] += 1
            return out
        self.rounds["failed"] += 1
        raise RoundFailed(f"{mode} scoring round {out.round_id} failed: {out.reason}")

    def client_scores(self, items: Sequence[ScoringItem], *, purpose: str = "calibration") -> dict[str, list[list[float]]]:
        out = self._round(list(items), self.calibration_mode)
        return FederationServer.scores_by_client(out, items)

    def mixed_scores(self, items: Sequence[ScoringItem], weights: dict[str, list[float]]) -> list[list[float]]:
        items = list(items)
        online = set(self.client_ids())
        live = sorted(c for c in weights if c in online)
        if not live:
            raise RoundFailed(f"no routed client is online (routed: {sorted(weights)}, online: {sorted(online)})")
        W = {c: np.asarray(weights[c], dtype=np.float64) for c in live}
        for c, w in W.items():
            if w.shape != (len(items),):
                raise ValueError(f"weights[{c!r}] has shape {w.shape}; expected one weight per item ({len(items)})")
        sizes = [len(it.candidates) for it in items]
        if self.mix_mode == "secagg" and self.isolation_floor:  # the exact sum must not isolate a client
            from privacy.secagg.weights import floor_for_isolation

            M = floor_for_isolation(np.stack([W[c] for c in live]))
            W = {c: M[i] for i, c in enumerate(live)}
        if self.mix_mode in SECAGG_MODES:
            out = self._round(items, self.mix_mode, participants=live, weights={c: W[c].tolist() for c in live})
            total = np.asarray(out.aggregate["sum"], dtype=np.float64)
            denom = sum(W[c] for c in out.responders)
        else:
            out = self._round(items, self.mix_mode, participants=live)
            per_client = FederationServer.scores_by_client(out, items)
            total = np.zeros(sum(sizes))
            for c in out.responders:
                flat = np.concatenate([np.asarray(r, dtype=np.float64) for r in per_client[c]])
                total += np.repeat(W[c], sizes) * flat
            denom = sum(W[c] for c in out.responders)
        denom = np.where(np.asarray(denom) > 0, denom, 1.0)
        return unflatten((total / np.repeat(denom, sizes)).tolist(), items)
