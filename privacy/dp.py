"""Score-release mechanisms: clipping, the Gaussian mechanism with sound noise, integer (discrete Gaussian) noise.

How the noise is made sound
---------------------------
Textbook floating-point Gaussian noise leaks the input through the low-order bits of the output (Mironov 2012,
"On significance of the least significant bits"), and ``numpy``'s default generators are not cryptographic. Here:

1. **Randomness** comes from :class:`SecureRandom`: a ChaCha20 keystream (``cryptography``) keyed with 32 bytes from
   ``os.urandom``, turned into uniforms on (0, 1] with 53 random bits each.
2. **Noise is exactly lattice-valued.** Clipped scores are rounded to a grid ``g = C / 2^k`` (``k >= 20``, chosen so
   that ``sigma / g >= 2^16``) and the noise is a *discrete Gaussian* ``g * N_Z(0, (sigma/g)^2)`` drawn with the
   exact rejection sampler of Canonne, Kamath & Steinke (2020) (discrete-Laplace proposals, Bernoulli(exp) accept).
   The released value is a function of an integer only, so no low-order bits of the input survive.
3. **Same guarantee as the continuous Gaussian.** The multivariate discrete Gaussian with variance sigma^2 satisfies
   the same ``Delta^2/(2 sigma^2)``-zCDP / RDP curve as the continuous one for any lattice-valued inputs (CKS 2020,
   Thm. 14), and since grid points stay inside [-C, C] the L2 sensitivity stays ``2 C sqrt(m)``. With
   ``sigma/g >= 2^16`` its exact (eps, delta) profile equals the continuous Gaussian's up to terms of order
   ``exp(-2 pi^2 (sigma/g)^2)``, far below floating-point resolution, so the ledger's exact Gaussian-DP numbers apply.

The acceptance step evaluates ``exp`` in float64 (relative error ~1e-16 on a probability), the only approximation.
Tests may inject a seeded ``numpy.random.Generator`` as ``rng``; production code should leave ``rng=None``.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .accounting import noise_multiplier_for_epsilon  # noqa: F401  (public re-export)

__all__ = ["SecureRandom", "clip_scores", "discrete_gaussian", "gaussian_release", "release_sigma",
           "noise_multiplier_for_epsilon"]


class SecureRandom:
    """A cryptographically secure source of uniforms: ChaCha20 keystream keyed from ``os.urandom(32)``.

    ``random(size)`` returns float64 uniforms on (0, 1] with 53 random bits each (same call shape as numpy's).
    A fixed ``key`` may be given for reproducible tests only.
    """

    def __init__(self, key: bytes | None = None):
        key = os.urandom(32) if key is None else bytes(key)
        if len(key) != 32:
            raise ValueError("SecureRandom key must be 32 bytes")
        self._enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._enc.update(b"\x00" * n)

    def random(self, size: int) -> np.ndarray:
        words = np.frombuffer(self.bytes(8 * int(size)), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * (2.0 ** -53)


def _uniform_open0(rng, size: int) -> np.ndarray:
    """Uniforms on (0, 1] from a SecureRandom or a numpy Generator."""
    if isinstance(rng, SecureRandom):
        return rng.random(size)
    return 1.0 - rng.random(size)  # numpy: [0, 1) -> (0, 1]


def clip_scores(scores: Sequence[float] | np.ndarray, C: float) -> np.ndarray:
    """Clip each score to [-C, C]. Raises ``ValueError`` for a non-positive C or non-finite scores."""
    if not (isinstance(C, (int, float, np.floating)) and C > 0 and math.isfinite(C)):
        raise ValueError(f"clip C must be a positive finite number, got {C!r}")
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        bad = np.flatnonzero(~np.isfinite(x))[:5].tolist()
        raise ValueError(f"scores must be finite; non-finite values at positions {bad}")
    return np.clip(x, -C, C)


def discrete_gaussian(sigma: float, size: int, rng=None) -> np.ndarray:
    """``size`` i.i.d. samples of the discrete Gaussian N_Z(0, sigma^2) (int64), exact rejection sampler of
    Canonne, Kamath & Steinke (2020, Alg. 3), vectorised. ``rng``: SecureRandom (default) or numpy Generator."""
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    size = int(size)
    rng = SecureRandom() if rng is None else rng
    t = math.floor(sigma) + 1
    s2 = sigma * sigma
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        n = max(16, int(1.6 * (size - filled)) + 8)
        u = _uniform_open0(rng, 3 * n)
        g1 = np.floor(-t * np.log(u[:n]))
        g2 = np.floor(-t * np.log(u[n:2 * n]))
        y = g1 - g2  # discrete Laplace, P(y) ~ exp(-|y|/t)
        accept = u[2 * n:] <= np.exp(-((np.abs(y) - s2 / t) ** 2) / (2 * s2))
        acc = y[accept].astype(np.int64)
        k = min(len(acc), size - filled)
        out[filled:filled + k] = acc[:k]
        filled += k
    return out


def release_sigma(*, clip: float, noise_multiplier: float, m: int) -> float:
    """Noise standard deviation per score of :func:`gaussian_release`: ``noise_multiplier * 2 C sqrt(m)``."""
    return float(noise_multiplier) * 2.0 * float(clip) * math.sqrt(int(m))


def gaussian_release(scores, *, clip: float, noise_multiplier: float, rng=None, grid_bits: int = 20) -> np.ndarray:
    """Client-level Gaussian release of ``m`` scores: clip to [-C, C], add noise of std ``noise_multiplier * 2C
    sqrt(m)`` (L2 sensitivity of the whole vector against swapping the client's model).

    The result is ``(round(x/g) + N_Z(0, (sigma/g)^2)) * g`` on the grid ``g = C / 2^k`` (see module docstring).
    ``rng``: None (CSPRNG, production) or a seeded ``numpy.random.Generator`` / :class:`SecureRandom` for tests.
    """
    x = clip_scores(scores, clip)
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier!r} "
                         "(use mode 'plain' for unnoised scores)")
    m = x.size
    if m == 0:
        return x
    sigma = release_sigma(clip=clip, noise_multiplier=noise_multiplier, m=m)
    k = max(int(grid_bits), math.ceil(math.log2((2 ** 16) * clip / sigma)))
    g = clip / (2.0 ** k)
    q = np.clip(np.rint(x / g), -(2 ** k), 2 ** k).astype(np.int64)
    z = discrete_gaussian(sigma / g, m, rng)
    return (q + z).astype(np.float64) * g
