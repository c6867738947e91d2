"""Routing weights that honest clients accept in plain ``secagg`` (server side, pure numpy).

A client refuses an item on which fewer than ``min_contributors`` clients (itself included) contribute
effectively: a peer counts only with a weight of at least ``min_weight_fraction`` of the client's own weight
(``SecAggClient._check_isolation``). A sharp router (one client at 0.95, the others at 0.02) is refused, rightly:
the exact sum is then ~ that client's score. :func:`floor_for_isolation` mixes each such item's weights with the
uniform distribution by the smallest amount that satisfies the rule for the top-weighted client (and hence for all
others), so an honest server's round is not refused; items that already satisfy it are left unchanged.
"""

from __future__ import annotations

import numpy as np

#: a hair above the clients' default ``min_weight_fraction`` (0.1), so float rounding never makes a client refuse
DEFAULT_FRACTION = 0.1 + 1e-3


def floor_for_isolation(weights, *, min_contributors: int = 2, min_fraction: float = DEFAULT_FRACTION) -> np.ndarray:
    """weights: (K clients, n items), each column a mixture (non-negative). Returns weights of the same shape and
    column sums where, per item, the ``min_contributors``-th largest weight is >= ``min_fraction`` x the largest
    (w' = (1 - lam) w + lam * sum(w)/K, smallest lam per item). K < min_contributors: returned unchanged."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be (clients, items), got shape {w.shape}")
    k = w.shape[0]
    if k < min_contributors or min_contributors < 2:
        return w.copy()
    srt = np.sort(w, axis=0)
    top, kth = srt[-1], srt[-min_contributors]
    col = w.sum(axis=0)
    u = col / k
    gap = min_fraction * top - kth                  # > 0: the item isolates its top client
    # (1-lam)*kth + lam*u >= f*((1-lam)*top + lam*u)  <=>  lam >= gap / (gap + (1-f)*u)
    lam = np.where(gap > 0, gap / np.maximum(gap + (1.0 - min_fraction) * u, 1e-300), 0.0)
    lam = np.clip(lam, 0.0, 1.0)
    return (1.0 - lam) * w + lam * u
