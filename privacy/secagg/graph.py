"""The SecAgg+ communication graph and the threshold that the corruption model implies.

Graph: a k-regular Harary-style circulant graph over a pseudorandom ordering of the clients (Bell et al. 2020 use a
random k-regular graph with k = O(log n)). Its seed is not chosen by the server: every client signs a commitment to a
fresh 32-byte nonce into its key advertisement (stage ``setup``), sees every advertisement before revealing its
nonce (stage ``reveal``), and :func:`derive_seed` hashes the signed round config with every revealed nonce, which
each client checks against the signed commitments (stage ``share_keys``). Nobody can pick a nonce after seeing
the others' (commit-reveal); what remains is withholding: the server (or a colluder) can drop a client between
commitment and reveal, choosing among at most 2^(dropouts) graphs.

Threshold: client j's Shamir shares are held by its k neighbours and by j itself (k+1 holders). An actively
malicious server that shows j's survivor set to one group of holders (they return shares of j's self-mask seed)
and a set without j to another group (they return shares of j's pairwise-mask key) needs both groups to reach t.
Honest holders are in one group only; a colluding holder is in both. With c colluders among j's holders, both
groups reach t iff 2t <= k + 1 + c. So the round is safe against c colluders iff ``2t > k + 1 + c``
(:func:`threshold_for` returns the smallest such t), and stays live while at most ``k + 1 - t`` of any client's
holders drop out.
"""

from __future__ import annotations

import hashlib
import math


def default_degree(n: int) -> int:
    """Even degree ~ 2 log2(n), at least 4, at most n-1 (complete graph for small n)."""
    if n <= 6:
        return n - 1
    k = 2 * math.ceil(math.log2(n))
    k += k % 2
    return min(n - 1, k)


def default_colluders(degree: int) -> int:
    """Documented default for the tolerated colluders per neighbourhood: max(1, floor((k+1)/6))."""
    return max(1, (int(degree) + 1) // 6)


def threshold_for(degree: int, colluders: int) -> int:
    """Smallest Shamir threshold t with 2t > k + 1 + c (no two inconsistent survivor views both reach t)."""
    return (int(degree) + 1 + int(colluders)) // 2 + 1


def threshold_ok(degree: int, colluders: int, threshold: int) -> bool:
    """Whether t resists c colluders among k+1 share holders (2t > k+1+c) and can ever be reached (t <= k+1)."""
    return 2 * threshold > degree + 1 + colluders and threshold <= degree + 1


def commit_nonce(round_id: str, client_id: str, nonce: bytes) -> bytes:
    """SHA-256 commitment to a client's graph nonce (bound to the round and the client)."""
    return hashlib.sha256(b"|".join([b"mor-secagg/nonce", round_id.encode(), client_id.encode(), bytes(nonce)])).digest()


def derive_seed(config_digest: bytes, nonces: dict) -> bytes:
    """Graph seed = SHA-256(tag | config digest | (client id, nonce) for every advertised client, sorted by id)."""
    h = hashlib.sha256(b"mor-secagg-graph-seed\x00" + config_digest)
    for cid in sorted(nonces):
        b = cid.encode()
        h.update(len(b).to_bytes(2, "big") + b + bytes(nonces[cid]))
    return h.digest()


def neighbours(client_ids: list[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Neighbour sets (excluding self) of a ``degree``-regular graph; complete when ``degree >= n - 1``."""
    n = len(client_ids)
    ids = sorted(client_ids)
    if degree >= n - 1:
        return {c: frozenset(x for x in ids if x != c) for c in ids}
    if degree % 2:
        raise ValueError(f"degree must be even for a sparse graph (got {degree} with {n} clients)")
    order = _shuffle(ids, seed)
    pos = {c: i for i, c in enumerate(order)}
    h = degree // 2
    return {c: frozenset(order[(pos[c] + d) % n] for d in range(-h, h + 1) if d != 0) for c in ids}


def _shuffle(ids: list[str], seed: bytes) -> list[str]:
    """Portable Fisher-Yates shuffle (docs/protocol.md, SecAgg+ graph): for i = n-1 .. 1, j uniform in [0, i] from
    big-endian 64-bit words of SHA-256("mor-secagg-graph-order\\0" | seed | u64 counter), rejecting words
    >= 2^64 - (2^64 mod (i+1)) (no modulo bias); no language-specific RNG, so any client can reproduce the graph."""
    def words():
        ctr = 0
        while True:
            block = hashlib.sha256(b"mor-secagg-graph-order\x00" + seed + ctr.to_bytes(8, "big")).digest()
            for k in range(0, 32, 8):
                yield int.from_bytes(block[k:k + 8], "big")
            ctr += 1

    out, w = list(ids), words()
    for i in range(len(out) - 1, 0, -1):
        limit = (1 << 64) - ((1 << 64) % (i + 1))
        x = next(w)
        while x >= limit:
            x = next(w)
        j = x % (i + 1)
        out[i], out[j] = out[j], out[i]
    return out

