"""Bring your own VLM (issue #13): tiny randomly initialised models of the families pilots use, built from config
with a local tokenizer and the family's own processor, saved with save_pretrained, then aligned end to end through
``AlignmentConfig.policy_path``: load, evaluation, router calibration, two GRPO steps with LoRA (the ``byo``
preset's) on an in-process reward, report."""

from __future__ import annotations

import json

import pytest

from mor_client.data.partition import make_federation_split

from mor_server.alignment.inprocess import InProcessBackend, LabelExpertScorer
from mor_server.alignment.pipeline import AlignmentConfig, run_alignment
from mor_server.alignment.policy import generate_answers, load_policy, save_policy
from mor_server.alignment.families import build_tiny_vlm


@pytest.fixture(scope="module")
def split():
    return make_federation_split(seed=0, public_size=60, unlabeled_size=24, max_heldout=8)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_bring_your_own_family_aligns_end_to_end(family, split, tmp_path):
    from mor_client.data.easyvqa import load_easyvqa

    model, processor = build_tiny_vlm(family)
    folder = save_policy(model, processor, tmp_path / family)
    loaded, proc = load_policy(folder, device="cpu")
    # (without torchvision a Qwen2-VL processor is loaded without its video half; its class name is kept)
    assert type(loaded).__name__ == type(model).__name__ and type(proc).__name__ == type(processor).__name__
    assert len(generate_answers(loaded, proc, list(split.server_public[:4]))) == 4

    known = list(split.server_public) + list(split.server_unlabeled)
    backend = InProcessBackend({f"expert_{d}": LabelExpertScorer(known, [d]) for d in ("color", "shape", "yesno")})
    used = {e.image_id for e in known}
    test = [e for e in load_easyvqa("test") if e.image_id not in used][:16]
    cfg = AlignmentConfig.from_preset(
        "byo", work_dir=str(tmp_path / "run"), policy_path=str(folder), device="cpu", router_steps=50,
        eval_size=16, curve_size=0, progress=False, w_format=0.0,
        grpo={"max_steps": 2, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 3,
              "save_steps": 0, "lora_r": 4, "lora_alpha": 8})
    rep = run_alignment(backend, public=split.server_public, unlabeled=split.server_unlabeled, test=test,
                        config=cfg)
    saved = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert saved["grpo"]["global_step"] == 2 and saved["rounds"]["ok"] == 2 and saved["preset"] == "byo"
    assert saved["warm_start"]["policy_path"] == str(folder) and saved["device"]["device"] == "cpu"
    assert saved["kl_to_reference"] >= -1e-6 and 0.0 <= saved["accuracy_after"]["overall"] <= 1.0
    # LoRA: only adapters trained, and the final folder holds an adapter for the user's base model
    assert all("lora_" in n for n, p in rep["model"].named_parameters() if p.requires_grad)
    assert (tmp_path / "run" / "grpo" / "final" / "adapter_config.json").is_file()
    assert saved["collapse_guard"]["checks"][0]["step"] == 0
