"""FLORA (fedit, ffa, stack) and Fed-CMP as real federated runs: PolicyTrainer clients over loopback gRPC with mTLS
train a tiny Llava locally (peft LoRA on the language model's o_proj / the projector), the server aggregates with
mor_server.baselines.aggregation, and what it aggregates is exactly what the clients computed."""

import asyncio
import io
import math

import numpy as np
import pytest

from mor_client import ClientCredentials, FederationClient
from mor_server.baselines import aggregation as agg
from mor_server.baselines.federated import BaselineConfig, FederatedBaseline, evaluate_policy
from mor_server.federation.config import ServerConfig
from mor_server.federation.server import FederationServer

from fedutil import CARD, LengthScorer, start_federation, stop_federation

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

WORDS = ["what", "color", "is", "the", "shape", "red", "blue", "green", "?"]


@pytest.fixture(scope="module")
def tiny():
    from mor_server.alignment.policy import TinyLlavaConfig, build_tiny_llava

    cfg = TinyLlavaConfig(image_size=16, patch_size=8, vision_hidden=16, vision_layers=1, text_hidden=16,
                          text_layers=1, heads=2, intermediate=32, max_positions=64)
    return build_tiny_llava(words=WORDS, config=cfg)


def _examples(colours, n):
    from PIL import Image

    from mor_client.baselines import SFTExample

    out = []
    for i in range(n):
        name, rgb = colours[i % len(colours)]
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), rgb).save(buf, format="PNG")
        out.append(SFTExample(buf.getvalue(), "what color is the shape?", name))
    return out


RED, BLUE, GREEN = ("red", (220, 20, 20)), ("blue", (20, 20, 220)), ("green", (20, 200, 20))


def _trainer(tiny, colours, n, **kw):
    from mor_client.baselines import PolicyTrainer

    model, proc = tiny
    return PolicyTrainer(model, proc, _examples(colours, n), **kw)


async def _federation(pki_dir, trainers):
    return await start_federation(pki_dir, list(trainers), lambda d, n, srv: FederationClient(
        f"localhost:{srv.port}", ClientCredentials.from_dir(d / "clients" / n), LengthScorer(), card=CARD,
        trainer=trainers[n]))


_stop = stop_federation


def _same_as_clients(fb, trainers):
    """The server aggregated exactly the tensors each client's trainer produced (bit for bit, float32)."""
    assert set(fb.last_updates) == set(trainers)
    for c, t in trainers.items():
        u = fb.last_updates[c]
        assert u.num_examples == t.last["num_examples"]
        assert set(u.tensors) == set(t.last["tensors"])
        for n, v in t.last["tensors"].items():
            assert np.array_equal(u.tensors[n], v.astype(np.float32)), (c, n)


def test_flora_rounds_over_mtls_equal_aggregation_of_client_updates(pki_dir, tiny):
    model, proc = tiny
    trainers = {"alice": _trainer(tiny, [RED], 6), "bob": _trainer(tiny, [BLUE, GREEN], 10)}
    hp = {"learning_rate": 0.05, "batch_size": 4, "epsilon": math.inf}

    async def main():
        server, clients, tasks = await _federation(pki_dir, trainers)
        try:
            await server.wait_for_trainers(2, "fedit", timeout=10)
            # fedit: two rounds; each round's new state is aggregation.fedit of the clients' updates
            fb = FederatedBaseline(model, BaselineConfig("fedit", rounds=2, hparams=hp, timeout=60))
            init = dict(fb.state)
            for r in range(2):
                rec = await fb.run_round(server, r)
                assert rec.ok, rec.reason
                assert rec.num_examples == {"alice": 6, "bob": 10}
                _same_as_clients(fb, trainers)
                assert trainers["bob"].last["round_id"] == rec.round_id
                ups = [fb.last_updates[c].tensors for c in ("alice", "bob")]
                want = agg.fedit(ups, [6, 10])
                for n in want:
                    assert np.allclose(fb.state[n], want[n], atol=1e-7)
                # the round's broadcast is the previous state
                assert all(np.array_equal(fb.last_params[n], (init if r == 0 else prev)[n]) for n in init)
                prev = dict(fb.state)
            assert any(not np.array_equal(fb.state[n], init[n]) for n in init), "training changed nothing"
            assert all(np.abs(fb.state[n]).max() > 0 for n in fb.state if ".lora_B." in n)

            # ffa (2 rounds): A stays at its shared init, only B comes back and is averaged
            ffa = FederatedBaseline(model, BaselineConfig("ffa", rounds=2, hparams=hp, timeout=60, seed=3))
            a_init = {n: v for n, v in ffa.state.items() if ".lora_A." in n}
            b = [n for n in ffa.state if ".lora_B." in n]
            for r in range(2):
                assert (await ffa.run_round(server, r)).ok
                _same_as_clients(ffa, trainers)
                assert all(".lora_B." in n for n in ffa.last_updates["alice"].tensors)
                for n, v in a_init.items():
                    assert np.array_equal(ffa.state[n], v) and np.array_equal(ffa.last_params[n], v)
                want = agg.weighted_average([{n: ffa.last_updates[c].tensors[n] for n in b}
                                             for c in ("alice", "bob")], [6, 10])
                assert all(np.allclose(ffa.state[n], want[n], atol=1e-7) for n in b)

            # stack (2 rounds): the base o_proj weights move by s * sum p_k B_k A_k (exact); adapters are fresh
            # each round (B = 0, A the same seeded init for every client, another one next round)
            st = FederatedBaseline(model, BaselineConfig("stack", rounds=2, hparams=hp, timeout=60))
            inits = []
            for r in range(2):
                base0 = dict(st.state)
                assert (await st.run_round(server, r)).ok
                _same_as_clients(st, trainers)
                inits.append({n: v for n, v in st.last_params.items() if ".lora_A." in n})
                assert all(not st.last_params[n].any() for n in st.last_params if ".lora_B." in n)
                assert all(np.array_equal(st.last_params[n], base0[n]) for n in base0)
                delta = agg.stack([st.last_updates[c].tensors for c in ("alice", "bob")], [6, 10], scaling=64 / 2)
                for mod, d in delta.items():
                    assert np.abs(d).max() > 0
                    assert np.allclose(st.state[f"{mod}.weight"], base0[f"{mod}.weight"] + d, atol=1e-6)
            assert all(not np.array_equal(inits[0][n], inits[1][n]) for n in inits[0])
            # the merged policy is the warm start plus the stacked update
            merged = dict(st.policy_model().named_parameters())
            for mod in delta:
                assert np.allclose(merged[f"{mod}.weight"].detach().numpy(), st.state[f"{mod}.weight"], atol=1e-6)
            acc = evaluate_policy(fb.policy_model(), proc, _examples([RED, BLUE], 4), batch_size=4)
            assert acc["n"] == 4 and 0.0 <= acc["overall"] <= 1.0
        finally:
            await _stop(server, clients, tasks)

    asyncio.run(main())


def test_fedcmp_rounds_under_dp_sgd_charge_the_ledgers(pki_dir, tiny, tmp_path):
    from privacy.ledger import PrivacyLedger

    model, proc = tiny
    ledgers = {c: PrivacyLedger(tmp_path / f"{c}.sqlite") for c in ("alice", "bob")}
    trainers = {"alice": _trainer(tiny, [RED, GREEN], 8, ledger=ledgers["alice"], model_id="fedcmp-alice",
                                 accountant="rdp"),
                "bob": _trainer(tiny, [BLUE], 8, ledger=ledgers["bob"], model_id="fedcmp-bob", accountant="rdp")}
    hp = {"learning_rate": 0.05, "batch_size": 4, "epsilon": 8.0, "delta": 1e-3, "max_grad_norm": 1.0}

    async def main():
        server, clients, tasks = await _federation(pki_dir, trainers)
        try:
            await server.wait_for_trainers(2, "fedcmp", timeout=10)
            cra = agg.CanonicalConfig(energy=1.0, reliability=False, momentum=0.0)  # = FedAvg of the deltas
            fb = FederatedBaseline(model, BaselineConfig("fedcmp", rounds=2, hparams=hp, timeout=120, cra=cra))
            w0 = dict(fb.state)
            assert all(n.startswith("model.multi_modal_projector.") for n in w0)
            for r in range(2):
                prev = dict(fb.state)
                rec = await fb.run_round(server, r)
                assert rec.ok, rec.reason
                _same_as_clients(fb, trainers)
                ups = [fb.last_updates[c].tensors for c in ("alice", "bob")]
                fedavg = agg.weighted_average(ups, [8, 8])
                for n in w0:
                    assert np.allclose(fb.state[n], fedavg[n], atol=1e-6), n
                # and the same through the CRA aggregator itself on the deltas
                again = agg.CanonicalAggregator(cra).step(prev, [{n: u[n] - prev[n] for n in u} for u in ups],
                                                          [8, 8])
                assert all(np.allclose(fb.state[n], again[n], atol=1e-6) for n in w0)
                assert trainers["alice"].last["noise_multiplier"] > 0
            eps = {c: ledgers[c].epsilon("pair") for c in ledgers}
            assert all(7.5 < e <= 8.0 for e in eps.values()), eps  # the run spends (almost) exactly its epsilon
            assert fb.history[-1].epsilon == pytest.approx(eps)
            assert [len(ledgers[c].history("pair")) for c in ledgers] == [2, 2]
            # the run's budget is spent: a third round is refused by both clients, and fails
            out = await server.run_training_round(fb.state, "fedcmp", {**hp, "round_index": 2, "total_rounds": 2},
                                                  min_clients=1, timeout=30)
            assert not out.ok and all("refused" in why for why in out.dropped.values())
            assert [len(ledgers[c].history("pair")) for c in ledgers] == [2, 2], "a refused round charges nothing"
        finally:
            await _stop(server, clients, tasks)
            for led in ledgers.values():
                led.close()

    asyncio.run(main())


def test_cra_with_reliability_and_momentum_over_the_wire(pki_dir, tiny):
    """The default Fed-CMP aggregation (energy threshold, reliability, OPM momentum) applied to the updates the
    server received gives the state the driver keeps."""
    model, proc = tiny
    trainers = {"alice": _trainer(tiny, [RED], 6), "bob": _trainer(tiny, [BLUE], 6), "carol": _trainer(tiny, [GREEN], 6)}
    hp = {"learning_rate": 0.05, "batch_size": 3}

    async def main():
        server, clients, tasks = await _federation(pki_dir, trainers)
        try:
            await server.wait_for_trainers(3, "fedcmp", timeout=10)
            cfg = agg.CanonicalConfig(energy=0.9, temperature=0.5, momentum=0.9)
            fb = FederatedBaseline(model, BaselineConfig("fedcmp", rounds=2, hparams=hp, timeout=60, cra=cfg))
            mirror = agg.CanonicalAggregator(cfg)
            for r in range(2):
                prev = dict(fb.state)
                assert (await fb.run_round(server, r)).ok
                ups = [fb.last_updates[c].tensors for c in sorted(trainers)]
                want = mirror.step(prev, [{n: u[n] - prev[n] for n in u} for u in ups], [6, 6, 6])
                assert all(np.allclose(fb.state[n], want[n], atol=1e-6) for n in want)
            assert fb.cra.last and all(len(v["rho"]) == 3 for v in fb.cra.last.values())
        finally:
            await _stop(server, clients, tasks)

    asyncio.run(main())


@pytest.mark.slow
def test_mor_client_join_process_answers_training_rounds(pki_dir, tiny, tmp_path):
    """A real `mor-client join --train-policy ...` process (its own private easy-vqa partition, DP-SGD at epsilon
    8 charged to its --ledger) answers a Fed-CMP round from the server over mTLS."""
    import time

    from mor_server.alignment.policy import save_policy
    from mor_server.apps.procs import ClientProcess, mor_client_argv, stop_all
    from privacy.ledger import PrivacyLedger

    model, proc = tiny
    policy_dir = save_policy(model, proc, tmp_path / "policy")
    ledger = tmp_path / "carol-ledger.sqlite"
    p = ClientProcess("carol", mor_client_argv(
        "join", "--server", "PORT", "--creds", str(pki_dir / "clients" / "carol"),
        "--scorer", "mor_client.training:NoScorer", "--ledger", str(ledger), "--train-policy", str(policy_dir),
        "--train-partition", "client1", "--train-max-examples", "12", "--train-methods", "fedcmp",
        "--train-accountant", "rdp", "--train-max-epsilon", "8"), tmp_path / "carol.log")

    async def main():
        server = FederationServer(ServerConfig(pki_dir=pki_dir))
        await server.start()
        p.argv = [a.replace("PORT", f"localhost:{server.port}") for a in p.argv]
        p.start()
        try:
            await server.wait_for_trainers(1, "fedcmp", timeout=90)
            assert server.online_trainers("fedit") == []  # it announced fedcmp only
            fb = FederatedBaseline(model, BaselineConfig("fedcmp", rounds=1, timeout=90, hparams={
                "learning_rate": 0.01, "batch_size": 4, "epsilon": 8.0, "delta": 1e-4}))
            rec = await fb.run_round(server, 0)
            assert rec.ok, (rec.reason, p.tail())
            assert rec.num_examples == {"carol": 12} and 0 < rec.epsilon["carol"] <= 8.0
        finally:
            stop_all([p])
            await server.stop()

    asyncio.run(main())
    led = PrivacyLedger(ledger)
    try:
        rows = led.history("pair")
        assert len(rows) == 1 and rows[0]["noise_multiplier"] > 0 and rows[0]["model_id"].startswith("baseline-client1")
    finally:
        led.close()
    assert "stopped after" in p.tail(), p.tail()


def _pair_examples(n):
    """DPO pairs: the right colour chosen, the other rejected."""
    ex = _examples([RED, BLUE], n)
    for e in ex:
        e.rejected = "blue" if e.answer == "red" else "red"
    return ex


def test_dpo_objective_over_mtls_raises_the_chosen_margin(pki_dir, tiny, tmp_path):
    """objective "dpo": each client runs DPO on its pairs against the round's broadcast policy; the aggregated
    policy prefers the chosen answers more than the warm start did. Under DP-SGD a pair (both completions) is the
    clipped unit and the run stays within its epsilon."""
    from mor_client.baselines import PolicyTrainer, _PolicyForward, _seq_logprob
    from privacy.ledger import PrivacyLedger

    model, proc = tiny
    led = PrivacyLedger(tmp_path / "carol.sqlite")
    trainers = {"alice": PolicyTrainer(model, proc, _pair_examples(8)),
                "bob": PolicyTrainer(model, proc, _pair_examples(8)),
                "carol": PolicyTrainer(model, proc, _pair_examples(8), ledger=led, accountant="rdp")}

    def margin(m):
        d = trainers["alice"]._dpo_data()
        with torch.no_grad():
            f = _PolicyForward(m.eval())
            return float((_seq_logprob(f, d["input_ids_c"], d["attention_mask_c"], d["pixel_values"], d["labels_c"])
                          - _seq_logprob(f, d["input_ids_r"], d["attention_mask_r"], d["pixel_values"],
                                         d["labels_r"])).mean())

    async def main():
        server, clients, tasks = await _federation(pki_dir, trainers)
        try:
            await server.wait_for_trainers(3, "fedit", timeout=10)
            fb = FederatedBaseline(model, BaselineConfig("fedit", rounds=1, timeout=60, participants=("alice", "bob"),
                                                         hparams={
                "objective": "dpo", "dpo_beta": 0.5, "learning_rate": 0.05, "batch_size": 4, "local_epochs": 3,
                "max_grad_norm": 10.0}))
            assert (await fb.run_round(server, 0)).ok
            _same_as_clients(fb, {c: trainers[c] for c in ("alice", "bob")})
            assert margin(fb.policy_model()) > margin(model) + 0.1
            # DP-DPO: carol's ledger holds only this run
            dp = FederatedBaseline(model, BaselineConfig("fedcmp", rounds=1, timeout=60, participants=("carol",),
                                                         hparams={"objective": "dpo", "epsilon": 4.0,
                                                                  "delta": 1e-3, "batch_size": 4}))
            rec = await dp.run_round(server, 0)
            assert rec.ok, rec.reason
            assert 3.5 < led.epsilon("pair") <= 4.0
            assert trainers["carol"].last["noise_multiplier"] > 0
        finally:
            await _stop(server, clients, tasks)
            led.close()

    asyncio.run(main())


def test_dp_noise_is_not_determined_by_the_servers_seed(tiny):
    """Attack: the server picks hparams.seed. If the client's DP-SGD noise (and Poisson sampling) came from an RNG
    seeded with it, the server could regenerate the noise and subtract it from the update. Two clients with the
    same data answering the same DP task must therefore send different updates; without DP the seed makes runs
    reproducible."""
    from mor_client.baselines import PolicyTrainer, projector_state
    from mor.training import check_hparams
    from mor_client.training import TrainingRequest

    model, proc = tiny
    params = projector_state(model)
    names = tuple(sorted(params))

    def run(eps):
        h = check_hparams({"learning_rate": 0.05, "batch_size": 4, "epsilon": eps, "delta": 1e-3, "seed": 7})
        outs = []
        for _ in range(2):
            tr = PolicyTrainer(model, proc, _examples([RED, BLUE], 8), accountant="rdp")
            outs.append(tr.train(TrainingRequest("r1", "fedcmp", params, names, h)).tensors)
        return outs

    a, b = run(8.0)
    assert any(not np.array_equal(a[n], b[n]) for n in names), "DP noise reproducible from the server's seed"
    a, b = run(math.inf)
    assert all(np.array_equal(a[n], b[n]) for n in names), "without DP the public seed makes a round reproducible"


def test_client_privacy_ceiling_bounds_what_the_server_can_spend(tiny, tmp_path):
    """Attack: the server sets the run's epsilon, total_rounds and round_index. Re-announcing 'round 0 of 1 at
    epsilon 8' every round, or asking for no DP at all, would spend the client's privacy without bound. With
    max_epsilon the client refuses any round that would take its ledger (everything it records: reward models,
    earlier runs) past its own ceiling, before training, and charges nothing for it."""
    from mor_client.baselines import PolicyTrainer, projector_state
    from mor.training import check_hparams
    from mor_client.training import TrainingRefused, TrainingRequest
    from privacy.ledger import PrivacyLedger

    model, proc = tiny
    params = projector_state(model)
    names = tuple(sorted(params))
    led = PrivacyLedger(tmp_path / "ledger.sqlite")
    try:
        tr = PolicyTrainer(model, proc, _examples([RED, BLUE], 8), ledger=led, accountant="rdp", max_epsilon=8.0)
        h = check_hparams({"learning_rate": 0.05, "batch_size": 4, "epsilon": 8.0, "delta": 1e-3,
                           "total_rounds": 1, "round_index": 0})
        tr.train(TrainingRequest("r1", "fedcmp", params, names, h))
        spent = led.epsilon("pair")
        assert 7.5 < spent <= 8.0
        for rid, hp in (("r2", h), ("r3", {**h, "epsilon": math.inf})):  # a 'fresh run', then no DP at all
            with pytest.raises(TrainingRefused) as e:
                tr.train(TrainingRequest(rid, "fedcmp", params, names, hp))
            assert e.value.code == "RESOURCE_EXHAUSTED" and "max_epsilon" in e.value.reason
        assert len(led.history("pair")) == 1 and led.epsilon("pair") == spent, "a refused round charges nothing"
    finally:
        led.close()
