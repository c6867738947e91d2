"""The SecAgg+ communication graph: a k-regular Harary-style circulant graph over a pseudorandom ordering of the
clients (Bell et al. 2020 use a random k-regular graph with k = O(log n)). Everyone derives it from the public
round seed, so the server cannot give clients different graphs without failing the signed config check."""

from __future__ import annotations

import hashlib
import math

import numpy as np


def default_degree(n: int) -> int:
    """Even degree ~ 2 log2(n), at least 4, at most n-1 (complete graph for small n)."""
    if n <= 6:
        return n - 1
    k = 2 * math.ceil(math.log2(n))
    k += k % 2
    return min(n - 1, k)


def neighbours(client_ids: list[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Neighbour sets (excluding self) of a ``degree``-regular graph; complete when ``degree >= n - 1``."""
    n = len(client_ids)
    ids = sorted(client_ids)
    if degree >= n - 1:
        return {c: frozenset(x for x in ids if x != c) for c in ids}
    if degree % 2:
        raise ValueError(f"degree must be even for a sparse graph (got {degree} with {n} clients)")
    perm_seed = int.from_bytes(hashlib.sha256(b"mor-secagg-graph\x00" + seed).digest()[:8], "big")
    order = [ids[i] for i in np.random.default_rng(perm_seed).permutation(n)]
    pos = {c: i for i, c in enumerate(order)}
    h = degree // 2
    return {c: frozenset(order[(pos[c] + d) % n] for d in range(-h, h + 1) if d != 0) for c in ids}
