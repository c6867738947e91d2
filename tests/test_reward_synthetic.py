"""Synthetic public pre-training data (mor_client.data.synthetic) and the trainer's synthetic pre-training."""

import io

import pytest
import torch
from PIL import Image

from mor_client.data import load_easyvqa, make_federation_split
from mor_client.data.easyvqa import COLORS, SHAPE_NAMES, answer_type
from mor_client.data.synthetic import (SYNTHETIC_RGB, is_negated, make_synthetic_examples, synthetic_attributes,
                                       synthetic_presence)
from mor_client.rewards import TrainConfig, train_reward_model

torch.set_num_threads(2)


def _colours_in(png: bytes) -> set[str]:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    counts = {rgb: n for n, rgb in img.getcolors(maxcolors=64 * 64)}
    return {name for name, rgb in SYNTHETIC_RGB.items() if counts.get(rgb, 0) >= 4}


def test_synthetic_examples_deterministic_public_and_answerable():
    a = make_synthetic_examples(60, seed=5, questions_per_image=3)
    assert a == make_synthetic_examples(60, seed=5, questions_per_image=3)  # byte-identical from the seed
    assert a[0].image != make_synthetic_examples(1, seed=6)[0].image
    assert make_synthetic_examples(5, seed=5, questions_per_image=3, start=55) == a[-15:]  # index ranges
    assert {e.question_type for e in a} == {"color", "shape", "yesno"}
    # drawn here, never read from easy-vqa: no image bytes in common with the clients' or the server's data
    real = {e.image for s in ("train", "test") for e in load_easyvqa(s)}
    assert not real & {e.image for e in a}
    for e in a:
        assert e.domain == "synthetic" and e.example_id.startswith("synthetic-5-")
        assert answer_type(e.answer) == e.question_type
        assert Image.open(io.BytesIO(e.image)).size == (64, 64)
        index = int(e.image_id.rsplit("-", 1)[1])
        shape, colour = synthetic_attributes(5, index)
        assert _colours_in(e.image) == {colour}  # the pixels agree with the labels
        if e.question_type == "color":
            assert e.answer == colour
        elif e.question_type == "shape":
            assert e.answer == shape
        else:
            asked = next(w.strip("?") for w in e.question.split() if w.strip("?") in COLORS + SHAPE_NAMES)
            assert synthetic_presence(e) == (asked in (shape, colour))
            assert (e.answer == "yes") == ((asked in (shape, colour)) != is_negated(e.question))
    only = make_synthetic_examples(20, seed=0, question_types=("yesno",))
    assert {e.question_type for e in only} == {"yesno"} and {e.answer for e in only} == {"yes", "no"}
    with pytest.raises(ValueError, match="question_types"):
        make_synthetic_examples(1, seed=0, question_types=("count",))


def test_balanced_yesno_questions_carry_no_wording_prior():
    """easy-vqa's format lets the wording answer most yes/no questions (affirmative -> mostly "no"); the balanced
    variant asks about what is in the image half of the time, so "yes" and "no" are equally common whatever the
    wording, and the answers still agree with the pixels. Other question types are unchanged."""
    def wording_rate(examples):
        return sum(e.answer == ("yes" if is_negated(e.question) else "no") for e in examples) / len(examples)

    plain = make_synthetic_examples(2000, seed=3, question_types=("yesno",))
    bal = make_synthetic_examples(2000, seed=3, question_types=("yesno",), balanced_yesno=True)
    assert wording_rate(plain) > 0.75  # the shortcut a policy can learn instead of looking
    assert 0.45 < wording_rate(bal) < 0.55
    assert 0.45 < sum(e.answer == "yes" for e in bal) / len(bal) < 0.55
    assert 0.4 < sum(is_negated(e.question) for e in bal) / len(bal) < 0.6
    for e in bal[:200]:
        shape, colour = synthetic_attributes(3, int(e.image_id.rsplit("-", 1)[1]))
        asked = next(w.strip("?") for w in e.question.split() if w.strip("?") in COLORS + SHAPE_NAMES)
        assert (e.answer == "yes") == ((asked in (shape, colour)) != is_negated(e.question))
    assert [e.image for e in bal] == [e.image for e in plain]  # same images, only the questions differ
    mixed = dict(n_images=30, seed=3, question_types=("color", "shape", "yesno"))
    assert [e for e in make_synthetic_examples(**mixed, balanced_yesno=True) if e.question_type != "yesno"] == \
        [e for e in make_synthetic_examples(**mixed) if e.question_type != "yesno"]


def test_synthetic_pretraining_grounds_a_model_before_any_private_data():
    """A small CNN pre-trained only on synthetic public shape questions already ranks real easy-vqa shape
    pairs well; the DP phase then starts from it (the card records the synthetic pairs)."""
    split = make_federation_split(seed=0, pairs_per_client=[300, 300, 300], max_heldout=200)
    c = split.clients["client1"]  # shape questions
    cfg = TrainConfig(arch="cnn", model_config=dict(dim=32, channels=16), epsilon=8.0, epochs=1, batch_size=150,
                      lr=1e-3, grad_sample_mode="hooks", accountant="rdp", progress=False, synthetic_images=1500,
                      synthetic_questions=2, visual_epochs=3, synthetic_epochs=2, synthetic_batch=64)
    res = train_reward_model(c.train, c.heldout, cfg)
    phases = {h["phase"]: h for h in res.history}
    assert phases["synthetic-data"]["types"] == ["shape"] and phases["synthetic-data"]["pairs"] == 3000
    assert phases["synthetic-visual"]["aligned"] is True
    assert phases["public-only"]["heldout_pairwise_accuracy"] > 0.75  # before any private pair
    assert res.card["synthetic_pretrain_pairs"] == 3000 and res.card["synthetic_pretrain_types"] == ["shape"]
    assert res.card["dp"] is True and res.card["heldout_pairwise_accuracy"] > 0.75


def test_lora_late_layout_freezes_pretrained_parts_and_skips_foreign_domains():
    split = make_federation_split(seed=0, pairs_per_client=[200, 200, 200], max_heldout=50,
                                  include_shapes_client=True)
    cfg = TrainConfig(arch="lora", model_config=dict(dim=32, layers=1, heads=2, lora_r=4, ink=True, fusion="late",
                                                     stem_channels=8),
                      epsilon=8.0, epochs=1, batch_size=100, grad_sample_mode="hooks", accountant="rdp", progress=False,
                      synthetic_images=64, synthetic_questions=2, visual_epochs=1, synthetic_epochs=1)
    c = split.clients["client1"]  # shape questions
    res = train_reward_model(c.train, c.heldout, cfg)
    model = res.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or not n.startswith(("backbone.", "stem.")) for n in trained)
    assert any("lora_" in n for n in trained) and not any(n.startswith("stem.") for n in trained)
    assert res.card["trainable_parameter_count"] < res.card["parameter_count"]
    assert res.card["synthetic_pretrain_pairs"] == 128
    # the procedural shapes client (count / relation questions) has no synthetic counterpart: skipped, noted
    s = split.clients["client2"]
    cfg.epsilon = None
    res2 = train_reward_model(s.train, s.heldout, cfg)
    assert res2.card["synthetic_pretrain_pairs"] == 0
    assert any(h.get("skipped") for h in res2.history if h["phase"] == "synthetic")
    with pytest.raises(ValueError, match="synthetic_types"):
        TrainConfig(synthetic_types=("count",)).validate()
    with pytest.raises(ValueError, match="fusion"):
        from mor_client.rewards import build_model

        build_model("lora", 50, fusion="sideways")
