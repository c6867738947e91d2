"""FLORA's weighted sums (fedit, ffa) under SecAgg+ over loopback gRPC with mTLS: the server unmasks only
sum_k n_k theta_k and sum_k n_k, which recovers the sample-weighted average exactly (to the fixed-point step); no
client's update reaches it or its audit log."""

import asyncio

import numpy as np
import pytest

from mor_client import ClientCredentials, FederationClient, ReleasePolicy
from mor_client.secagg_session import SecAggSession
from mor_client.training import TrainingRefused, TrainingResult, secagg_input
from mor_server.baselines.federated import BaselineConfig, FederatedBaseline

from fedutil import CARD, LengthScorer, start_federation, stop_federation

NAMES = ("alice", "bob", "carol", "dave")
A, B = "m.o_proj.lora_A.weight", "m.o_proj.lora_B.weight"
PARAMS = {A: np.linspace(-0.3, 0.3, 6, dtype=np.float32).reshape(2, 3), B: np.zeros((4, 2), np.float32)}


class NoiseTrainer:
    """Each client's update: the broadcast plus its own fixed random perturbation; n examples."""

    methods = ("fedit", "ffa")

    def __init__(self, seed, n, refuse=False):
        self.rng, self.n, self.refuse = np.random.default_rng(seed), n, refuse
        self.sent = []

    def train(self, req):
        if self.refuse:
            raise TrainingRefused("RESOURCE_EXHAUSTED", "budget of this run spent")
        out = {k: (req.parameters[k] + self.rng.normal(0, 0.05, req.parameters[k].shape)).astype(np.float32)
               for k in req.update_names}
        self.sent.append(out)
        return TrainingResult(out, self.n)


async def _federation(pki_dir, trainers, modes=("secagg",), **server_kw):
    def make(d, n, srv):
        creds = ClientCredentials.from_dir(d / "clients" / n)
        return FederationClient(f"localhost:{srv.port}", creds, LengthScorer(),
                                card={**CARD, "supported_modes": list(modes)}, policy=ReleasePolicy(tuple(modes)),
                                secagg_handler=SecAggSession(creds) if "secagg" in modes else None, trainer=trainers[n])

    return await start_federation(pki_dir, list(trainers), make, **server_kw)


_stop = stop_federation


def test_secagg_parameter_round_recovers_the_weighted_average(pki_dir, tmp_path):
    from privacy.audit.log import read_entries

    counts = {"alice": 10, "bob": 30, "carol": 5, "dave": 55}
    trainers = {n: NoiseTrainer(i, counts[n]) for i, n in enumerate(NAMES)}
    log_path = tmp_path / "audit.jsonl"

    async def main():
        server, clients, tasks = await _federation(pki_dir, trainers, audit_path=log_path)
        try:
            await server.wait_for_trainers(4, "fedit", timeout=10)
            out = await server.run_secagg_training_round(PARAMS, "fedit", {"learning_rate": 0.1}, timeout=20)
            assert out.ok, out.reason
            assert sorted(out.responders) == list(NAMES)
            assert set(out.aggregate) == {"mean", "num_examples", "survivors"}, "no individual update reaches it"
            assert out.reports == {}, "a SecAgg+ round has no per-client reports"
            assert out.aggregate["num_examples"] == 100
            for k in (A, B):
                want = sum(counts[n] * trainers[n].sent[0][k].astype(np.float64) for n in NAMES) / 100
                # one fixed-point step (2^-16) per coordinate of n_k theta_k, divided by sum n
                np.testing.assert_allclose(out.aggregate["mean"][k], want, atol=4 * 2.0 ** -16 / 100 + 1e-9)

            # the driver: ffa under secagg keeps A frozen and takes B from the unmasked average
            fb = FederatedBaseline(_NoPolicy(), BaselineConfig(
                "ffa", rounds=1, secagg=True, timeout=20))
            rec = await fb.run_round(server, 0)
            assert rec.ok, rec.reason
            assert np.array_equal(fb.state[A], _NoPolicy.STATE[A])
            want_b = sum(counts[n] * trainers[n].sent[1][B].astype(np.float64) for n in NAMES) / 100
            np.testing.assert_allclose(fb.state[B], want_b, atol=1e-6)
            assert set(trainers["alice"].sent[1]) == {B}

            # a client that refuses (its run's budget is spent) is a dropout; the others' average is recovered
            trainers["dave"].refuse = True
            out = await server.run_secagg_training_round(PARAMS, "fedit", {}, timeout=20)
            assert out.ok, out.reason
            assert sorted(out.responders) == ["alice", "bob", "carol"] and "refused" in out.dropped["dave"]
            assert out.aggregate["num_examples"] == 45
            want = sum(counts[n] * trainers[n].sent[-1][A].astype(np.float64) for n in NAMES[:3]) / 45
            np.testing.assert_allclose(out.aggregate["mean"][A], want, atol=4 * 2.0 ** -16 / 45 + 1e-9)
            with pytest.raises(ValueError, match="weighted sum"):
                await server.run_secagg_training_round(PARAMS, "fedcmp", {})
            assert server.metrics.value("mor_rounds_completed_total", {"mode": "train:fedit"}) == 2
        finally:
            await _stop(server, clients, tasks)

    asyncio.run(main())
    rounds = [e.payload for e in read_entries(log_path) if e.event == "round"]
    assert [r["secagg"] for r in rounds] == [True, True, True]
    assert rounds[0]["num_examples_total"] == 100 and "updates" not in rounds[0]


def test_secagg_training_needs_secagg_enabled_on_the_client(pki_dir):
    trainers = {n: NoiseTrainer(i, 10) for i, n in enumerate(NAMES[:3])}

    async def main():
        server, clients, tasks = await _federation(pki_dir, trainers, modes=("plain",))
        try:
            out = await server.run_secagg_training_round(PARAMS, "fedit", {}, timeout=10)
            assert not out.ok
            assert all("secure aggregation (mode secagg) is not enabled" in why for why in out.dropped.values()), \
                out.dropped
            assert all(not t.sent for t in trainers.values()), "refused before training"
        finally:
            await _stop(server, clients, tasks)

    asyncio.run(main())


def test_secagg_input_layout():
    v = secagg_input({A: np.ones((2, 3)), B: np.full((4, 2), 2.0)}, [A, B], 3)
    assert v.shape == (6 + 8 + 1,) and v[0] == 3.0 and v[6] == 6.0 and v[-1] == 3.0


class _NoPolicy:
    """FederatedBaseline needs a policy only to initialise its state and to build the final model: a stand-in
    whose state is PARAMS (the driver's LoRA init is replaced)."""

    STATE = PARAMS


@pytest.fixture(autouse=True)
def _fake_lora_init(monkeypatch):
    import mor_client.baselines as mb

    monkeypatch.setattr(mb, "lora_init", lambda model, rank=2, seed=0: {k: v.copy() for k, v in PARAMS.items()})
