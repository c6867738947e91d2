"""Privacy ledger: units kept apart, budget refusals, replay refusal, persistence, crash safety (property test)."""

import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy import accounting as acc
from privacy.ledger import BudgetExceeded, LedgerError, PrivacyLedger, RoundReplayed


def test_units_are_never_added(tmp_path):
    L = PrivacyLedger(tmp_path / "l.db", client_level_budget=10.0)
    L.record_training(model_id="rm1", noise_multiplier=1.0, sample_rate=0.01, steps=500, delta=1e-5)
    pair_eps = L.epsilon("pair")
    assert 0 < pair_eps < 5
    assert L.epsilon("client") == 0.0  # training never charges client level
    L.charge_release(round_id="r1", noise_multiplier=2.0)
    assert L.epsilon("pair") == pytest.approx(pair_eps)  # releases never charge example level
    s = L.summary()
    assert s["pair"]["level"] == "example" and s["client"]["level"] == "client"
    assert s["client"]["epsilon"] == pytest.approx(acc.gdp_epsilon(0.5, 1e-5))
    assert s["client"]["accountant"] == "gdp-exact" and s["client"]["n_releases"] == 1


def test_non_dp_training_is_infinite(tmp_path):
    L = PrivacyLedger(tmp_path / "l.db")
    L.record_training(model_id="plain", noise_multiplier=0.0, sample_rate=0.1, steps=100, delta=1e-5)
    assert math.isinf(L.epsilon("pair"))


def test_composition_matches_exact_gdp_and_is_below_rdp(tmp_path):
    L = PrivacyLedger(tmp_path / "l.db")
    for i, s in enumerate([3.0, 4.0, 3.0]):
        L.charge_release(round_id=f"r{i}", noise_multiplier=s, count=2)
    mu = acc.gdp_mu([3.0, 4.0, 3.0], [2, 2, 2])
    assert L.epsilon("client") == pytest.approx(acc.gdp_epsilon(mu, 1e-5))
    assert L.epsilon("client") < acc.rdp_epsilon([(3.0, 1, 2), (4.0, 1, 2), (3.0, 1, 2)], 1e-5)
    h = L.history("client")
    assert [r["round_id"] for r in h] == ["r0", "r1", "r2"]
    assert h[-1]["epsilon_after"] == pytest.approx(L.epsilon("client"))
    assert all(h[i]["epsilon_after"] < h[i + 1]["epsilon_after"] for i in range(2))


def test_budget_refusal_says_what_is_left_and_writes_nothing(tmp_path):
    L = PrivacyLedger(tmp_path / "l.db", client_level_budget=2.0)
    c = L.charge_release(round_id="a", noise_multiplier=3.0)
    eps_after, remaining = L.preview(noise_multiplier=1.0)
    assert eps_after > 2.0 and remaining < 0
    with pytest.raises(BudgetExceeded) as ei:
        L.charge_release(round_id="b", noise_multiplier=1.0)
    assert ei.value.remaining_epsilon == pytest.approx(2.0 - c.epsilon_after)
    assert ei.value.requested_epsilon > ei.value.remaining_epsilon
    assert f"{ei.value.remaining_epsilon:.4g}" in str(ei.value)
    assert len(L.history("client")) == 1 and not L.charged("b")


def test_replayed_round_is_refused_not_charged_twice(tmp_path):
    L = PrivacyLedger(tmp_path / "l.db", client_level_budget=5.0)
    L.charge_release(round_id="r", noise_multiplier=3.0)
    with pytest.raises(RoundReplayed, match="already charged"):
        L.charge_release(round_id="r", noise_multiplier=3.0)
    assert len(L.history()) == 1


def test_budget_persists_across_reopen_and_bad_args(tmp_path):
    PrivacyLedger(tmp_path / "l.db", client_level_budget=1.5).charge_release(round_id="x", noise_multiplier=5.0)
    L = PrivacyLedger(tmp_path / "l.db")
    assert L.budget == 1.5 and len(L.history()) == 1
    with pytest.raises(LedgerError, match="unit must be 'client'"):
        L.charge_release(round_id="y", noise_multiplier=5.0, unit="pair")
    with pytest.raises(LedgerError, match="noise_multiplier"):
        L.charge_release(round_id="y", noise_multiplier=0.0)
    with pytest.raises(LedgerError, match="rho"):
        L.charge_release(round_id="y", noise_multiplier=1.0, mechanism="secagg+dp")


def test_secagg_dp_charge_uses_zcdp(tmp_path):
    L = PrivacyLedger(tmp_path / "l.db")
    rho = acc.ddg_rho(sigma=100.0, n=10, l2_sensitivity=200.0, l1_sensitivity=200.0)
    L.charge_release(round_id="s1", noise_multiplier=0, mechanism="secagg+dp", meta={"rho": rho})
    assert L.epsilon("client") == pytest.approx(acc.zcdp_epsilon(rho, 1e-5))
    assert L.summary()["client"]["accountant"] == "rdp"


def test_charge_survives_hard_crash(tmp_path):
    db = tmp_path / "l.db"
    code = ("from privacy.ledger import PrivacyLedger; import os\n"
            f"L = PrivacyLedger({str(db)!r}, client_level_budget=3.0)\n"
            "L.charge_release(round_id='crash', noise_multiplier=4.0)\n"
            "os._exit(9)  # crash before the scores would be sent\n")
    r = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 9
    L = PrivacyLedger(db)
    assert L.charged("crash") and L.epsilon("client") > 0


class _Crash(Exception):
    pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([1.5, 2.0, 3.0, 6.0]), st.integers(1, 3),
                          st.sampled_from(["ok", "crash_before", "crash_after", "restart", "retry"])),
                min_size=1, max_size=25),
       st.floats(0.5, 4.0))
def test_property_never_releases_past_budget(tmp_path_factory, requests, budget):
    """No sequence of requests, crashes (before/after the charge) and restarts releases past the budget."""
    db = tmp_path_factory.mktemp("p") / "l.db"
    L = PrivacyLedger(db, client_level_budget=budget)
    sent = []  # (noise multiplier, count) of releases that actually left the client
    last_round = None
    for i, (nm, count, event) in enumerate(requests):
        rid = last_round if (event == "retry" and last_round) else f"r{i}"
        last_round = rid
        try:
            if event == "crash_before":
                raise _Crash  # crashed before charging: nothing sent, nothing charged
            L.charge_release(round_id=rid, noise_multiplier=nm, count=count)
            if event == "crash_after":
                raise _Crash  # charged, crashed before sending
            sent.append((nm, count))
        except (_Crash, BudgetExceeded):
            pass
        if event in ("crash_before", "crash_after", "restart"):
            L.close()
            L = PrivacyLedger(db)  # restart without re-stating the budget
    released = acc.gdp_epsilon(acc.gdp_mu([s for s, _ in sent], [c for _, c in sent]), 1e-5) if sent else 0.0
    assert released <= budget + 1e-9
    assert L.epsilon("client") >= released - 1e-9  # the ledger may over-count, never under-count
    L.close()


def test_external_epsilons_compose_with_their_delta(tmp_path):
    """An epsilon given directly (no history) carries its delta: basic composition adds both (issue #11).

    Before the fix the ledger added the epsilons and kept the smaller delta: two (1, 1e-5) trainings were reported
    as (2, 1e-5)-DP, which basic composition does not give (it gives (2, 2e-5))."""
    L = PrivacyLedger(tmp_path / "l.db")
    for i in range(2):
        L.record_training(model_id=f"ext{i}", noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5,
                          epsilon=1.0)
    s = L.summary()["pair"]
    assert s["epsilon"] == pytest.approx(2.0)
    assert s["delta"] == pytest.approx(2e-5)  # the deltas add too
    assert "external" in s["accountant"]
    assert L.epsilon("pair", delta=2e-5) == pytest.approx(2.0)
    assert math.isinf(L.epsilon("pair", delta=1e-5))  # (2, 1e-5) is not implied: no finite epsilon at 1e-5
    assert L.history("pair")[-1]["epsilon_after"] == pytest.approx(2.0)


def test_external_epsilon_takes_its_delta_out_of_the_history_share(tmp_path):
    """Mixed with a DP-SGD history: the history is composed at delta - sum(external deltas)."""
    L = PrivacyLedger(tmp_path / "l.db")
    L.record_training(model_id="rm", noise_multiplier=1.0, sample_rate=0.01, steps=500, delta=1e-5,
                      accountant="rdp")
    L.record_training(model_id="ext", noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=4e-6, epsilon=0.5)
    hist_only = acc.rdp_to_epsilon(acc.rdp_curve(1.0, 0.01, 500), 6e-6)[0]
    assert L.epsilon("pair", delta=1e-5) == pytest.approx(hist_only + 0.5)
    s = L.summary()["pair"]  # reported at the history's delta plus the external delta
    assert s["delta"] == pytest.approx(1.4e-5)
    assert s["epsilon"] == pytest.approx(acc.rdp_to_epsilon(acc.rdp_curve(1.0, 0.01, 500), 1e-5)[0] + 0.5)
    assert math.isinf(L.epsilon("pair", delta=4e-6))  # nothing left for the history
