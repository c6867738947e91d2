"""Shamir secret sharing of raw 32-byte secrets over the prime field GF(P), P = 2^256 + 297 (the smallest prime
above 2^256, so every 32-byte string is a field element with no bias and no reduction)."""

from __future__ import annotations

import secrets
from typing import Sequence

from .errors import SecAggAbort

P = (1 << 256) + 297
SHARE_BYTES = 33


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[int]:
    """Shares ``f(x)`` for each ``x`` in ``xs`` of a random degree ``threshold-1`` polynomial with ``f(0) = secret``."""
    if len(secret) != 32:
        raise ValueError("Shamir secrets are raw 32-byte strings")
    if not (1 <= threshold <= len(xs)):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(threshold - 1)]
    out = []
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % P
        out.append(acc)
    return out


def combine(points: Sequence[tuple[int, int]], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``(x, y)`` (Lagrange interpolation at 0)."""
    pts = list(dict(points).items())[:threshold]
    if len(pts) < threshold:
        raise SecAggAbort(f"only {len(pts)} shares, {threshold} needed to reconstruct")
    secret = 0
    xs = [x for x, _ in pts]
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % P
                den = den * (xi - xj) % P
        secret = (secret + yi * num * pow(den, -1, P)) % P
    if secret >> 256:
        raise SecAggAbort("reconstructed value is not a 32-byte secret (inconsistent shares)")
    return secret.to_bytes(32, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(b: bytes) -> int:
    if len(b) != SHARE_BYTES:
        raise ValueError("bad share length")
    y = int.from_bytes(b, "big")
    if y >= P:
        raise ValueError("share is not a field element")
    return y
