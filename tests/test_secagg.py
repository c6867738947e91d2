"""SecAgg+: exact recovery, dropout tolerance, aborts, tampering, forged keys, lying server, replays, transcript."""

import numpy as np
import pytest

from privacy.ledger import PrivacyLedger
from privacy.secagg import (STAGES, InputOutOfRange, MessageError, ParameterError, ProtocolViolation, SecAggClient,
                            SecAggServer, WeightIsolationError, make_identities, run_secagg_round)
from privacy.secagg import ddp, quantization
from privacy.secagg.messages import AdvertiseKeys, EncryptedShares, PeerKeys, SurvivorSet

FRAC = 16


def _inputs(n, m, seed=0):
    rng = np.random.default_rng(seed)
    return {f"c{i:03d}": rng.uniform(-1, 1, m) for i in range(n)}, rng


def _expected(inputs, weights, survivors):
    ids = sorted(inputs)
    w = np.ones(len(ids)) if weights is None else np.asarray(weights)
    return sum((w[i] * inputs[c] for i, c in enumerate(ids) if c in survivors), np.zeros(len(inputs[ids[0]])))


@pytest.mark.parametrize("n", [3, 10, 50])
def test_exact_recovery_of_weighted_sum(n):
    inputs, rng = _inputs(n, 32, seed=n)
    w = rng.uniform(0.01, 1.0, n)
    res, stats = run_secagg_round(inputs, weights=w)
    assert res.ok, res.reason
    assert sorted(res.survivors) == sorted(inputs)
    assert np.abs(res.total - _expected(inputs, w, inputs)).max() <= n * 0.5 / 2 ** FRAC
    assert stats.bytes_per_client > 0


def test_per_item_weights():
    inputs, rng = _inputs(6, 8)
    w = rng.dirichlet(np.ones(6), size=8).T  # (n, m): each item's weights on the simplex
    res, _ = run_secagg_round(inputs, weights=w, client_kwargs={"min_contributors": 2})
    ids = sorted(inputs)
    exp = sum(w[i] * inputs[c] for i, c in enumerate(ids))
    assert res.ok and np.allclose(res.total, exp, atol=6 / 2 ** FRAC)


@pytest.mark.parametrize("stage", STAGES)
def test_any_n_minus_t_dropouts_at_any_stage_recover(stage):
    n = 10
    inputs, rng = _inputs(n, 16, seed=3)
    ids = sorted(inputs)
    t = SecAggServer("probe", ids, vector_length=16, degree=n - 1).threshold  # complete graph: t = 6 of 10
    dropped = list(rng.choice(ids, n - t, replace=False))
    res, _ = run_secagg_round(inputs, dropouts={stage: dropped}, degree=n - 1)
    assert res.ok, res.reason
    if stage in ("setup", "reveal", "share_keys", "collect_masked"):
        assert set(res.survivors) == set(ids) - set(dropped)  # their inputs are not in the sum
    else:
        assert set(res.survivors) == set(ids)  # inputs were in; masks recovered from the others' shares
    assert np.abs(res.total - _expected(inputs, None, res.survivors)).max() <= n / 2 ** FRAC


def test_sparse_graph_with_ten_percent_dropouts():
    n = 50
    inputs, rng = _inputs(n, 16, seed=5)
    srv = SecAggServer("r", sorted(inputs), vector_length=16)
    assert srv.degree < n - 1  # really SecAgg+ (sparse), not the complete graph
    dropped = list(rng.choice(sorted(inputs), 5, replace=False))
    res, _ = run_secagg_round(inputs, round_id="r", server=srv, dropouts={"collect_masked": dropped})
    assert res.ok, res.reason
    assert np.abs(res.total - _expected(inputs, None, res.survivors)).max() <= n / 2 ** FRAC


@pytest.mark.parametrize("stage", ["share_keys", "collect_masked", "unmask"])
def test_fewer_than_t_survivors_abort_without_revealing(stage):
    n = 10
    inputs, rng = _inputs(n, 8, seed=4)
    ids = sorted(inputs)
    srv = SecAggServer("r", ids, vector_length=8, keep_transcript=True, degree=n - 1)
    dropped = list(rng.choice(ids, n - srv.threshold + 1, replace=False))
    res, _ = run_secagg_round(inputs, round_id="r", server=srv, dropouts={stage: dropped})
    assert not res.ok and res.total is None and "threshold" in res.reason
    # nothing that could unmask anybody was ever sent to the server
    assert not any(d == "in" and s == "unmask" for d, s, _, _ in srv.transcript) or stage == "unmask"


def test_clients_refuse_to_unmask_when_server_claims_too_few_survivors():
    inputs, _ = _inputs(10, 8, seed=6)
    ids = sorted(inputs)

    def lie(stage, cid, payload):
        if stage == "consistency":  # server pretends almost everyone dropped
            return SurvivorSet("r", [cid] + [c for c in ids if c != cid][:2]).to_bytes()
        return payload

    res, stats = run_secagg_round(inputs, round_id="r", tamper=lie, degree=9)
    assert not res.ok
    assert all("refusing" in str(e) for e in stats.client_errors.values()) and len(stats.client_errors) == 10


def test_tampered_share_is_detected():
    inputs, _ = _inputs(5, 8)

    def flip(stage, cid, payload):
        if stage == "collect_masked" and cid == "c001":
            msg = EncryptedShares.from_bytes(payload)
            frm = sorted(msg.shares)[0]
            ct = bytearray(msg.shares[frm])
            ct[20] ^= 1
            msg.shares[frm] = bytes(ct)
            return msg.to_bytes()
        return payload

    _, stats = run_secagg_round(inputs, round_id="r", tamper=flip)
    assert isinstance(stats.client_errors["c001"], ProtocolViolation)
    assert "authentication" in str(stats.client_errors["c001"])


def test_forged_key_is_detected():
    inputs, _ = _inputs(5, 8)

    def forge(stage, cid, payload):
        if stage == "reveal" and cid == "c000":  # every advertisement is forwarded at the reveal stage
            msg = PeerKeys.from_bytes(payload)
            adv = AdvertiseKeys.from_bytes(msg.adverts["c002"])
            adv.mask_pk = bytes(32 * [9])  # the server substitutes its own key for c002's
            msg.adverts["c002"] = adv.to_bytes()
            return msg.to_bytes()
        return payload

    _, stats = run_secagg_round(inputs, round_id="r", tamper=forge)
    assert isinstance(stats.client_errors["c000"], ProtocolViolation)
    assert "forged key" in str(stats.client_errors["c000"])


def test_lying_server_fails_the_consistency_check():
    n = 6
    inputs, _ = _inputs(n, 8)
    ids = sorted(inputs)

    def equivocate(stage, cid, payload):
        # tell c000 that c005 dropped (to get c005's mask-key share) while the others are told c005 survived
        if stage == "consistency" and cid == "c000":
            return SurvivorSet("r", [c for c in ids if c != "c005"]).to_bytes()
        return payload

    res, stats = run_secagg_round(inputs, round_id="r", tamper=equivocate)
    assert not res.ok
    errs = {c: str(e) for c, e in stats.client_errors.items()}
    assert "different survivor set" in errs["c000"]
    assert any("told clients different survivor sets" in e for c, e in errs.items() if c != "c000")


def test_replayed_and_cross_round_messages_are_refused():
    ids = ["a", "b", "c"]
    sks, verify = make_identities(ids)
    srv = SecAggServer("r1", ids, vector_length=2)
    cfg = srv.setup()
    cl = SecAggClient("r1", "a", identity_key=sks["a"], verify_peer=verify)
    cl.handle("setup", cfg["a"], values=[0.1, 0.2])
    with pytest.raises(ProtocolViolation, match="replay"):
        cl.handle("setup", cfg["a"])
    other = SecAggClient("r2", "a", identity_key=sks["a"], verify_peer=verify)
    with pytest.raises(MessageError, match="round"):
        other.handle("setup", cfg["a"], values=[0.1, 0.2])
    with pytest.raises(MessageError, match="trailing"):
        SecAggClient("r1", "b", identity_key=sks["b"], verify_peer=verify).handle("setup", cfg["b"] + b"x",
                                                                                 values=[0.0, 0.0])


def test_server_transcript_never_contains_an_individual_score():
    inputs, rng = _inputs(8, 64, seed=9)
    ids = sorted(inputs)
    w = rng.uniform(0.1, 1, 8)
    srv = SecAggServer("r", ids, vector_length=64, weights=w, keep_transcript=True)
    res, _ = run_secagg_round(inputs, round_id="r", server=srv)
    assert res.ok
    blob = b"".join(p for _, _, _, p in srv.transcript)
    for i, c in enumerate(ids):
        q, _ = quantization.encode(inputs[c], value_range=1.0, frac_bits=FRAC, weight=w[i])
        enc = quantization.to_ring(q, srv.cfg.mod_bits)
        for vec in (enc, inputs[c], inputs[c] * w[i]):
            for k in range(0, 64, 8):  # no 8-value window of any client's (weighted / encoded) scores
                assert np.ascontiguousarray(vec[k:k + 8]).tobytes() not in blob
                assert np.ascontiguousarray(vec[k:k + 8]).astype(">f8").tobytes() not in blob


def test_weight_isolation_is_refused():
    inputs, _ = _inputs(5, 4)
    _, st = run_secagg_round(inputs, weights=[0.9, 0.05, 0.05, 0, 0], client_kwargs={"max_weight": 0.5})
    assert isinstance(st.client_errors["c000"], WeightIsolationError)
    _, st = run_secagg_round(inputs, weights=[1, 0, 0, 0, 0], client_kwargs={"min_contributors": 3})
    assert isinstance(st.client_errors["c000"], WeightIsolationError)
    assert "c001" not in st.client_errors  # zero-weight clients contribute nothing to isolate


def test_out_of_range_is_error_or_counted_and_modulus_checked():
    inputs, _ = _inputs(4, 4)
    inputs["c002"][1] = 5.0
    _, st = run_secagg_round(inputs)
    assert isinstance(st.client_errors["c002"], InputOutOfRange)
    res, _ = run_secagg_round(inputs, out_of_range="clip")
    assert res.ok and res.out_of_range == 1
    with pytest.raises(ParameterError, match="modulus"):
        SecAggServer("r", ["a", "b"], vector_length=4, value_range=1e6, frac_bits=30, mod_bits=32)
    with pytest.raises(ParameterError, match="threshold"):
        SecAggServer("r", [f"c{i}" for i in range(10)], vector_length=4, threshold=3)


def test_secagg_dp_noise_is_calibrated_and_charged(tmp_path):
    n, m, z = 5, 3000, 0.5
    inputs, _ = _inputs(n, m, seed=11)
    sigma = ddp.calibrate_sigma(z, value_range=1.0, weight_cap=1.0, frac_bits=8, m=m, min_survivors=4)
    ledgers = {c: PrivacyLedger(tmp_path / f"{c}.db", client_level_budget=50.0) for c in inputs}
    res, st = run_secagg_round(inputs, round_id="dp1", frac_bits=8, dp_sigma=sigma, dp_min_survivors=4,
                               client_kwargs={c: {"ledger": ledgers[c], "rng": np.random.default_rng(i)}
                                              for i, c in enumerate(sorted(inputs))})
    assert res.ok, (res.reason, st.client_errors)
    resid = (res.total - _expected(inputs, None, inputs)) * 2 ** 8
    expected_std = np.sqrt(n) * sigma
    assert abs(resid.std() - expected_std) < 0.05 * expected_std
    d2, _ = ddp.sensitivities(value_range=1.0, weight_cap=1.0, frac_bits=8, m=m)
    assert np.sqrt(4) * sigma == pytest.approx(z * d2)  # calibrated to the minimum survivors
    for c, L in ledgers.items():
        h = L.history("client")
        assert len(h) == 1 and h[0]["mechanism"] == "secagg+dp" and h[0]["round_id"] == "dp1"
        assert L.epsilon("client") > 0


def test_secagg_dp_refuses_to_unmask_below_min_survivors(tmp_path):
    inputs, _ = _inputs(6, 16, seed=2)
    ledgers = {c: PrivacyLedger(tmp_path / f"{c}.db") for c in inputs}
    res, st = run_secagg_round(inputs, dp_sigma=50.0, dp_min_survivors=6, frac_bits=8,
                               dropouts={"collect_masked": ["c000"]},
                               client_kwargs={c: {"ledger": ledgers[c]} for c in inputs})
    assert not res.ok
    assert any("calibrated for at least 6" in str(e) for e in st.client_errors.values())
