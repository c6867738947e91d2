"""Distributed DP for ``secagg+dp``: per-client discrete-Gaussian noise calibrated to the minimum survivors.

One client's whole contribution to the weighted sum moves it by at most ``w_cap * 2C * sqrt(m)`` in L2 (plus one
integer unit of rounding per coordinate), so the routing-weight cap bounds the sensitivity. Each client adds
``N_Z(0, sigma_int^2)`` per coordinate (integer units of ``2^-frac_bits``); with at least ``min_survivors`` honest
survivors the sum carries ``N_Z`` noise of total variance ``>= min_survivors * sigma_int^2``, accounted with the
distributed discrete Gaussian bound of Kairouz, Liu & Steinke (2021, Thm. 1) via :func:`privacy.accounting.ddg_rho`.
Fewer expected survivors means more noise per client for the same target, or more epsilon for the same noise.
"""

from __future__ import annotations

import math


def sensitivities(*, value_range: float, weight_cap: float, frac_bits: int, m: int) -> tuple[float, float]:
    """(L2, L1) sensitivity in integer units of one client's encoded contribution (swap of its whole model)."""
    per = 2.0 * value_range * weight_cap * 2.0 ** frac_bits + 1.0
    return per * math.sqrt(m), per * m


def calibrate_sigma(noise_multiplier: float, *, value_range: float, weight_cap: float, frac_bits: int, m: int,
                    min_survivors: int) -> float:
    """Per-client integer noise std so that ``min_survivors`` clients' noise sums to ``noise_multiplier * L2``."""
    if not (noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier!r}")
    if min_survivors < 1:
        raise ValueError(f"min_survivors must be >= 1, got {min_survivors!r}")
    d2, _ = sensitivities(value_range=value_range, weight_cap=weight_cap, frac_bits=frac_bits, m=m)
    return noise_multiplier * d2 / math.sqrt(min_survivors)


def rho(sigma_int: float, *, value_range: float, weight_cap: float, frac_bits: int, m: int, survivors: int) -> float:
    """zCDP rho of one round's sum with ``survivors`` noisy clients (Kairouz et al. 2021 bound)."""
    from .. import accounting  # lazy: the accounting stack imports opacus/torch; the server never needs it here

    d2, d1 = sensitivities(value_range=value_range, weight_cap=weight_cap, frac_bits=frac_bits, m=m)
    return accounting.ddg_rho(sigma=sigma_int, n=survivors, l2_sensitivity=d2, l1_sensitivity=d1)
