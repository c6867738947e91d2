"""Stage 1 of the built-in policy's public warm start (issue #17): synthetic captions and the cached warm start."""

from __future__ import annotations

import json

import pytest
import torch

from mor_client.data.easyvqa import COLORS, SHAPE_NAMES
from mor_client.data.synthetic import make_synthetic_examples, synthetic_attributes
from mor_client.data.synthetic_captions import CAPTION_PROMPT, caption, make_caption_examples, matching_text
from mor_server.alignment.policy import TinyLlavaConfig, easyvqa_vocabulary, build_tiny_llava, task_words
from mor_server.alignment.warmstart import PretrainConfig, SFTConfig, pretrain_policy, warm_start_cached

SMALL = TinyLlavaConfig(image_size=32, patch_size=16, vision_hidden=32, text_hidden=32, intermediate=64, heads=2)


def test_captions_are_deterministic_cover_every_colour_and_shape_and_use_known_words():
    a = make_caption_examples(120, seed=5)
    b = make_caption_examples(120, seed=5)
    assert [(e.image, e.question, e.answer) for e in a] == [(e.image, e.question, e.answer) for e in b]
    other = make_caption_examples(120, seed=6)
    assert [e.answer for e in a] != [e.answer for e in other]
    # the caption names what is drawn: the synthetic module's image `index` of `seed`, byte for byte
    drawn = make_synthetic_examples(120, seed=5)
    for i, (e, d) in enumerate(zip(a, drawn)):
        shape, color = synthetic_attributes(5, i)
        assert e.image == d.image and e.question == CAPTION_PROMPT and e.answer == caption(5, i)
        assert set(e.answer.split()) >= {shape, color}
    words = {w for e in a for w in e.answer.split()}
    assert set(COLORS) | set(SHAPE_NAMES) <= words
    assert set(task_words([CAPTION_PROMPT] + [e.answer for e in a])) <= set(easyvqa_vocabulary())  # no <unk>
    assert "?" not in CAPTION_PROMPT  # a caption prompt, never a VQA question
    assert make_caption_examples(3, seed=5, start=2)[0].answer == caption(5, 2)


def test_varied_caption_prompts_decide_what_is_named():
    """``prompts="varied"``: the text after the image decides whether the caption names the whole image, its colour
    or its shape, so a policy pre-trained on them must read the prompt; same images as the fixed prompt's."""
    fixed = make_caption_examples(90, seed=5)
    varied = make_caption_examples(90, seed=5, prompts="varied")
    assert [e.image for e in varied] == [e.image for e in fixed]
    seen = set()
    for i, e in enumerate(varied):
        shape, color = synthetic_attributes(5, i)
        seen.add(e.question)
        expected = {"the image": caption(5, i), "the color": color, "the shape": shape}[e.question]
        assert e.answer == expected, (e.question, e.answer)
        assert "?" not in e.question
    assert seen == {"the image", "the color", "the shape"}
    assert set(task_words([e.question for e in varied] + [e.answer for e in varied])) <= set(easyvqa_vocabulary())
    with pytest.raises(ValueError, match="prompts must be 'fixed' or 'varied'"):
        make_caption_examples(1, seed=5, prompts="questions")


def test_matching_pairs_are_deterministic_balanced_and_labelled_by_what_is_drawn():
    pairs = [matching_text(7, i, d) for i in range(100) for d in range(3)]
    assert pairs == [matching_text(7, i, d) for i in range(100) for d in range(3)]
    assert 0.4 < sum(m for _, m in pairs) / len(pairs) < 0.6
    vocab = set(easyvqa_vocabulary())
    for i in range(100):
        shape, color = synthetic_attributes(7, i)
        for d in range(3):
            text, matched = matching_text(7, i, d)
            named = set(text.split()) - {"shape"}
            assert matched == (named <= {shape, color}), (text, shape, color)
            assert "?" not in text and set(text.split()) <= vocab


def test_pretraining_changes_the_policy_and_rejects_bad_settings():
    import torch

    model, processor = build_tiny_llava(config=SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = pretrain_policy(model, processor, PretrainConfig(vision_steps=2, caption_steps=2, match_steps=2, images=16,
                                                            batch_size=8), progress=False)
    assert info["vision"]["steps"] == 2 and info["captions"]["steps"] == 2 and info["matching"]["steps"] == 2
    after = model.state_dict()
    tower = [k for k in after if "vision_tower" in k]
    lm = [k for k in after if "language_model" in k and "embed" not in k]
    assert any(not torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in lm)
    with pytest.raises(ValueError, match="caption_steps"):
        pretrain_policy(model, processor, PretrainConfig(caption_steps=-1))
    with pytest.raises(ValueError, match="images"):
        pretrain_policy(model, processor, PretrainConfig(caption_steps=1, images=0))


def test_warm_start_cache_key_follows_the_stage1_config(tmp_path):
    public = make_synthetic_examples(16, seed=1)
    sft = SFTConfig(steps=1, batch_size=8)
    pre = PretrainConfig(caption_steps=1, images=8, batch_size=8)
    _, _, first = warm_start_cached(tmp_path / "ref", public, tiny=SMALL, sft=sft, pretrain=pre, progress=False)
    _, _, again = warm_start_cached(tmp_path / "ref", public, tiny=SMALL, sft=sft, pretrain=pre, progress=False)
    assert first["cached"] is False and again["cached"] is True and first["pretrain"]["captions"]["steps"] == 1
    for changed in (PretrainConfig(caption_steps=2, images=8, batch_size=8),
                    PretrainConfig(caption_steps=1, images=8, batch_size=8, seed=1),
                    PretrainConfig(caption_steps=1, vision_steps=1, images=8, batch_size=8),
                    PretrainConfig(caption_steps=1, match_steps=1, images=8, batch_size=8), None):
        _, _, info = warm_start_cached(tmp_path / "ref", public, tiny=SMALL, sft=sft, pretrain=changed,
                                       progress=False)
        assert info["cached"] is False, changed  # another stage-1 config never reuses the cached reference


def test_curriculum_phases_ask_what_they_name_and_the_wording_never_gives_the_answer():
    """The yes/no curriculum (docs/alignment.md, "Why yes/no stops at the wording prior") only works if each phase's
    questions are what it says: affirmative ones naming only the phase's words, a set share negated, and every
    question string answered "yes" about as often as "no" (else the policy learns the wording again)."""
    from collections import Counter, defaultdict

    from mor_client.data.synthetic import curriculum_phase_examples, is_negated, synthetic_presence

    red = curriculum_phase_examples("words:red+circle", 3, pool=3000)
    assert red and all(not is_negated(e.question) and ("red" in e.question or "circle" in e.question) for e in red)
    assert {e.answer for e in red} == {"yes", "no"}
    aff = curriculum_phase_examples("affirmative", 3, pool=3000)
    assert not any(is_negated(e.question) for e in aff) and len(aff) > len(red)
    mixed = curriculum_phase_examples("mixed:0.2", 3, pool=3000)
    share = sum(is_negated(e.question) for e in mixed) / len(mixed)
    assert 0.17 < share < 0.23, share
    by_text: dict[str, Counter] = defaultdict(Counter)
    for e in mixed + aff:
        by_text[e.question][e.answer] += 1
        assert (e.answer == "yes") == (synthetic_presence(e) != is_negated(e.question))
    yes = sum(c["yes"] for c in by_text.values()) / sum(sum(c.values()) for c in by_text.values())
    assert 0.45 < yes < 0.55, yes  # every asked value is in the image half of the time
    assert [e.question for e in curriculum_phase_examples("affirmative", 3, pool=300)] == \
        [e.question for e in curriculum_phase_examples("affirmative", 3, pool=300)]  # deterministic


def test_the_vqa_phase_asks_every_type_and_its_yes_no_wording_never_gives_the_answer():
    """compact+synthvqa's public supervision: colour, shape and yes/no questions in turn, the yes/no ones
    prior-balanced (answered from the image, never from the question string), the rest answered by the image."""
    from collections import Counter

    from mor_client.data.synthetic import curriculum_phase_examples, is_negated, synthetic_presence

    data = curriculum_phase_examples("vqa", 5, pool=3000)
    assert len(data) == 3000 and Counter(e.question_type for e in data) == {"color": 1000, "shape": 1000,
                                                                              "yesno": 1000}
    yn = [e for e in data if e.question_type == "yesno"]
    assert all((e.answer == "yes") == (synthetic_presence(e) != is_negated(e.question)) for e in yn)
    yes = sum(e.answer == "yes" for e in yn) / len(yn)
    assert 0.45 < yes < 0.55, yes
    assert 0.4 < sum(is_negated(e.question) for e in yn) / len(yn) < 0.6  # negated and affirmative alike
    for e in data[:60]:
        shape, color = synthetic_attributes(5, int(e.image_id.rsplit("-", 1)[1]))
        if e.question_type == "color":
            assert e.answer == color
        elif e.question_type == "shape":
            assert e.answer == shape


def test_the_synthvqa_recipe_is_the_measured_one_and_takes_no_sft_on_the_public_split():
    from mor_server.alignment.recipes import WARM_STARTS, recipe_sft, warm_start_recipe

    assert "compact+synthvqa" in WARM_STARTS
    tiny, pre = warm_start_recipe("compact+synthvqa", seed=1)
    assert (tiny.vision_layers, tiny.text_layers, tiny.vision_hidden, tiny.patch_size, tiny.seed) == (3, 3, 128, 8, 1)
    assert (pre.vision_steps, pre.caption_steps, pre.yesno_curriculum, pre.curriculum_lr, pre.seed) == \
        (600, 0, "vqa=2000", 1e-3, 1)
    assert recipe_sft("compact+synthvqa").steps == 0 and recipe_sft("compact+synthvqa", 30).steps == 30
    assert recipe_sft("compact+synthetic+sft").steps == 50


def test_zero_sft_steps_leave_the_policy_as_it_is():
    """``--sft-steps 0`` (compact+synthvqa's default): the reference is stage 1's policy, not one step past it."""
    from mor_server.alignment.warmstart import sft_warm_start

    model, processor = build_tiny_llava(config=SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = sft_warm_start(model, processor, make_synthetic_examples(8, seed=1), SFTConfig(steps=0, batch_size=4),
                          progress=False)
    assert info["steps"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_cached_zero_step_reference_that_ran_a_step_is_rebuilt(tmp_path):
    """Before 2026-12-03 ``steps=0`` ran one SFT step under the same cache key: such a cache is not the reference
    ``--sft-steps 0`` asks for."""
    public = make_synthetic_examples(8, seed=1)
    sft = SFTConfig(steps=0, batch_size=4)
    _, _, first = warm_start_cached(tmp_path / "ref", public, tiny=SMALL, sft=sft, progress=False)
    _, _, again = warm_start_cached(tmp_path / "ref", public, tiny=SMALL, sft=sft, progress=False)
    assert (first["cached"], first["steps"], again["cached"]) == (False, 0, True)
    meta = tmp_path / "ref" / "warm_start.json"
    old = json.loads(meta.read_text())
    old["info"]["steps"] = 1  # what the old code recorded
    meta.write_text(json.dumps(old))
    _, _, rebuilt = warm_start_cached(tmp_path / "ref", public, tiny=SMALL, sft=sft, progress=False)
    assert rebuilt["cached"] is False and rebuilt["steps"] == 0


@pytest.mark.parametrize("spec, fix", [("words:red", "name=steps"), ("words:purple=3", "purple"),
                                       ("mixed:1.5=3", r"\[0, 1\)"), ("negated=3", "unknown curriculum phase"),
                                       ("affirmative=3@fast", "learning rate")])
def test_a_bad_curriculum_fails_before_any_training_naming_the_part(spec, fix):
    import torch

    model, processor = build_tiny_llava(config=SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=fix):
        pretrain_policy(model, processor, PretrainConfig(vision_steps=2, images=8, yesno_curriculum=spec),
                        progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_curriculum_trains_its_phases_in_order_on_fresh_draws(monkeypatch):
    import torch

    from mor_client.data import synthetic

    calls = []
    real = synthetic.curriculum_phase_examples

    def small(phase, data_seed, pool=None):
        calls.append((phase, data_seed))
        return real(phase, data_seed, pool=200)

    monkeypatch.setattr(synthetic, "curriculum_phase_examples", small)
    model, processor = build_tiny_llava(config=SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = pretrain_policy(model, processor, PretrainConfig(yesno_curriculum="words:red=2,mixed:0.2=3@3e-4", seed=4,
                                                            batch_size=8), progress=False)
    assert calls == [("words:red", 20_400), ("mixed:0.2", 20_401)]
    assert [(p["phase"], p["steps"], p["lr"]) for p in info["yesno_curriculum"]] == \
        [("words:red", 2, 1e-3), ("mixed:0.2", 3, 3e-4)]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "language_model" in k)


def test_the_curriculum_recipe_is_the_measured_one():
    from mor_client.data.synthetic import YESNO_CURRICULUM, parse_curriculum
    from mor_server.alignment.recipes import WARM_STARTS, warm_start_recipe

    assert "compact+curriculum+sft" in WARM_STARTS
    tiny, pre = warm_start_recipe("compact+curriculum+sft", seed=2)
    assert (tiny.vision_layers, tiny.text_layers, tiny.vision_hidden, tiny.patch_size, tiny.seed) == (3, 3, 128, 8, 2)
    assert pre.yesno_curriculum == YESNO_CURRICULUM and pre.seed == 2 and pre.vision_steps == 600
    assert [(n, s) for n, s, _ in parse_curriculum(YESNO_CURRICULUM, default_lr=1e-3)] == [
        ("words:red", 400), ("words:red+blue", 400), ("words:red+blue+green+black", 600), ("affirmative", 1500),
        ("mixed:0.2", 1500)]


def test_type_balanced_sft_gives_every_question_type_an_equal_share_of_each_batch(monkeypatch, tmp_path):
    import random

    import mor_server.alignment.warmstart as ws

    # 72% yes/no like easy-vqa's public split: 18 yes/no, 4 colour, 3 shape
    data = make_synthetic_examples(25, seed=3, question_types=("yesno",))[:18] + \
        make_synthetic_examples(4, seed=4, question_types=("color",)) + \
        make_synthetic_examples(3, seed=5, question_types=("shape",))
    draw = ws._type_balanced_order(data, random.Random(0))
    first = [next(draw) for _ in range(30)]
    types = [data[i].question_type for i in first]
    assert all(types.count(t) == 10 for t in ("color", "shape", "yesno"))
    # a type's examples are all used before any is repeated
    assert sorted(i for i in first[:12] if data[i].question_type == "color") == [18, 19, 20, 21]

    seen: list[list[str]] = []
    real = ws.SFTEncoded.batch
    monkeypatch.setattr(ws.SFTEncoded, "batch",
                        lambda self, idx, device: (seen.append([data[i].question_type for i in idx]),
                                                   real(self, idx, device))[1])
    model, processor = build_tiny_llava(task_words([e.question for e in data] + [e.answer for e in data]),
                                        config=SMALL)
    ws.sft_warm_start(model, processor, data, SFTConfig(steps=2, batch_size=9, balance_types=True), progress=False)
    assert [sorted(set(b)) for b in seen] == [["color", "shape", "yesno"]] * 2
    assert all(b.count("yesno") == 3 for b in seen)  # proportional batches would be ~72% yes/no

    # the option is in the cache key when on, and references built before it keep theirs
    sft = SFTConfig(steps=1, batch_size=8)
    _, _, first_info = warm_start_cached(tmp_path / "ref", data, tiny=SMALL, sft=sft, progress=False)
    key = json.loads((tmp_path / "ref" / "warm_start.json").read_text())["key"]
    assert "balance_types" not in key["sft"]
    _, _, info = warm_start_cached(tmp_path / "ref", data, tiny=SMALL,
                                   sft=SFTConfig(steps=1, batch_size=8, balance_types=True), progress=False)
    assert info["cached"] is False


def test_the_sft_time_cap_does_not_make_another_checkpoint_unless_it_stopped_the_sft(tmp_path, monkeypatch):
    # max_seconds is a safety cap: a reference whose SFT ran every step under a 3600 s cap is the demo's (120 s);
    # one the cap cut short is not, and is rebuilt
    import mor_server.alignment.warmstart as ws

    data = make_synthetic_examples(12, seed=3)
    _, _, first = warm_start_cached(tmp_path / "ref", data, tiny=SMALL, sft=SFTConfig(steps=2, batch_size=4,
                                                                                     max_seconds=3600),
                                    progress=False)
    assert first["steps"] == 2 and first["cached"] is False
    # where it was built is recorded: other CPU kernels can train other weights from the same settings
    assert first["host"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert first["host"]["torch"] == torch.__version__ and first["host"]["threads"] >= 1
    _, _, again = warm_start_cached(tmp_path / "ref", data, tiny=SMALL, sft=SFTConfig(steps=2, batch_size=4),
                                    progress=False)
    assert again["cached"] is True
    # other settings still make another checkpoint
    _, _, other = warm_start_cached(tmp_path / "ref", data, tiny=SMALL, sft=SFTConfig(steps=3, batch_size=4),
                                    progress=False)
    assert other["cached"] is False
    # a cached SFT that its cap stopped early (here: 1 of 3 steps) is not reused under another cap
    meta = tmp_path / "ref" / "warm_start.json"
    rec = json.loads(meta.read_text())
    rec["info"]["steps"] = 1
    meta.write_text(json.dumps(rec))
    _, _, rebuilt = warm_start_cached(tmp_path / "ref", data, tiny=SMALL,
                                      sft=SFTConfig(steps=3, batch_size=4, max_seconds=3600), progress=False)
    assert rebuilt["cached"] is False and rebuilt["steps"] == 3
    assert not ws._same_build(None, {"sft": {}}, {}, SFTConfig())


def test_sft_starts_from_a_cached_stage1_and_trains_what_a_build_from_scratch_trains(tmp_path, monkeypatch):
    """``stage1_from``: a warm start with no SFT step is stage 1's checkpoint, so an SFT variant of the same recipe
    (the benchmark's server-labels baseline) starts from it instead of pre-training again, and ends with the
    weights a build from scratch ends with. Another stage-1 config, or a cache that ran SFT steps, is never used."""
    from mor_server.alignment import warmstart

    public = make_synthetic_examples(16, seed=1)
    pre = PretrainConfig(caption_steps=1, images=8, batch_size=8)
    warm_start_cached(tmp_path / "stage1", public, tiny=SMALL, sft=SFTConfig(steps=0), pretrain=pre, progress=False)
    sft = SFTConfig(steps=2, batch_size=8)
    scratch, _, _ = warm_start_cached(tmp_path / "scratch", public, tiny=SMALL, sft=sft, pretrain=pre,
                                      progress=False)

    calls = []
    real = warmstart.pretrain_policy
    monkeypatch.setattr(warmstart, "pretrain_policy", lambda *a, **k: calls.append(1) or real(*a, **k))
    reused, _, info = warm_start_cached(tmp_path / "reused", public, tiny=SMALL, sft=sft, pretrain=pre,
                                        progress=False, stage1_from=[tmp_path / "missing", tmp_path / "stage1"])
    assert calls == [] and info["steps"] == 2 and info["pretrain"]["reused_from"] == str(tmp_path / "stage1")
    assert info["pretrain"]["captions"]["steps"] == 1  # the stage-1 summary travels with the checkpoint
    a, b = scratch.state_dict(), reused.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = PretrainConfig(caption_steps=2, images=8, batch_size=8)
    warm_start_cached(tmp_path / "other", public, tiny=SMALL, sft=sft, pretrain=other, progress=False,
                      stage1_from=[tmp_path / "stage1"])
    assert calls == [1]  # another pre-training config pre-trains again
    warm_start_cached(tmp_path / "again", public, tiny=SMALL, sft=SFTConfig(steps=3, batch_size=8), pretrain=pre,
                      progress=False, stage1_from=[tmp_path / "scratch"])
    assert calls == [1, 1]  # a cache that ran SFT steps is not stage 1
    warm_start_cached(tmp_path / "digest", make_synthetic_examples(16, seed=2), tiny=SMALL, sft=sft, pretrain=pre,
                      progress=False, stage1_from=[tmp_path / "stage1"])
    assert calls == [1, 1, 1]  # nor is one built on other data (its vocabulary may differ)


def test_every_recipe_setting_comes_from_its_one_record_and_an_unknown_name_is_one_line():
    from mor_server.alignment.recipes import RECIPES, WARM_START_HELP, WARM_STARTS, recipe_grpo, recipe_sft, \
        warm_start_recipe

    assert WARM_STARTS == tuple(RECIPES) and all(r.summary in WARM_START_HELP for r in RECIPES.values())
    for name, r in RECIPES.items():
        tiny, pre = warm_start_recipe(name, seed=3)
        assert tiny.seed == 3 and (pre is None) == (r.pretrain is None) and (pre is None or pre.seed == 3)
        assert recipe_sft(name).steps == r.sft_steps and recipe_sft(name).balance_types == r.balanced_sft
        assert recipe_grpo(name) == dict(r.grpo)
    for f in (warm_start_recipe, recipe_sft, recipe_grpo):
        with pytest.raises(ValueError, match="warm start must be one of sft, synthetic"):
            f("compact+nothing")


def test_a_longer_curriculum_continues_a_cached_stage1_and_ends_where_a_build_from_scratch_ends(tmp_path,
                                                                                                  monkeypatch):
    """A recipe whose curriculum adds phases to a cached one (``vqa`` then ``negation``) continues the cached
    checkpoint with the new phases only, and gets the weights a build through every phase gets; a cache whose phases
    are not the beginning of the wanted ones (or whose other stage-1 settings differ) is not continued."""
    from mor_client.data import synthetic
    from mor_server.alignment import warmstart

    real = synthetic.curriculum_phase_examples
    monkeypatch.setattr(synthetic, "curriculum_phase_examples", lambda p, s, pool=None: real(p, s, pool=24))
    public = make_synthetic_examples(16, seed=1)
    base = dict(vision_steps=1, images=8, batch_size=8)
    first = PretrainConfig(**base, yesno_curriculum="vqa=2")
    longer = PretrainConfig(**base, yesno_curriculum="vqa=2,negation=2")
    warm_start_cached(tmp_path / "first", public, tiny=SMALL, sft=SFTConfig(steps=0), pretrain=first, progress=False)
    scratch, _, built = warm_start_cached(tmp_path / "scratch", public, tiny=SMALL, sft=SFTConfig(steps=0),
                                          pretrain=longer, progress=False)
    phases = built["pretrain"]["yesno_curriculum"]
    assert [p["phase"] for p in phases] == ["vqa", "negation"] and "readout_last_batch_accuracy" in phases[1]

    calls = []
    real_vision = warmstart.pretrain_vision_tower
    monkeypatch.setattr(warmstart, "pretrain_vision_tower", lambda *a, **k: calls.append(1) or real_vision(*a, **k))
    cont, _, info = warm_start_cached(tmp_path / "cont", public, tiny=SMALL, sft=SFTConfig(steps=0), pretrain=longer,
                                      progress=False, stage1_from=[tmp_path / "first"])
    assert calls == [] and info["pretrain"]["reused_from"] == str(tmp_path / "first")
    assert [p["phase"] for p in info["pretrain"]["yesno_curriculum"]] == ["vqa", "negation"]
    a, b = scratch.state_dict(), cont.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the pipeline offers its own reference folder: a run of the longer recipe in the work dir of the shorter one
    import shutil

    shutil.copytree(tmp_path / "first", tmp_path / "workdir")
    inplace, _, _ = warm_start_cached(tmp_path / "workdir", public, tiny=SMALL, sft=SFTConfig(steps=0),
                                      pretrain=longer, progress=False, stage1_from=[tmp_path / "workdir"])
    c = inplace.state_dict()
    assert calls == [] and all(torch.equal(a[k], c[k]) for k in a)
    assert json.loads((tmp_path / "workdir" / "warm_start.json").read_text())["key"]["pretrain"][
        "yesno_curriculum"] == "vqa=2,negation=2"

    other = PretrainConfig(**base, yesno_curriculum="negation=2,vqa=2")  # not a continuation of "vqa=2"
    warm_start_cached(tmp_path / "other", public, tiny=SMALL, sft=SFTConfig(steps=0), pretrain=other,
                      progress=False, stage1_from=[tmp_path / "first"])
    assert calls == [1]
    meta = tmp_path / "first" / "warm_start.json"  # a phase a time cap ended early is not the phase asked for
    rec = json.loads(meta.read_text())
    rec["info"]["pretrain"]["yesno_curriculum"][0]["steps"] = 1
    (tmp_path / "capped").mkdir()
    (tmp_path / "capped" / "warm_start.json").write_text(json.dumps(rec))
    assert warmstart.stage1_checkpoint([tmp_path / "capped"], {**json.loads((tmp_path / "cont" / "warm_start.json")
                                                                            .read_text())["key"]}) is None
    wider = PretrainConfig(**{**base, "vision_steps": 2}, yesno_curriculum="vqa=2,negation=2")
    warm_start_cached(tmp_path / "wider", public, tiny=SMALL, sft=SFTConfig(steps=0), pretrain=wider,
                      progress=False, stage1_from=[tmp_path / "first"])
    assert calls == [1, 1]


def test_the_negation_readout_needs_one_target_per_example_and_is_learned():
    """``sft_warm_start(readout=...)``: a wrong number of targets is one line naming the fix; the readout is trained
    (on a set where only the yes/no questions carry a target) and reported."""
    from mor_client.data.synthetic import curriculum_phase_examples, negation_targets
    from mor_server.alignment.warmstart import sft_warm_start

    data = curriculum_phase_examples("negation", 3, pool=60)
    targets = negation_targets(data)
    assert {t for t, e in zip(targets, data) if e.question_type != "yesno"} == {None}
    assert {t for t, e in zip(targets, data) if e.question_type == "yesno"} == {0.0, 1.0}
    model, processor = build_tiny_llava(config=SMALL)
    with pytest.raises(ValueError, match="one per example"):
        sft_warm_start(model, processor, data, SFTConfig(steps=1), readout=targets[:-1], progress=False)
    info = sft_warm_start(model, processor, data, SFTConfig(steps=40, batch_size=16, learning_rate=3e-3),
                          readout=targets, progress=False)
    assert info["steps"] == 40 and info["readout_last_batch_accuracy"] >= 0.75


def test_the_readout_penalises_answers_that_shift_with_its_target():
    """The negation readout must not choose an answer: ``_answer_shift`` is zero when negated and affirmative rows
    give the answer tokens the same mean log-probabilities, grows with a tilt between the groups, and ignores
    tokens that are no row's answer."""
    from mor_server.alignment.warmstart import _answer_shift

    same = torch.tensor([[2.0, 0.0, 5.0], [2.0, 0.0, -5.0], [2.0, 0.0, 5.0], [2.0, 0.0, -5.0]])
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    first = torch.tensor([0, 1, 0, 1])  # answer tokens 0 and 1 ("yes", "no"); token 2 is no row's answer
    assert float(_answer_shift(same, first, y)) == pytest.approx(0.0, abs=1e-6)
    tilted = same.clone()
    tilted[:2, 0] += 1.0  # negated rows lean to token 0
    small = float(_answer_shift(tilted, first, y))
    tilted[:2, 0] += 2.0
    assert 0 < small < float(_answer_shift(tilted, first, y))
    assert float(_answer_shift(tilted, first, torch.ones(4))) == 0.0  # one group only: nothing to compare


def test_the_negation_recipe_is_compact_synthvqa_plus_one_phase_so_it_continues_its_stage1():
    from dataclasses import asdict

    from mor_server.alignment.recipes import recipe_grpo, recipe_sft, warm_start_recipe
    from mor_server.alignment.warmstart import _phases_done

    base_tiny, base = warm_start_recipe("compact+synthvqa", seed=2)
    tiny, neg = warm_start_recipe("compact+synthvqa+negation", seed=2)
    assert tiny == base_tiny and recipe_grpo("compact+synthvqa+negation") == recipe_grpo("compact+synthvqa")
    assert recipe_sft("compact+synthvqa+negation") == recipe_sft("compact+synthvqa")
    assert neg.yesno_curriculum == "vqa=2000,negation=300"
    assert _phases_done(asdict(base), asdict(neg)) == 1  # the cached compact+synthvqa stage 1 is its beginning
    assert _phases_done(asdict(neg), asdict(base)) is None


def test_a_cosine_schedule_ends_a_phase_on_small_steps_and_keeps_old_cache_keys(tmp_path, monkeypatch):
    # lr_schedule="cosine" decays the learning rate to ~0 by the phase's last step (the constant schedule keeps it);
    # the option is in the cache key only when on, so references built before it keep theirs
    import mor_server.alignment.warmstart as ws

    data = make_synthetic_examples(12, seed=3)
    lrs: dict[str, list[float]] = {}
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        lrs.setdefault(spy.tag, []).append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    for tag in ("constant", "cosine"):
        spy.tag = tag
        model, processor = build_tiny_llava(task_words([e.question for e in data] + [e.answer for e in data]),
                                            config=SMALL)
        ws.sft_warm_start(model, processor, data, SFTConfig(steps=40, batch_size=4, learning_rate=1e-3,
                                                            lr_schedule=tag), progress=False)
    assert lrs["constant"][-1] == pytest.approx(1e-3)
    assert lrs["cosine"][19] > 0.9e-3 and lrs["cosine"][-1] < 0.01e-3  # warm-up, then down to ~0
    assert all(a >= b for a, b in zip(lrs["cosine"][20:], lrs["cosine"][21:]))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)

    _, _, first = warm_start_cached(tmp_path / "ref", data, tiny=SMALL, sft=SFTConfig(steps=1, batch_size=4),
                                    progress=False)
    key = json.loads((tmp_path / "ref" / "warm_start.json").read_text())["key"]
    assert first["cached"] is False and "lr_schedule" not in key["sft"]
    _, _, info = warm_start_cached(tmp_path / "ref", data, tiny=SMALL,
                                   sft=SFTConfig(steps=1, batch_size=4, lr_schedule="cosine"), progress=False)
    assert info["cached"] is False
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine, got 'linear'"):
        ws.sft_warm_start(model, processor, data, SFTConfig(steps=1, lr_schedule="linear"), progress=False)
    with pytest.raises(ValueError, match="PretrainConfig.curriculum_schedule must be one of"):
        ws.pretrain_policy(model, processor, PretrainConfig(yesno_curriculum="vqa=1", curriculum_schedule="step"),
                           progress=False)
