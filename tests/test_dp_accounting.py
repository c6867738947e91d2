"""Accounting: exact Gaussian DP vs RDP vs PRV, published reference values, distributed discrete Gaussian bound."""

import math

import pytest

from privacy import accounting as acc
from privacy.dp import noise_multiplier_for_epsilon


def test_analytic_gaussian_reference_value():
    # Balle & Wang 2018 (analytic Gaussian mechanism): eps=1, delta=1e-5, sensitivity 1 -> sigma ~= 3.73;
    # the classical Dwork-Roth calibration sqrt(2 ln(1.25/delta))/eps = 4.84 is looser.
    s = noise_multiplier_for_epsilon(1.0, 1e-5)
    assert s == pytest.approx(3.7306, abs=2e-3)
    assert s < math.sqrt(2 * math.log(1.25 / 1e-5))


def test_gdp_closed_forms():
    # mu-GDP at eps=0: delta = 2 Phi(mu/2) - 1 (Dong, Roth & Su 2019)
    assert acc.gdp_delta(0.0, 1.0) == pytest.approx(0.382925, abs=1e-6)
    # round trip
    eps = acc.gdp_epsilon(0.5, 1e-5)
    assert acc.gdp_delta(eps, 0.5) == pytest.approx(1e-5, rel=1e-6)
    # k releases at sigma compose to mu = sqrt(k)/sigma
    assert acc.gdp_mu([2.0] * 9) == pytest.approx(1.5)
    assert noise_multiplier_for_epsilon(1.0, 1e-5, releases=4) == pytest.approx(2 * noise_multiplier_for_epsilon(
        1.0, 1e-5, releases=1), rel=1e-9)


@pytest.mark.parametrize("sigma,k", [(1.0, 1), (2.0, 10), (5.0, 100), (0.8, 3)])
def test_exact_gdp_tighter_than_rdp_and_matches_prv(sigma, k):
    delta = 1e-5
    exact = acc.gdp_epsilon(acc.gdp_mu([sigma], [k]), delta)
    rdp = acc.rdp_epsilon([(sigma, 1.0, k)], delta)
    prv = acc.prv_epsilon([(sigma, 1.0, k)], delta)
    assert exact <= rdp
    assert rdp < 1.6 * exact  # RDP is loose but not absurd
    assert abs(prv - exact) < 0.05 + 0.01 * exact  # numerical PLD agrees with the exact formula


def test_rdp_of_single_gaussian_is_closed_form():
    # RDP of the Gaussian mechanism is alpha/(2 sigma^2) (Mironov 2017, Prop. 7)
    curve = acc.rdp_curve(2.0, 1.0, 3)
    for a, r in zip(acc.DEFAULT_ORDERS, curve):
        assert r == pytest.approx(3 * a / 8)


def test_dpsgd_prv_not_looser_than_rdp():
    hist = [(1.1, 256 / 60000, 60 * 60000 // 256)]  # Abadi et al. MNIST setting
    rdp = acc.rdp_epsilon(hist, 1e-5)
    prv = acc.prv_epsilon(hist, 1e-5)
    assert 1.5 < prv <= rdp < 3.5


def test_ddg_bound_reduces_to_gaussian_for_large_sigma():
    # For sigma >> 1, tau is negligible and rho = D2^2 / (2 n sigma^2): same as a continuous Gaussian of std
    # sqrt(n) sigma (Kairouz, Liu & Steinke 2021, Thm. 1)
    n, sigma, d2 = 20, 40.0, 100.0
    rho = acc.ddg_rho(sigma=sigma, n=n, l2_sensitivity=d2, l1_sensitivity=d2 * 8)
    assert rho == pytest.approx(d2 ** 2 / (2 * n * sigma ** 2), rel=1e-9)
    # small sigma: tau matters and the bound is strictly worse
    rho_small = acc.ddg_rho(sigma=0.3, n=n, l2_sensitivity=1.0, l1_sensitivity=1.0)
    assert rho_small > 1 / (2 * n * 0.09)
    # fewer survivors -> larger epsilon
    assert acc.zcdp_epsilon(acc.ddg_rho(sigma=sigma, n=10, l2_sensitivity=d2, l1_sensitivity=d2), 1e-5) > \
        acc.zcdp_epsilon(rho, 1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="delta"):
        acc.gdp_epsilon(1.0, 0.0)
    with pytest.raises(ValueError, match="releases"):
        noise_multiplier_for_epsilon(1.0, 1e-5, releases=0)
