"""Routing weights that honest clients accept in plain ``secagg`` (server side, pure numpy).

A client refuses an item on which fewer than ``min_contributors`` clients (itself included) contribute
effectively: a peer counts only with a weight of at least ``min_weight_fraction`` of the client's own weight
(``SecAggClient._check_isolation``). A sharp router (one client at 0.95, the others at 0.02) is refused, rightly:
the exact sum is then ~ that client's score. :func:`floor_for_isolation` moves, on each such item, the smallest
amount of weight from the top-weighted client to its runner-up(s) that satisfies the rule for the top client (and
hence for all others), so an honest server's round is not refused; items that already satisfy it are left unchanged.
Only the runner-ups gain: a client the router shut out (one ranking answers backwards gets ~0) keeps its ~0, where
mixing in the uniform distribution, as this floor did before, handed every client 0.075 of a sharp 4-client item.
"""

from __future__ import annotations

import numpy as np

#: a hair above the clients' default ``min_weight_fraction`` (0.1), so float rounding never makes a client refuse
DEFAULT_FRACTION = 0.1 + 1e-3


def floor_for_isolation(weights, *, min_contributors: int = 2, min_fraction: float = DEFAULT_FRACTION) -> np.ndarray:
    """weights: (K clients, n items), each column a mixture (non-negative). Returns weights of the same shape and
    column sums where, per item, the ``min_contributors``-th largest weight is >= ``min_fraction`` x the largest: the
    top client gives its runner-ups (the next ``min_contributors - 1`` largest) just what lifts them to
    ``min_fraction`` x its new weight; the other clients are untouched. An item where that cannot hold (the top
    would fall below a runner-up, possible only with ``min_contributors`` > 2) falls back to mixing with the
    uniform distribution by the smallest amount (w' = (1 - lam) w + lam * sum(w)/K). K < min_contributors: returned
    unchanged."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be (clients, items), got shape {w.shape}")
    k = w.shape[0]
    out = w.copy()
    if k < min_contributors or min_contributors < 2:
        return out
    f = float(min_fraction)
    for j in range(w.shape[1]):
        col = w[:, j]
        order = np.argsort(-col, kind="stable")
        top, runners = order[0], order[1:min_contributors]
        if col[runners[-1]] >= f * col[top]:
            continue  # already acceptable
        need = [r for r in runners if col[r] < f * col[top]]
        while True:  # T' (1 + |need| f) = T + sum(need's weights); a runner already above f T' needs nothing
            t_new = (col[top] + col[need].sum()) / (1.0 + len(need) * f)
            still = [r for r in runners if col[r] < f * t_new]
            if still == need:
                break
            need = still
        new = col.copy()
        new[top], new[need] = t_new, f * t_new
        if new[top] >= new.max() and np.sort(new)[-min_contributors] >= f * new[top] * (1 - 1e-12):
            out[:, j] = new
        else:
            out[:, j] = _uniform_floor(col, min_contributors, f)
    return out


def _uniform_floor(col: np.ndarray, min_contributors: int, min_fraction: float) -> np.ndarray:
    """One item's weights mixed with the uniform distribution by the smallest lam that satisfies the rule."""
    srt = np.sort(col)
    top, kth = srt[-1], srt[-min_contributors]
    u = col.sum() / col.size
    gap = min_fraction * top - kth
    # (1-lam)*kth + lam*u >= f*((1-lam)*top + lam*u)  <=>  lam >= gap / (gap + (1-f)*u)
    lam = float(np.clip(gap / max(gap + (1.0 - min_fraction) * u, 1e-300), 0.0, 1.0)) if gap > 0 else 0.0
    return (1.0 - lam) * col + lam * u
