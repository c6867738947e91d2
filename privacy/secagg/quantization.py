"""Fixed-point encoding with an explicit range, and the modulus check that guarantees sums never wrap."""

from __future__ import annotations

import math

import numpy as np

from .errors import InputOutOfRange, ParameterError

#: tail bound (in standard deviations) for the summed integer DP noise when sizing the modulus
NOISE_TAIL_SIGMAS = 14.0


def word_dtype(mod_bits: int):
    if mod_bits == 32:
        return np.uint32
    if mod_bits == 64:
        return np.uint64
    raise ParameterError(f"mod_bits must be 32 or 64, got {mod_bits}")


def max_abs_sum(n: int, value_range: float, weight_max: float, frac_bits: int, noise_sigma_int: float = 0.0) -> float:
    """Largest |sum| (integer units) n clients can produce: rounding adds <= 1/2 per client."""
    per = value_range * weight_max * 2.0 ** frac_bits + 0.5
    return n * per + NOISE_TAIL_SIGMAS * noise_sigma_int * math.sqrt(n)


def check_modulus(n: int, value_range: float, weight_max: float, frac_bits: int, mod_bits: int | None,
                  noise_sigma_int: float = 0.0, count_max: int = 0) -> int:
    """The modulus bits to use (given or smallest of 32/64) so that sums of n encoded inputs never wrap (nor the
    masked clipped-score count, at most ``count_max`` per client)."""
    need = max(max_abs_sum(n, value_range, weight_max, frac_bits, noise_sigma_int), float(n) * count_max)
    options = [mod_bits] if mod_bits else [32, 64]
    for b in options:
        word_dtype(b)
        if need < 2.0 ** (b - 1):
            return b
    raise ParameterError(f"modulus 2^{options[-1]} is too small: {n} clients x range {value_range} x weight "
                         f"{weight_max} at 2^{frac_bits} fixed point (+ DP noise tail) can reach {need:.3g} "
                         f">= 2^{options[-1] - 1}; lower frac_bits or value_range, or use mod_bits=64")


def encode(x: np.ndarray, *, value_range: float, frac_bits: int, policy: str = "error",
           weight=1.0) -> tuple[np.ndarray, int]:
    """int64 fixed-point ``round(weight * x * 2^frac_bits)`` (range checked on ``x``) and the number of values outside [-range, range].

    policy ``error``: any out-of-range value raises :class:`InputOutOfRange`; ``clip``: they are clipped and counted
    (the count is reported, never silently saturated)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise InputOutOfRange("input contains non-finite values")
    bad = int(np.count_nonzero(np.abs(x) > value_range))
    if bad and policy == "error":
        raise InputOutOfRange(f"{bad} input values lie outside [-{value_range}, {value_range}] (e.g. "
                              f"{x[np.abs(x) > value_range][0]:.4g}); clip them first or use out_of_range='clip'")
    if policy not in ("error", "clip"):
        raise ParameterError(f"out_of_range policy must be 'error' or 'clip', got {policy!r}")
    x = np.clip(x, -value_range, value_range) * np.asarray(weight, dtype=np.float64)
    return np.rint(x * 2.0 ** frac_bits).astype(np.int64), bad


def to_ring(q: np.ndarray, mod_bits: int) -> np.ndarray:
    """Signed integers -> words mod 2^mod_bits (two's complement)."""
    return q.astype(np.int64).view(np.uint64).astype(word_dtype(mod_bits))


def from_ring(w: np.ndarray, mod_bits: int) -> np.ndarray:
    """Words mod 2^mod_bits -> signed int64 (centred representative)."""
    if mod_bits == 32:
        return w.astype(np.uint32).view(np.int32).astype(np.int64)
    return w.astype(np.uint64).view(np.int64)


def decode(q: np.ndarray, frac_bits: int) -> np.ndarray:
    return q.astype(np.float64) / 2.0 ** frac_bits
