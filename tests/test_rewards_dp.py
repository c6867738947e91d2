"""Reward models: DP-SGD learning, the privacy unit, LoRA per-sample gradients, model folder, scorer, CLI."""

import argparse
import json
import math

import pytest
import torch
from torch import nn

from mor_client.data import make_federation_split, make_pairs
from mor_client.rewards import (RewardModelScorer, RewardModule, TrainConfig, build_model, default_vocab,
                                encode_pairs, load_model_dir, make_dp_compatible, pairwise_accuracy,
                                register_architecture, save_model_dir, train_reward_model)
from mor_client.rewards.pairs import PairModel
from mor.types import ScoringItem

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def split():
    return make_federation_split(seed=0, pairs_per_client=[1200, 1200, 1200], max_heldout=300)


@pytest.fixture(scope="module")
def dp_run(split):
    """A small fixed-seed DP run (cnn, colour client, epsilon 8, RDP accountant, public pre-training)."""
    c = split.clients["client0"]
    public = make_pairs([e for e in split.server_public if e.question_type == "color"], seed=0,
                        rejected_per_example=8)
    cfg = TrainConfig(arch="cnn", model_config=dict(dim=32, channels=16), epsilon=8.0, epochs=5, batch_size=300,
                      lr=3e-3, accountant="rdp", grad_sample_mode="hooks", progress=False, seed=0,
                      pretrain_epochs=20)
    return train_reward_model(c.train, c.heldout, cfg, public_pairs=public, domain="colour")


def test_dp_training_learns_well_above_chance(dp_run, split):
    card = dp_run.card
    assert card["dp"] is True and card["privacy_unit"] == "pair"
    assert card["heldout_pairwise_accuracy"] > 0.8
    # the colour model knows nothing about shapes: near chance outside its domain
    assert pairwise_accuracy(dp_run.model, dp_run.vocab, split.clients["client1"].heldout) < 0.7


def test_reported_epsilon_matches_independent_pair_level_accounting(dp_run):
    from opacus.accountants.analysis import rdp as rdp_analysis

    card = dp_run.card
    n = card["data_size"]
    # one Opacus row per pair: the sample rate is the expected batch over the number of *pairs*
    assert card["sample_rate"] == pytest.approx(card["batch_size"] / n)
    assert card["steps"] == card["epochs"] * round(1 / card["sample_rate"])
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    r = rdp_analysis.compute_rdp(q=card["sample_rate"], noise_multiplier=card["noise_multiplier"],
                                 steps=card["steps"], orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=r, delta=card["delta"])
    assert card["epsilon"] == pytest.approx(eps, rel=1e-6)
    assert card["epsilon"] <= card["target_epsilon"] + 1e-6
    assert card["delta"] < 1 / n
    # had chosen and rejected been two rows, one pair would move two rows (group of 2): its epsilon is larger
    r2 = rdp_analysis.compute_rdp(q=card["sample_rate"], noise_multiplier=card["noise_multiplier"] / 2,
                                  steps=card["steps"], orders=orders)
    assert rdp_analysis.get_privacy_spent(orders=orders, rdp=r2, delta=card["delta"])[0] > 2 * eps


def test_one_pair_is_one_opacus_row(split):
    from opacus import GradSampleModule

    vocab = default_vocab()
    torch.manual_seed(0)
    model = build_model("cnn", len(vocab), dim=16, channels=8)
    gsm = GradSampleModule(PairModel(model))
    b = encode_pairs(vocab, split.clients["client0"].train[:5])
    out = gsm(b["image"], b["question"], b["question_mask"], b["answers"], b["answers_mask"])
    assert out.shape == (5,)
    out.sum().backward()
    for p in model.parameters():
        assert p.grad_sample.shape[0] == 5  # per-pair gradients, not 10 per-answer ones


@pytest.mark.parametrize("arch,cfg", [("lora", dict(dim=32, layers=1, heads=2, lora_r=4)),
                                      ("lora", dict(dim=32, layers=1, heads=2, lora_r=4, fusion="late", ink=True,
                                                    stem_channels=8)),
                                      ("cnn", dict(dim=16, channels=8)),
                                      ("vit", dict(dim=16, depth=1, text_depth=1, heads=2))])
def test_per_sample_gradients_match_per_example_autograd(split, arch, cfg):
    """Opacus' per-pair gradients (what gets clipped) equal per-example autograd; LoRA included."""
    from opacus import GradSampleModule

    vocab = default_vocab()
    torch.manual_seed(0)
    model = build_model(arch, len(vocab), **cfg)
    ids = {id(p) for p in model.private_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    # make lora_B non-zero so lora_A's gradient is non-trivial
    with torch.no_grad():
        for n_, p in model.named_parameters():
            if "lora_B" in n_:
                p.normal_(0, 0.1)
    if arch == "lora":
        assert any("lora_A" in n_ for n_, p in model.named_parameters() if p.requires_grad)
    b = encode_pairs(vocab, split.clients["client0"].train[:4])
    args = [b[k] for k in ("image", "question", "question_mask", "answers", "answers_mask")]
    gsm = GradSampleModule(PairModel(model), loss_reduction="sum")
    gsm(*args).pow(2).sum().backward()
    per = {n_: p.grad_sample.clone() for n_, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    plain = PairModel(model)
    for i in range(4):
        model.zero_grad(set_to_none=True)
        plain(*[a[i:i + 1] for a in args]).pow(2).sum().backward()
        for n_, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per[n_][i], p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f'{n_}: {m}')


def test_non_private_card_and_folder_roundtrip_scorer(split, tmp_path):
    c = split.clients["client1"]
    cfg = TrainConfig(arch="vit", model_config=dict(dim=16, depth=1, text_depth=1, heads=2), epsilon=math.inf,
                      epochs=1, batch_size=256, progress=False)
    res = train_reward_model(c.train[:512], c.heldout[:64], cfg)
    assert res.card["dp"] is False and res.card["epsilon"] is None
    card = save_model_dir(tmp_path / "m", res.model, res.vocab, res.card)
    for key in ("architecture", "parameter_count", "trainable_parameter_count", "data_size", "epsilon", "delta",
                "noise_multiplier", "sample_rate", "steps", "epochs", "accountant", "privacy_unit",
                "heldout_pairwise_accuracy", "domain", "created_at", "weights_sha256"):
        assert key in card
    assert json.loads((tmp_path / "m" / "card.json").read_text())["weights_sha256"] == card["weights_sha256"]
    scorer = RewardModelScorer.from_dir(tmp_path / "m")
    ex = [p.example for p in c.heldout[:5]]
    items = [ScoringItem(item_id=str(i), image=e.image, question=e.question,
                         candidates=("circle", "triangle", "rectangle")[: 1 + i % 3]) for i, e in enumerate(ex)]
    s1, s2 = scorer.score(items), scorer.score(list(reversed(items)))
    assert [len(r) for r in s1] == [1 + i % 3 for i in range(5)]
    assert s1 == list(reversed(s2))  # deterministic, independent of batch composition
    b = encode_pairs(res.vocab, c.heldout[:1])
    with torch.no_grad():
        direct = res.model(*(b[k] for k in ("image", "question", "question_mask", "answers", "answers_mask")))
    p0 = c.heldout[0]
    got = scorer.score([ScoringItem("x", p0.example.image, p0.example.question, (p0.chosen, p0.rejected))])[0]
    assert got == pytest.approx(direct[0].tolist(), abs=1e-5)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="weights_sha256"):
        load_model_dir(tmp_path / "m")


class WithBN(RewardModule):
    arch = "user-bn"

    def __init__(self, vocab_size, dim=16):
        super().__init__(vocab_size, dim)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.ReLU())
        self.q = nn.Embedding(vocab_size, dim)
        self.proj = nn.Linear(8, dim)

    def encode(self, image, question, question_mask):
        return self.proj(self.conv(image).mean((2, 3))) + self.q(question).mean(1)



def test_batchnorm_refused_or_fixed_and_user_module(split):
    vocab = default_vocab()
    with pytest.raises(ValueError, match="BatchNorm"):
        make_dp_compatible(WithBN(len(vocab)), fix=False)
    register_architecture("user-bn", WithBN)
    c = split.clients["client0"]
    cfg = TrainConfig(arch="user-bn", epsilon=8.0, epochs=1, batch_size=400, progress=False)
    res = train_reward_model(c.train, c.heldout[:50], cfg)  # BatchNorm replaced by GroupNorm
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    assert res.card["architecture"] == "user-bn" and res.card["dp"]
    with pytest.raises(ValueError, match="unknown"):
        build_model("nope", 10)
    with pytest.raises(ValueError, match="epsilon"):
        train_reward_model(c.train, c.heldout, TrainConfig(epsilon=-1, progress=False))


def test_cli_train_and_card(tmp_path, capsys):
    from mor_client.train_cli import register

    parser = argparse.ArgumentParser(prog="mor-client")
    register(parser.add_subparsers(dest="cmd", required=True))
    out = tmp_path / "model"
    args = parser.parse_args(["train", "--arch", "cnn", "--epsilon", "8", "--partition", "client0", "--max-pairs",
                              "400", "--epochs", "1", "--pretrain-epochs", "0", "--quiet", "--out", str(out)])
    assert args.func(args) == 0
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    args = parser.parse_args(["card", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "epsilon" in text and "held-out pairwise accuracy" in text
    assert json.loads((out / "card.json").read_text())["epsilon"] <= 8.0 + 1e-6
    assert json.loads((out / "card.json").read_text())["data_size"] == 400  # --max-pairs -> TrainConfig.max_pairs
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--epsilon", "-3", "--out", str(out)])
    args = parser.parse_args(["train", "--partition", "client9", "--out", str(out), "--quiet"])
    with pytest.raises(ValueError, match="--partition"):
        args.func(args)
