"""Reward-model folders in Hugging Face conventions: save_pretrained / from_pretrained, config.json, a README.md
model card with the DP guarantee in its YAML metadata, card.json kept, the weights digest checked, folders of the
previous layout (no config.json, no README.md) still loaded, and nothing downloaded."""

import json
import math

import pytest
import torch

from mor.types import ScoringItem
from mor_client.data import make_federation_split
from mor_client.rewards import (CNNRewardModel, RewardModelScorer, RewardModule, TrainConfig, ViTRewardModel,
                                build_model, default_vocab, from_pretrained, read_card, save_pretrained,
                                train_reward_model)
from mor_client.rewards import store

torch.set_num_threads(1)

SMALL = {"cnn": dict(dim=16, channels=8), "vit": dict(dim=16, depth=1, text_depth=1, heads=2),
         "lora": dict(dim=16, layers=1, heads=2, fusion="late", ink=True, stem_channels=8)}


@pytest.fixture(scope="module")
def split():
    return make_federation_split(seed=0, pairs_per_client=[300, 300, 300], max_heldout=40)


@pytest.fixture(scope="module")
def dp_run(split):
    c = split.clients["client0"]
    cfg = TrainConfig(arch="cnn", model_config=SMALL["cnn"], epsilon=8.0, epochs=1, batch_size=100, lr=3e-3,
                      accountant="rdp", grad_sample_mode="hooks", progress=False, seed=0)
    return train_reward_model(c.train, c.heldout, cfg, domain="colour")


def _items(split, n=4):
    ex = [p.example for p in split.clients["client0"].heldout[:n]]
    return [ScoringItem(str(i), e.image, e.question, ("red", "blue", "circle")) for i, e in enumerate(ex)]


def _metadata(readme: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(readme).data.to_dict()


def test_folder_has_the_hugging_face_files_and_the_card_in_its_metadata(dp_run, tmp_path):
    card = save_pretrained(tmp_path / "m", dp_run.model, dp_run.vocab, dp_run.card)
    d = tmp_path / "m"
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "card.json", "config.json", "model.safetensors",
                                                    "vocab.json"]
    config = json.loads((d / "config.json").read_text())
    assert config == {"architecture": "cnn", "vocab_size": len(dp_run.vocab), **dp_run.card["model_config"]}
    assert json.loads((d / "card.json").read_text()) == card  # the card readers' file, unchanged in kind
    meta = _metadata((d / "README.md").read_text())
    assert meta["library_name"] == "mor" and {"reward-model", "differential-privacy", "cnn"} <= set(meta["tags"])
    g = meta["differential_privacy"]
    assert g["dp"] is True and g["epsilon"] == pytest.approx(card["epsilon"]) and card["epsilon"] <= 8.0 + 1e-6
    assert g["delta"] == card["delta"] and g["accountant"] == "rdp" and g["privacy_unit"] == "pair"
    assert g["noise_multiplier"] == pytest.approx(card["noise_multiplier"]) and g["steps"] == card["steps"]
    assert meta["training_pairs"] == card["data_size"] == 300
    assert meta["heldout_pairwise_accuracy"] == pytest.approx(card["heldout_pairwise_accuracy"])
    assert meta["weights_sha256"] == card["weights_sha256"] == store.sha256_file(d / "model.safetensors")
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "pairwise_accuracy", "value": pytest.approx(card["heldout_pairwise_accuracy"]),
                                    "name": "held-out pairwise accuracy"}
    assert "per pair" in (d / "README.md").read_text()


def test_non_private_card_says_so_in_the_metadata(split, tmp_path):
    c = split.clients["client1"]
    cfg = TrainConfig(arch="cnn", model_config=SMALL["cnn"], epsilon=math.inf, epochs=1, batch_size=100,
                      progress=False)
    res = train_reward_model(c.train[:100], c.heldout[:20], cfg)
    save_pretrained(tmp_path / "m", res.model, res.vocab, res.card)
    g = _metadata((tmp_path / "m" / "README.md").read_text())["differential_privacy"]
    assert g["dp"] is False and g["epsilon"] is None and g["delta"] is None  # the card's convention: null = inf
    assert "without differential privacy" in (tmp_path / "m" / "README.md").read_text()


@pytest.mark.parametrize("arch", ["cnn", "vit", "lora"])
def test_each_architecture_round_trips_through_save_pretrained_and_from_pretrained(arch, split, tmp_path):
    vocab = default_vocab()
    torch.manual_seed(0)
    model = build_model(arch, len(vocab), **SMALL[arch]).eval()
    card = model.save_pretrained(tmp_path / arch, vocab=vocab)
    assert card["architecture"] == arch and card["model_config"] == json.loads(json.dumps(model.config))
    assert "not recorded" in (tmp_path / arch / "README.md").read_text()  # a bare card claims no guarantee
    assert _metadata((tmp_path / arch / "README.md").read_text())["differential_privacy"]["dp"] is None
    loaded = RewardModule.from_pretrained(tmp_path / arch)
    assert type(loaded) is type(model) and not loaded.training
    items = _items(split)
    before = RewardModelScorer(model, vocab, card).score(items)
    after = RewardModelScorer.from_pretrained(tmp_path / arch).score(items)
    assert after == before
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_a_subclass_loads_only_its_own_architecture(tmp_path):
    vocab = default_vocab()
    build_model("cnn", len(vocab), **SMALL["cnn"]).save_pretrained(tmp_path / "m", vocab=vocab)
    assert isinstance(CNNRewardModel.from_pretrained(tmp_path / "m"), CNNRewardModel)
    with pytest.raises(ValueError, match="holds a 'cnn' model, not a ViTRewardModel"):
        ViTRewardModel.from_pretrained(tmp_path / "m")


def test_scorer_save_pretrained_writes_a_folder_that_scores_the_same(dp_run, split, tmp_path):
    scorer = RewardModelScorer(dp_run.model, dp_run.vocab, dp_run.card)
    card = scorer.save_pretrained(tmp_path / "m")
    assert read_card(tmp_path / "m") == card
    assert RewardModelScorer.from_pretrained(tmp_path / "m").score(_items(split)) == scorer.score(_items(split))


def test_tampered_weights_are_refused_and_a_card_without_digest_too(dp_run, tmp_path):
    d = tmp_path / "m"
    save_pretrained(d, dp_run.model, dp_run.vocab, dp_run.card)
    state = {k: v.clone() for k, v in dp_run.model.state_dict().items()}
    k0 = next(iter(state))
    state[k0] += 1.0  # a well-formed safetensors file with other weights: only the digest can tell
    from safetensors.torch import save_file

    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="weights_sha256.*mor client train") as e:
        from_pretrained(d)
    assert "\n" not in str(e.value)
    save_pretrained(d, dp_run.model, dp_run.vocab, dp_run.card)
    card = json.loads((d / "card.json").read_text())
    del card["weights_sha256"]  # removing the digest does not switch the check off
    (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="no weights_sha256.*mor client train"):
        from_pretrained(d)


def test_config_that_disagrees_with_the_card_is_refused_in_one_line(dp_run, tmp_path):
    d = tmp_path / "m"
    save_pretrained(d, dp_run.model, dp_run.vocab, dp_run.card)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "architecture": "vit"}))
    with pytest.raises(ValueError, match="config.json disagrees with card.json") as e:
        from_pretrained(d)
    assert "\n" not in str(e.value) and "mor client train" in str(e.value)
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="vocab_size"):
        from_pretrained(d)


def test_a_folder_of_the_previous_layout_still_loads(dp_run, split, tmp_path):
    """The first layout had model.safetensors, vocab.json and card.json only: its card holds the architecture, the
    hyper-parameters and the digest, so it loads as before (and a tampered one is still refused)."""
    d = tmp_path / "old"
    save_pretrained(d, dp_run.model, dp_run.vocab, dp_run.card)
    (d / "config.json").unlink()
    (d / "README.md").unlink()
    card = json.loads((d / "card.json").read_text())
    card.pop("weights_file", None)
    (d / "card.json").write_text(json.dumps(card))
    scorer = RewardModelScorer.from_pretrained(d)
    assert scorer.score(_items(split)) == RewardModelScorer(dp_run.model, dp_run.vocab, dp_run.card).score(_items(split))
    (d / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="weights_sha256"):
        from_pretrained(d)


def test_a_path_that_is_not_a_folder_is_refused_not_downloaded(tmp_path, monkeypatch):
    import huggingface_hub

    def no_download(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("from_pretrained tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(ValueError, match="not a folder.*nothing is downloaded"):
        RewardModelScorer.from_pretrained("some-org/some-reward-model")
    with pytest.raises(ValueError, match="not a folder"):
        RewardModule.from_pretrained(tmp_path / "missing")
