"""Reward models: the annotator privacy unit (per-annotator clipping) and empty Poisson batches."""

import pytest
import torch
from torch import nn

from mor_client.data import make_federation_split
from mor_client.rewards import TrainConfig, build_model, default_vocab, encode_pairs, train_reward_model
from mor_client.rewards.pairs import PairModel
from mor_client.rewards.trainer import UnitDataset, collate_units, group_grad_samples, units_of

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def split():
    return make_federation_split(seed=0, pairs_per_client=[600, 600, 600], max_heldout=100, n_annotators=40)


def test_grouped_opacus_gradients_equal_each_annotators_whole_gradient(split):
    """What Opacus clips under unit='annotator' is the gradient of the annotator's whole loss, not a pair's."""
    from opacus import GradSampleModule

    vocab = default_vocab()
    torch.manual_seed(0)
    model = build_model("cnn", len(vocab), dim=16, channels=8)
    pairs = split.clients["client0"].train[:12]
    units = units_of(pairs, "annotator")
    assert sorted(i for u in units for i in u) == list(range(12)) and len(units) < 12  # some share an annotator
    data = UnitDataset(torch.utils.data.TensorDataset(*(encode_pairs(vocab, pairs)[k] for k in (
        "image", "question", "question_mask", "answers", "answers_mask"))), units)
    *batch, unit_of_row = collate_units([data[i] for i in range(len(data))])
    gsm = GradSampleModule(PairModel(model), loss_reduction="sum")
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    out = gsm(*batch)
    loss_fn(out, torch.ones_like(out)).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    group_grad_samples(params, unit_of_row, len(units))
    grouped = [p.grad_sample.clone() for p in params]
    assert all(g.shape[0] == len(units) for g in grouped)
    gsm._close()  # remove Opacus' hooks: plain autograd from here on
    plain = PairModel(model)
    for k in range(len(units)):
        rows = (unit_of_row == k).nonzero().flatten()
        model.zero_grad(set_to_none=True)
        o = plain(*[t[rows] for t in batch])
        loss_fn(o, torch.ones_like(o)).backward()
        for g, p in zip(grouped, params):
            torch.testing.assert_close(g[k], p.grad, rtol=1e-4, atol=1e-6)


def test_annotator_unit_accounting_and_empty_batches(split):
    """ε on the card is the annotator-level ε (sample rate over annotators); with a tiny expected batch many
    Poisson batches are empty and each is still a noised step counted by the accountant."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    c = split.clients["client0"]
    cfg = TrainConfig(arch="cnn", model_config=dict(dim=16, channels=8), epsilon=8.0, epochs=3, batch_size=1,
                      lr=1e-3, accountant="rdp", grad_sample_mode="hooks", unit="annotator", progress=False)
    res = train_reward_model(c.train, c.heldout, cfg)
    card = res.card
    n_annotators = len({p.annotator for p in c.train})
    assert card["privacy_unit"] == "annotator" and card["privacy_units"] == n_annotators
    assert card["data_size"] == len(c.train) > n_annotators
    assert card["sample_rate"] == pytest.approx(1 / n_annotators)
    # every planned step counted, although P(empty batch) = (1 - 1/40)^40 ~ 0.36 per step
    assert card["steps"] == cfg.epochs * n_annotators
    assert card["delta"] < 1 / n_annotators
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    r = rdp_analysis.compute_rdp(q=card["sample_rate"], noise_multiplier=card["noise_multiplier"],
                                 steps=card["steps"], orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=r, delta=card["delta"])
    assert card["epsilon"] == pytest.approx(eps, rel=1e-6) and card["epsilon"] <= 8.0 + 1e-6


def test_annotator_unit_refuses_ghost_clipping_by_name(split):
    c = split.clients["client0"]
    cfg = TrainConfig(arch="cnn", epsilon=8.0, unit="annotator", grad_sample_mode="ghost", progress=False)
    with pytest.raises(ValueError, match="grad_sample_mode='hooks'"):
        train_reward_model(c.train, c.heldout, cfg)
    with pytest.raises(ValueError, match="unit must be one of"):
        TrainConfig(unit="hospital").validate()


def test_cli_trains_at_the_annotator_unit_and_the_card_says_so(tmp_path, capsys):
    import argparse
    import json

    from mor_client.train_cli import register

    parser = argparse.ArgumentParser(prog="mor-client")
    register(parser.add_subparsers(dest="cmd", required=True))
    out = tmp_path / "m"
    args = parser.parse_args(["train", "--arch", "cnn", "--partition", "client0", "--max-pairs", "400", "--epochs", "1",
                              "--pretrain-epochs", "0", "--unit", "annotator", "--n-annotators", "100", "--quiet",
                              "--out", str(out), "--ledger", str(tmp_path / "ledger.sqlite")])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    assert card["privacy_unit"] == "annotator" and 50 < card["privacy_units"] <= 100 and card["data_size"] == 400
    assert f"per annotator ({card['privacy_units']} of them)" in printed
    from privacy.ledger import PrivacyLedger

    with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:  # charged at the annotator unit, not per pair
        # the ledger composes its own history (its accountant may differ from the card's PRV by a hair)
        assert ledger.epsilon("annotator") == pytest.approx(card["epsilon"], rel=1e-2)
        assert ledger.epsilon("pair") == 0.0
