"""Aggregation rules of the parameter-sharing baselines against hand-computed tensors: FLORA's fedit / stack /
ffa and Fed-CMP's canonical reliability-aware aggregation with orthogonality-preserved momentum."""

import numpy as np
import pytest

from mor_server.baselines.aggregation import (AggregationError, CanonicalAggregator, CanonicalConfig, fedit, ffa,
                                              lora_pairs, stack)

A, B = "layer.o_proj.lora_A.weight", "layer.o_proj.lora_B.weight"


def _client(a, b):
    return {A: np.array(a, float), B: np.array(b, float)}


C1 = _client([[1, 0]], [[1], [0]])      # r = 1, d_in = d_out = 2: B1 A1 = [[1, 0], [0, 0]]
C2 = _client([[0, 1]], [[0], [1]])      # B2 A2 = [[0, 0], [0, 1]]


def test_fedit_averages_a_and_b_separately_which_is_not_the_average_product():
    out = fedit([C1, C2], [1, 3])
    np.testing.assert_allclose(out[A], [[0.25, 0.75]])
    np.testing.assert_allclose(out[B], [[0.25], [0.75]])
    # B'A' = [[.0625, .1875], [.1875, .5625]], while sum p_k B_k A_k = diag(.25, .75)
    np.testing.assert_allclose(out[B] @ out[A], [[0.0625, 0.1875], [0.1875, 0.5625]])


def test_stack_is_the_exact_weighted_sum_of_products_times_the_scaling():
    out = stack([C1, C2], [1, 3], scaling=32.0)
    assert list(out) == ["layer.o_proj"]
    np.testing.assert_allclose(out["layer.o_proj"], 32.0 * np.diag([0.25, 0.75]))


def test_ffa_averages_b_only_and_refuses_a_moved_a():
    a0 = [[0.5, -0.5]]
    out = ffa([_client(a0, [[1], [2]]), _client(a0, [[3], [6]])], [1, 1])
    np.testing.assert_allclose(out[B], [[2], [4]])
    np.testing.assert_allclose(out[A], a0)
    # exact: B'A equals the average of the products
    np.testing.assert_allclose(out[B] @ out[A], 0.5 * (np.array([[1], [2]]) @ a0 + np.array([[3], [6]]) @ a0))
    with pytest.raises(AggregationError, match=r"updates\[1\].*lora_A changed"):
        ffa([_client(a0, [[1], [2]]), _client([[0.5, 0.4]], [[3], [6]])], [1, 1])


def test_bad_updates_name_the_field():
    with pytest.raises(AggregationError, match=r"updates\[1\]\['layer.o_proj.lora_B.weight'\]: shape"):
        fedit([C1, _client([[0, 1]], [[0, 1, 2]])], [1, 1])
    with pytest.raises(AggregationError, match=r"NaN or inf"):
        fedit([C1, _client([[np.nan, 1]], [[0], [1]])], [1, 1])
    with pytest.raises(AggregationError, match="sample_counts"):
        fedit([C1, C2], [0, 0])
    with pytest.raises(AggregationError, match="partner"):
        lora_pairs({A: None})


def test_cra_reduces_exactly_to_fedavg():
    rng = np.random.default_rng(0)
    w = {"proj.weight": rng.normal(size=(4, 6)), "proj.bias": rng.normal(size=4)}
    ups = [{k: rng.normal(size=v.shape) for k, v in w.items()} for _ in range(3)]
    n = [10, 30, 60]
    agg = CanonicalAggregator(CanonicalConfig(energy=1.0, reliability=False, momentum=0.0, server_lr=1.0))
    new = agg.step(w, ups, n)
    p = np.array(n) / 100
    for k in w:
        np.testing.assert_allclose(new[k], w[k] + sum(pk * u[k] for pk, u in zip(p, ups)), atol=1e-12)


def test_cra_with_one_client_is_server_momentum():
    rng = np.random.default_rng(1)
    w = {"proj.weight": rng.normal(size=(3, 5))}
    agg = CanonicalAggregator(CanonicalConfig(energy=1.0, momentum=0.9, server_lr=0.5))
    m = np.zeros((3, 5))
    cur = dict(w)
    for _ in range(4):
        d = rng.normal(size=(3, 5))       # full row rank: the basis spans the output space
        m = 0.9 * m + d
        expected = cur["proj.weight"] + 0.5 * m
        cur = agg.step(cur, [{"proj.weight": d}], [7])
        np.testing.assert_allclose(cur["proj.weight"], expected, atol=1e-10)


def test_cra_down_weights_a_client_that_disagrees_with_the_consensus():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(4, 4))
    honest = [{"p": base + 0.05 * rng.normal(size=(4, 4))} for _ in range(3)]
    rogue = {"p": -base}
    agg = CanonicalAggregator(CanonicalConfig(energy=0.9, temperature=0.2, momentum=0.0))
    agg.step({"p": np.zeros((4, 4))}, honest + [rogue], [1, 1, 1, 1])
    rho = agg.last["p"]["rho"]
    assert rho[3] < 0.05 < min(rho[:3]) and abs(sum(rho) - 1) < 1e-9
    assert 1 <= agg.last["p"]["rank"] <= 4
