"""Privacy accounting: pure functions, no state, no I/O.

Three ways to turn a history of mechanisms into an (epsilon, delta) guarantee, each a valid upper bound:

* **RDP** (Renyi DP, Mironov 2017) through Opacus' ``accountants.analysis.rdp`` functions. Works for everything in
  this package: DP-SGD (Poisson-subsampled Gaussian), score releases (Gaussian, sample rate 1) and distributed
  discrete Gaussian sums (a zCDP bound, i.e. a linear RDP curve).
* **Exact Gaussian DP** (Dong, Roth & Su 2019; Balle & Wang 2018). k releases of Gaussian mechanisms with noise
  multipliers sigma_i compose *exactly* to mu-GDP with ``mu = sqrt(sum 1/sigma_i^2)`` and
  ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``. This is the tight answer for releases; RDP is
  always at least as large.
* **PRV / PLD** (Gopi, Lee & Wutschitz 2021) through Opacus' ``PRVAccountant`` for DP-SGD histories, tighter than
  RDP for subsampled Gaussians.

A "noise multiplier" is always noise standard deviation divided by L2 sensitivity.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from opacus.accountants.analysis import rdp as _rdp
from scipy import optimize, special

#: Renyi orders used for RDP composition: Opacus' defaults extended to large orders (needed for small epsilons).
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
                                          + [80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024])


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _log_phi(x):
    return special.log_ndtr(x)


def gdp_mu(noise_multipliers: Iterable[float], counts: Iterable[int] | None = None) -> float:
    """mu of the mu-GDP guarantee of Gaussian releases (sample rate 1) with the given noise multipliers.

    ``counts[i]`` releases with multiplier ``noise_multipliers[i]``; a multiplier of 0 gives ``inf``.
    """
    sig = list(noise_multipliers)
    cnt = [1] * len(sig) if counts is None else list(counts)
    total = 0.0
    for s, c in zip(sig, cnt):
        if c <= 0:
            continue
        if s <= 0:
            return math.inf
        total += c / (s * s)
    return math.sqrt(total)


def gdp_delta(epsilon: float, mu: float) -> float:
    """Exact delta(eps) of mu-GDP: ``Phi(-eps/mu + mu/2) - e^eps * Phi(-eps/mu - mu/2)`` (computed in log space)."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = _log_phi(-epsilon / mu + mu / 2)
    b = epsilon + _log_phi(-epsilon / mu - mu / 2)
    if b >= a:
        return 0.0
    return float(math.exp(a) * -math.expm1(b - a))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest eps with ``gdp_delta(eps, mu) <= delta`` (exact, by root finding)."""
    _check_delta(delta)
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def gdp_mu_for(epsilon: float, delta: float) -> float:
    """Largest mu such that mu-GDP implies (epsilon, delta)-DP."""
    _check_delta(delta)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon!r}")
    lo, hi = 1e-6, 1.0
    while gdp_delta(epsilon, hi) < delta:
        hi *= 2
    return float(optimize.brentq(lambda m: gdp_delta(epsilon, m) - delta, lo, hi, xtol=1e-14, rtol=1e-12))


def noise_multiplier_for_epsilon(epsilon: float, delta: float, releases: int = 1) -> float:
    """Noise multiplier sigma so that ``releases`` Gaussian releases are exactly (epsilon, delta)-DP.

    Uses exact Gaussian-DP composition (tight): ``sigma = sqrt(releases) / mu(epsilon, delta)``.
    Example: ``noise_multiplier_for_epsilon(1.0, 1e-5) ~= 3.73`` (Balle & Wang's analytic Gaussian mechanism;
    the classical ``sqrt(2 ln(1.25/delta))/epsilon`` bound would give 4.84).
    """
    if int(releases) != releases or releases < 1:
        raise ValueError(f"releases must be a positive integer, got {releases!r}")
    return math.sqrt(releases) / gdp_mu_for(epsilon, delta)


def rdp_curve(noise_multiplier: float, sample_rate: float, steps: int,
              orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of ``steps`` Poisson-subsampled Gaussians (Opacus' ``compute_rdp``); sample_rate 1 is the plain Gaussian."""
    if steps <= 0:
        return np.zeros(len(orders))
    if noise_multiplier <= 0:
        return np.full(len(orders), np.inf)
    return np.asarray(_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=int(steps),
                                       orders=list(orders)), dtype=float)


def zcdp_curve(rho: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP curve ``alpha * rho`` of a rho-zCDP mechanism (e.g. the distributed discrete Gaussian bound)."""
    return np.asarray(orders, dtype=float) * rho


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """(epsilon, best order) from a composed RDP curve, via Opacus' ``get_privacy_spent`` (Balle et al. 2020)."""
    _check_delta(delta)
    rdp = np.asarray(rdp, dtype=float)
    if np.all(rdp == 0):
        return 0.0, float(orders[0])
    if not np.any(np.isfinite(rdp)):
        return math.inf, float("nan")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, order = _rdp.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps), float(order)


def rdp_epsilon(history: Iterable[tuple[float, float, int]], delta: float,
                orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """epsilon of a history of ``(noise_multiplier, sample_rate, steps)`` entries composed in RDP."""
    total = np.zeros(len(orders))
    for nm, q, steps in history:
        total = total + rdp_curve(nm, q, steps, orders)
    return rdp_to_epsilon(total, delta, orders)[0]


def prv_epsilon(history: Iterable[tuple[float, float, int]], delta: float, eps_error: float = 0.01) -> float:
    """epsilon of a DP-SGD history by the PRV accountant (numerical PLD composition, Opacus' ``PRVAccountant``).

    The result is an upper bound up to ``eps_error`` (Opacus' guarantee). Falls back to RDP when the PRV
    computation cannot be done (e.g. extreme parameters)."""
    _check_delta(delta)
    hist = [(float(nm), float(q), int(s)) for nm, q, s in history if s > 0]
    if not hist:
        return 0.0
    if any(nm <= 0 for nm, _, _ in hist):
        return math.inf
    try:
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = list(hist)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(acc.get_epsilon(delta=delta, eps_error=eps_error)) + eps_error
    except Exception:  # pragma: no cover - numerical corner cases of the PRV domain
        return rdp_epsilon(hist, delta)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed discrete Gaussian (Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism", Thm. 1)
# ---------------------------------------------------------------------------------------------------------------------

def ddg_tau(sigma: float, n: int) -> float:
    """tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k/(k+1)): distance of a sum of n discrete Gaussians N_Z(0,
    sigma^2) from the discrete Gaussian N_Z(0, n sigma^2) (Kairouz et al. 2021, Prop. 14)."""
    if n <= 1:
        return 0.0
    k = np.arange(1, n)
    return float(10.0 * np.sum(np.exp(-2 * math.pi ** 2 * sigma ** 2 * k / (k + 1))))


def ddg_rho(*, sigma: float, n: int, l2_sensitivity: float, l1_sensitivity: float) -> float:
    """zCDP rho of a sum of ``n`` independent N_Z(0, sigma^2) vectors (sigma in integer units) with the given
    integer-lattice sensitivities: rho = eps^2/2 with
    ``eps = min(sqrt(D2^2/(n s^2) + tau D1/2), D2/(sqrt(n) s) + tau sqrt(D1))`` (Kairouz et al. 2021, Thm. 1).
    """
    if n < 1 or sigma <= 0:
        return math.inf
    tau = ddg_tau(sigma, n)
    ns2 = n * sigma * sigma
    e1 = math.sqrt(l2_sensitivity ** 2 / ns2 + 0.5 * tau * l1_sensitivity)
    e2 = l2_sensitivity / math.sqrt(ns2) + tau * math.sqrt(l1_sensitivity)
    eps = min(e1, e2)
    return 0.5 * eps * eps


def zcdp_epsilon(rho: float, delta: float) -> float:
    """epsilon of rho-zCDP at delta via the RDP conversion (same orders as everything else)."""
    return rdp_to_epsilon(zcdp_curve(rho), delta)[0]
