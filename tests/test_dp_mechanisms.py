"""Score-release mechanisms: clipping, calibrated noise variance, lattice-valued outputs, input validation."""

import math

import numpy as np
import pytest
from scipy import stats

from privacy import dp


def test_clip_scores_clips_and_rejects_bad_input():
    assert dp.clip_scores([-3.0, 0.5, 2.0], 1.0).tolist() == [-1.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="clip C"):
        dp.clip_scores([0.0], 0.0)
    with pytest.raises(ValueError, match="non-finite values at positions \\[1\\]"):
        dp.clip_scores([0.0, float("nan")], 1.0)


def test_discrete_gaussian_has_calibrated_variance_and_mean():
    rng = np.random.default_rng(1234)
    for sigma in (0.7, 3.0, 50.0):
        z = dp.discrete_gaussian(sigma, 60_000, rng)
        assert z.dtype == np.int64
        # variance of N_Z(0, s^2) equals s^2 up to exp(-2 pi^2 s^2) terms for s >= 0.7 (within 0.5%)
        var = z.var()
        se = sigma ** 2 * math.sqrt(2 / len(z))
        assert abs(var - sigma ** 2) < 5 * se + 0.005 * sigma ** 2, (sigma, var)
        assert abs(z.mean()) < 5 * sigma / math.sqrt(len(z))


def test_discrete_gaussian_pmf_matches_exact_pmf():
    rng = np.random.default_rng(7)
    sigma = 1.5
    vectorised = dp.discrete_gaussian(sigma, 40_000, rng)                                       # numpy proposals
    per_sample = np.concatenate([dp.discrete_gaussian(sigma, 200, rng) for _ in range(100)])   # pure-Python path
    for z in (vectorised, per_sample):
        support = np.arange(-8, 9)
        w = np.exp(-support ** 2 / (2 * sigma ** 2))
        expected = w / w.sum() * len(z)
        observed = np.array([(z == k).sum() for k in support])
        assert observed.sum() == len(z)  # no mass beyond 8 sigma/1.5 in 40k draws
        keep = expected > 5
        chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        assert chi2 < stats.chi2.ppf(0.999, keep.sum() - 1)


class _Words:
    """A byte source that yields the given 64-bit words, then zeros."""

    def __init__(self, *words):
        self.buf = b"".join(int(w).to_bytes(8, "little") for w in words)

    def bytes(self, n):
        out, self.buf = self.buf[:n], self.buf[n:]
        return out + b"\0" * (n - len(out))


def test_exact_bernoulli_compares_bits_lazily():
    """Bernoulli(p/q) reads 64 bits of a uniform U and decides U < p/q; a tie on those bits (w == floor(p 2^64/q))
    defers to the next bits with the remainder, so the decision is exact, never rounded."""
    f, r = divmod(1 << 64, 3)   # p/q = 1/3: f = 0x5555...5, r = 1
    assert dp._bernoulli(dp._IntSource(_Words(f - 1)), 1, 3) is True
    assert dp._bernoulli(dp._IntSource(_Words(f + 1)), 1, 3) is False
    assert dp._bernoulli(dp._IntSource(_Words(f, f - 1)), 1, 3) is True    # tie, then U' < r/q
    assert dp._bernoulli(dp._IntSource(_Words(f, f + 1)), 1, 3) is False
    assert dp._bernoulli(dp._IntSource(_Words(2 ** 64 - 1)), 5, 5) is True   # p/q = 1: always
    assert dp._bernoulli(dp._IntSource(_Words(0)), 0, 5) is False            # p/q = 0: never
    # uniform integers below n are exactly uniform (rejection, no modulo bias)
    src = dp._IntSource(np.random.default_rng(2))
    draws = np.array([src.below(6) for _ in range(30_000)])
    counts = np.bincount(draws, minlength=6)
    assert draws.max() == 5 and stats.chisquare(counts).pvalue > 1e-4


def test_bernoulli_exp_matches_exp_minus_gamma_for_rational_gamma():
    from fractions import Fraction

    rng = np.random.default_rng(3)
    n = 20_000
    for gamma in (0, Fraction(1, 3), 1, Fraction(5, 2), Fraction(22, 7), 0.125):
        p = math.exp(-float(gamma))
        hits = dp.bernoulli_exp(gamma, n, rng)
        assert hits.dtype == bool
        assert abs(hits.mean() - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (gamma, hits.mean(), p)
    with pytest.raises(ValueError, match="gamma"):
        dp.bernoulli_exp(Fraction(-1, 2))


def test_discrete_laplace_proposal_pmf():
    rng = np.random.default_rng(11)
    src = dp._IntSource(rng)
    t, n = 3, 30_000
    for z in (np.array([dp._discrete_laplace(src, t) for _ in range(n)]), dp._discrete_laplace_vec(rng, t, n)):
        support = np.arange(-12, 13)
        w = np.exp(-np.abs(support) / t)
        expected = w / (w.sum() + 2 * np.exp(-13 / t) / (1 - np.exp(-1 / t))) * n
        observed = np.array([(z == k).sum() for k in support])
        keep = expected > 5
        chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        assert chi2 < stats.chi2.ppf(0.999, keep.sum() - 1)


def test_sampler_uses_integer_arithmetic_only(monkeypatch):
    """No floating-point log/exp (and no float uniforms) anywhere in the sampler: CKS 2020 exactly (issue #11).
    The former sampler drew its discrete-Laplace proposals with np.log of float uniforms and fails here."""
    def boom(*a, **k):
        raise AssertionError("floating-point transcendental used by the exact sampler")

    for mod, name in ((math, "exp"), (math, "log"), (math, "log1p"), (math, "expm1"),
                      (np, "exp"), (np, "log"), (np, "log1p"), (np, "expm1")):
        monkeypatch.setattr(mod, name, boom)
    monkeypatch.setattr(dp.SecureRandom, "random", boom)
    for sigma in (0.7, 3.0, 1e6, 1.5e8):
        for size in (50, 800):  # the per-sample path and the vectorised-proposal path
            z = dp.discrete_gaussian(sigma, size, dp.SecureRandom(b"i" * 32))
            assert z.dtype == np.int64 and z.shape == (size,)
    from fractions import Fraction
    assert dp.discrete_gaussian(Fraction(7, 3), 5, dp.SecureRandom(b"j" * 32)).dtype == np.int64


def test_discrete_gaussian_large_sigma_in_grid_units():
    """The product's sigmas are 1e5..1e8 grid units (gaussian_release, secagg+dp): the sample std matches."""
    rng = np.random.default_rng(5)
    for sigma, z in ((s, draw) for s in (1e5, 1.6e8) for draw in (
            dp.discrete_gaussian(s, 8000, rng),                                               # vectorised proposals
            np.concatenate([dp.discrete_gaussian(s, 400, rng) for _ in range(15)]))):      # per-sample path
        se = sigma ** 2 * math.sqrt(2 / len(z))
        assert abs(z.var() - sigma ** 2) < 5 * se
        assert abs(z.mean()) < 5 * sigma / math.sqrt(len(z))
        assert stats.kstest(z / sigma, "norm").pvalue > 1e-4


def test_discrete_gaussian_rejects_bad_sigma():
    for bad in (0, -1.0, float("nan"), float("inf"), "3"):
        with pytest.raises(ValueError, match="sigma"):
            dp.discrete_gaussian(bad, 3)


def test_gaussian_release_noise_has_calibrated_std():
    rng = np.random.default_rng(42)
    m, C, nm = 16, 1.0, 0.8
    x = np.linspace(-0.9, 0.9, m)
    samples = np.stack([dp.gaussian_release(x, clip=C, noise_multiplier=nm, rng=rng) for _ in range(3000)])
    sigma = nm * 2 * C * math.sqrt(m)
    assert dp.release_sigma(clip=C, noise_multiplier=nm, m=m) == pytest.approx(sigma)
    resid = samples - x
    assert abs(resid.std() - sigma) < 0.02 * sigma
    assert np.all(np.abs(resid.mean(axis=0)) < 5 * sigma / math.sqrt(3000))


def test_gaussian_release_is_lattice_valued_and_clipped_input():
    C = 2.0
    out = dp.gaussian_release([100.0, -100.0, 0.3], clip=C, noise_multiplier=1.0, rng=dp.SecureRandom(b"k" * 32))
    sigma = dp.release_sigma(clip=C, noise_multiplier=1.0, m=3)
    k = max(20, math.ceil(math.log2(2 ** 16 * C / sigma)))
    g = C / 2 ** k
    ints = out / g
    assert np.allclose(ints, np.rint(ints), atol=1e-6)  # output is a function of an integer only
    # out-of-range scores were clipped to +-C before noising: residual is ~N(0, sigma), not ~100
    assert abs(out[0] - C) < 6 * sigma and abs(out[1] + C) < 6 * sigma


def test_gaussian_release_refuses_zero_noise():
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp.gaussian_release([0.1], clip=1.0, noise_multiplier=0.0)


def test_secure_random_default_is_not_reproducible_and_uniform():
    a, b = dp.SecureRandom().random(1000), dp.SecureRandom().random(1000)
    assert not np.array_equal(a, b)
    assert a.min() > 0 and a.max() <= 1
    assert stats.kstest(np.concatenate([a, b]), "uniform").pvalue > 1e-4
    # seeded key is reproducible (tests only)
    assert np.array_equal(dp.SecureRandom(b"x" * 32).random(5), dp.SecureRandom(b"x" * 32).random(5))
