"""Issue #13 on the CPU: the device rule (CUDA + bf16 when present), the device plumbing of warm start, evaluation
and generation, the size presets and their parameter counts, the collapse guard (a forced collapse is stopped or
rolled back), LoRA through TRL's peft_config, and vLLM failing cleanly when it is not installed."""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from mor_client.data.easyvqa import load_easyvqa

from mor_server.alignment.grpo import GRPORunConfig, make_prompt_dataset, run_grpo
from mor_server.alignment.guard import CollapseGuardConfig, collapse_guard_callback, judge_answers
from mor_server.alignment.evaluate import accuracy, kl_to_reference
from mor_server.alignment.pipeline import PRESET_DEFAULTS, AlignmentConfig
from mor_server.alignment.policy import (ImageCache, POLICY_PRESETS, TinyLlavaConfig, autocast_for, build_tiny_llava,
                                         generate_answers, pick_device, preset_parameter_count, save_policy)
from mor_server.alignment.warmstart import SFTConfig, warm_start_cached

SMALL = TinyLlavaConfig(image_size=32, patch_size=16, vision_hidden=32, text_hidden=32, intermediate=64, heads=2)


@pytest.fixture(scope="module")
def examples():
    return load_easyvqa("test")[:96]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, examples):
    """A briefly warm-started policy: it answers with words (a randomly initialised one answers nothing)."""
    model, processor, _ = warm_start_cached(tmp_path_factory.mktemp("policy"), examples, tiny=SMALL,
                                            sft=SFTConfig(steps=40, batch_size=32), progress=False, device="cpu")
    assert sum(1 for a in generate_answers(model, processor, examples[:16]) if a.strip()) > 8
    return save_policy(model, processor, tmp_path_factory.mktemp("policy"))


def test_device_rule_picks_cuda_bf16_when_cuda_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == (torch.device("cuda"), torch.bfloat16)
    # an explicit device wins, its dtype follows the same rule
    assert pick_device("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device("cuda:1") == (torch.device("cuda:1"), torch.bfloat16)
    # GRPO's TRL config follows it: bf16 and no use_cpu when CUDA is picked (TRL itself is not asked to run)
    cfg = GRPORunConfig(output_dir="unused", max_steps=1, prompts_per_step=1, num_generations=2)
    assert pick_device(cfg.device)[0].type == "cuda"
    # mixed precision: bf16 autocast on CUDA, nothing on the CPU (CPU results stay fp32-exact)
    assert isinstance(autocast_for("cpu"), contextlib.nullcontext)
    monkeypatch.undo()  # building a CUDA autocast asks the real torch.cuda (it warns and disables itself here)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ac = autocast_for("cuda")
    assert isinstance(ac, torch.autocast) and ac.fast_dtype == torch.bfloat16


def test_warm_start_and_generation_run_on_the_given_device(examples, tmp_path):
    model, processor, info = warm_start_cached(tmp_path / "ref", examples[:32], tiny=SMALL,
                                               sft=SFTConfig(steps=3, batch_size=8), progress=False, device="cpu")
    assert info["device"] == "cpu" and info["cached"] is False and next(model.parameters()).device.type == "cpu"
    again, _, info2 = warm_start_cached(tmp_path / "ref", examples[:32], tiny=SMALL,
                                        sft=SFTConfig(steps=3, batch_size=8), progress=False, device="cpu")
    assert info2["cached"] is True and next(again.parameters()).device.type == "cpu"
    # one decoded image per item, shared by passes, and the same answers as decoding them per call
    cache = ImageCache()
    images = len({id(e.image) for e in examples[:12]})  # easy-vqa asks several questions about one image
    assert 1 < images < 12
    a = generate_answers(model, processor, examples[:12], batch_size=5, images=cache)
    assert len(cache._pil) == images
    assert generate_answers(model, processor, examples[:12], batch_size=5, images=cache) == a
    assert len(cache._pil) == images
    assert generate_answers(model, processor, examples[:12], batch_size=12) == a


def test_sft_examples_are_encoded_once_and_batches_match_per_batch_encoding(examples):
    """The warm start encodes every example once (images decoded and preprocessed once); a batch from that
    encoding is the very tensors per-batch encoding gives, so CPU training is unchanged."""
    import random

    from mor_server.alignment.warmstart import SFTEncoded, _sft_batch

    _, processor = build_tiny_llava(config=SMALL)
    enc = SFTEncoded(processor, examples, chunk=40)
    assert enc.ok and len(enc.rows) == len(examples) and enc.seq_keys == {"input_ids", "attention_mask", "labels"}
    rng = random.Random(0)
    for _ in range(4):
        idx = rng.sample(range(len(examples)), 16)
        a = enc.batch(idx, "cpu")
        b = _sft_batch(processor, [examples[i] for i in idx], torch.device("cpu"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_presets_have_the_stated_sizes():
    """Counted on the meta device (no memory): 0.24M, 40M and 383M parameters, the sizes of issue #13's run."""
    assert POLICY_PRESETS["tiny"] == TinyLlavaConfig()
    assert preset_parameter_count("tiny") == 243_520
    assert preset_parameter_count("small") == 40_269_696
    assert preset_parameter_count("base") == 383_143_168
    small = POLICY_PRESETS["small"]
    assert (small.vision_hidden, small.vision_layers, small.text_hidden, small.text_layers) == (384, 6, 512, 8)
    assert (small.image_size // small.patch_size) ** 2 == 64
    base = POLICY_PRESETS["base"]
    assert (base.vision_hidden, base.vision_layers, base.text_hidden, base.text_layers) == (768, 12, 1024, 16)
    cfg = AlignmentConfig.from_preset("base", seed=3, grpo={"max_steps": 7})
    assert cfg.preset == "base" and cfg.tiny.text_hidden == 1024 and cfg.tiny.seed == 3
    assert cfg.grpo.max_steps == 7 and cfg.grpo.learning_rate == PRESET_DEFAULTS["base"]["grpo"]["learning_rate"]
    # larger policies get lower learning rates than the tiny one's 3e-4 (which collapsed the 383M policy)
    assert AlignmentConfig.from_preset("tiny").grpo.learning_rate == GRPORunConfig().learning_rate
    for name in ("small", "base", "byo"):
        assert AlignmentConfig.from_preset(name).grpo.learning_rate <= 5e-5
    assert AlignmentConfig.from_preset("byo").grpo.lora_r > 0
    with pytest.raises(ValueError, match="unknown preset"):
        AlignmentConfig.from_preset("huge")


def test_judge_answers_flags_empty_and_one_answer_per_type():
    cfg = CollapseGuardConfig()
    doms = ["color"] * 4 + ["shape"] * 4
    base = judge_answers(["red", "blue", "red", "green", "circle", "circle", "triangle", "rectangle"], doms, None, cfg)
    assert base["distinct_by_type"] == {"color": 3, "shape": 3} and not base["degenerate"]
    ok = judge_answers(["red", "red", "red", "blue", "circle", "circle", "circle", "circle"], doms, base, cfg)
    assert not ok["degenerate"] and ok["collapsed_types"] == ["shape"]  # one type collapsed, not all of them
    same = judge_answers(["red"] * 4 + ["circle"] * 4, doms, base, cfg)
    assert same["degenerate"] and "one answer per question type" in same["reason"]
    # only one type varied at the start: its collapse alone is not judged (min_varied_types=2)
    one = judge_answers(["red", "blue", "red", "green"] + ["circle"] * 4, doms, None, cfg)
    assert not judge_answers(["red"] * 4 + ["circle"] * 4, doms, one, cfg)["degenerate"]
    empty = judge_answers(["", "</s>", "", "red", "", "", "circle", "."], doms, base, cfg)
    assert empty["degenerate"] and empty["empty_share"] == 0.75 and "empty" in empty["reason"]
    # a policy that answered nothing from the start has not degenerated (nothing to guard)
    silent = judge_answers([""] * 8, doms, None, cfg)
    assert not judge_answers([""] * 8, doms, silent, cfg)["degenerate"]


def _zero_final_norm_at(step: int):
    """A callback that breaks the policy at ``step``: the final RMSNorm's weights set to 0 make every hidden state
    0, so every logit is 0 and greedy decoding picks token 0 (the pad token): empty answers from then on."""
    from transformers import TrainerCallback

    class Break(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == step:
                with torch.no_grad():
                    model.model.language_model.norm.weight.zero_()

    return Break()


def _constant_reward(prompts=None, completions=None, **kw):
    return [0.5 + 0.01 * (i % 3) for i in range(len(completions))]


@pytest.mark.parametrize("action", ["stop", "rollback"])
def test_collapse_guard_stops_a_collapsed_run(action, examples, policy_dir, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(policy_dir, local_files_only=True)
    guard = collapse_guard_callback(processor, examples[:16], CollapseGuardConfig(every=1, action=action))
    cfg = GRPORunConfig(output_dir=str(tmp_path / "run"), max_steps=6, prompts_per_step=2, num_generations=2,
                        max_completion_length=2, save_steps=0, progress=False, device="cpu",
                        learning_rate=1e-7)  # GRPO itself barely moves the policy: only the injected fault does
    res = run_grpo(policy_dir, make_prompt_dataset(examples[:16]), [_constant_reward], None, cfg,
                   callbacks=[_zero_final_norm_at(2), guard])
    # without the guard the run goes on to step 6 with empty answers; with it, it stops at the broken step
    assert res["global_step"] == 2, res["global_step"]
    assert guard.stopped["step"] == 2 and "empty" in guard.stopped["reason"]
    assert [c["step"] for c in guard.checks] == [0, 1, 2] and not guard.checks[1]["degenerate"]
    norm = res["model"].model.language_model.norm.weight
    if action == "rollback":
        assert guard.stopped["rolled_back_to"] == 1 and bool((norm != 0).all())
        answers = generate_answers(res["model"], processor, examples[:16])
        assert sum(1 for a in answers if a.strip()) > 8  # the last good weights answer again
    else:
        assert guard.stopped["rolled_back_to"] is None and bool((norm == 0).all())
    assert guard.summary()["stopped"] == guard.stopped


def test_grpo_with_lora_trains_adapters_only(examples, policy_dir, tmp_path):
    pytest.importorskip("peft")
    cfg = GRPORunConfig(output_dir=str(tmp_path / "lora"), max_steps=1, prompts_per_step=2, num_generations=2,
                        max_completion_length=2, save_steps=0, progress=False, lora_r=4, lora_alpha=8,
                        device="cpu")
    res = run_grpo(policy_dir, make_prompt_dataset(examples[:8]), [_constant_reward], None, cfg)
    trainable = [n for n, p in res["model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert (tmp_path / "lora" / "final" / "adapter_config.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_use_vllm_without_vllm_fails_cleanly():
    with pytest.raises(ValueError, match="vllm package"):
        GRPORunConfig(use_vllm=True).validate()
    with pytest.raises(ValueError, match="lora_r"):
        GRPORunConfig(lora_r=-1).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU path is tested above)")
def test_on_cuda_the_warm_start_evaluation_and_grpo_run_on_the_gpu(examples, tmp_path):
    """Only where CUDA is present: the default device rule puts every stage on the GPU (bf16 GRPO)."""
    model, processor, info = warm_start_cached(tmp_path / "ref", examples, tiny=SMALL,
                                               sft=SFTConfig(steps=5, batch_size=16), progress=False)
    assert info["device"].startswith("cuda") and next(model.parameters()).device.type == "cuda"
    acc = accuracy(model, processor, examples[:32])
    assert 0.0 <= acc["overall"] <= 1.0
    assert kl_to_reference(model, model, processor, examples[:16]) == pytest.approx(0.0, abs=1e-3)
    cfg = GRPORunConfig(output_dir=str(tmp_path / "run"), max_steps=2, prompts_per_step=2, num_generations=2,
                        max_completion_length=2, save_steps=0, progress=False)
    res = run_grpo(tmp_path / "ref", make_prompt_dataset(examples[:16]), [_constant_reward], None, cfg)
    p = next(res["model"].parameters())
    assert res["global_step"] == 2 and p.device.type == "cuda" and p.dtype == torch.bfloat16
