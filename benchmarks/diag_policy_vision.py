"""Diagnostic: can the built-in policy learn to *see* (colour and shape), from what, and can GRPO then climb?

Issue #17 found every aligned policy answering each colour question with one word. This script builds the built-in
tiny Llava, optionally runs stage 1 of the public warm start (:class:`mor_server.alignment.warmstart.PretrainConfig`: vision-tower
classification and/or captioning of synthetic images drawn by the project's own renderer, no privacy cost), then a
supervised stage on one of two public sources, and reports per-type accuracy next to the majority-answer rate and
the number of distinct answers (mor_server.alignment.evaluate) on held-out easy-vqa test images:

* ``--data public``: the server's 300 labelled public examples (what the demo's warm start uses);
* ``--data synthetic``: synthetic VQA examples (mor_client.data.synthetic), ``--synthetic N`` images.

The result is the *reference*. With ``--oracle-grpo-steps`` GRPO then runs from it under an oracle exact-match
reward on the server's unlabeled prompts (the ceiling any reward can give from this reference), and the exploration
of the reference is measured first: per type, the share of prompts for which at least one of G samples (GRPO's
group) is right. Appends one record per run to ``benchmarks/results/policy_vision.json``. Measured figures and the
exact commands: docs/alignment.md, "Can the tiny policy see?". Example:

    .venv/bin/python benchmarks/diag_policy_vision.py --data public --sft-steps 50 --patch 8 --vision-steps 600 \\
        --caption-steps 1000 --oracle-grpo-steps 400
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def exploration(model, processor, items, *, samples: int, temperature: float) -> dict:
    """Per type: share of ``items`` with at least one exact-match answer among ``samples`` sampled completions, and
    the distinct (normalised) answers sampled."""
    import torch

    from mor_server.alignment.evaluate import domain_of
    from mor_server.alignment.policy import exact_match, generate_answers, normalize_answer

    torch.manual_seed(0)
    old = model.generation_config.temperature
    model.generation_config.temperature = temperature
    try:
        rep = [e for e in items for _ in range(samples)]
        ans = generate_answers(model, processor, rep, do_sample=True, max_new_tokens=4)
    finally:
        model.generation_config.temperature = old
    out: dict = {}
    for k, e in enumerate(items):
        d = out.setdefault(domain_of(e), {"prompts": 0, "any_right": 0, "answers": set(), "right_share": 0.0})
        group = ans[k * samples:(k + 1) * samples]
        right = [exact_match(a, e.answer) for a in group]
        d["prompts"] += 1
        d["any_right"] += int(any(right))
        d["right_share"] += sum(right) / samples
        d["answers"].update(normalize_answer(a) for a in group)
    return {t: {"prompts": d["prompts"], "any_right_rate": d["any_right"] / d["prompts"],
                "right_sample_rate": d["right_share"] / d["prompts"], "distinct_sampled": sorted(d["answers"])}
            for t, d in sorted(out.items())}


def caption_accuracy(model, processor, *, seed: int, n: int = 200) -> float:
    """Share of held-out synthetic images (not among stage 1's) whose greedy caption names their colour and shape."""
    from mor_client.data.synthetic_captions import make_caption_examples
    from mor_server.alignment.policy import generate_answers

    items = make_caption_examples(n, seed=10_000 + seed, start=1_000_000)
    caps = generate_answers(model, processor, items, max_new_tokens=5)
    return sum(set(e.answer.split()) - {"a", "the", "is", "there"} <= set(c.split())
               for e, c in zip(items, caps)) / n


def tally(items, answers, group_of) -> dict:
    """Per group (``group_of(item)``): items, exact-match right answers, "yes" answers and accuracy."""
    from mor_server.alignment.policy import exact_match

    out: dict = {}
    for e, a in zip(items, answers):
        g = out.setdefault(group_of(e), {"n": 0, "right": 0, "yes": 0})
        g["n"] += 1
        g["right"] += int(exact_match(a, e.answer))
        g["yes"] += int(exact_match(a, "yes"))
    return {k: {**v, "accuracy": v["right"] / v["n"]} for k, v in sorted(out.items())}


def wording_group(example) -> str:
    """``wording_right`` when a yes/no question's wording alone gives its answer (on easy-vqa an affirmative question
    is mostly "no", a negated one mostly "yes"), else ``wording_wrong``."""
    from mor_client.data.synthetic import is_negated

    return "wording_right" if example.answer == ("yes" if is_negated(example.question) else "no") else "wording_wrong"


def yesno_by_prior(model, processor, items) -> dict:
    """Yes/no accuracy split by :func:`wording_group`. A policy that answers from the wording is right on the first
    group and wrong on the second; one that looks at the image is right on both."""
    from mor_server.alignment.evaluate import domain_of
    from mor_server.alignment.policy import generate_answers

    yn = [e for e in items if domain_of(e) == "yesno"]
    return tally(yn, generate_answers(model, processor, yn, max_new_tokens=4), wording_group) if yn else {}


def stage1_cached(model, processor, cfg, pre):
    """Run stage 1 (``pre``) on ``model`` in place, or load it from ``benchmarks/.cache`` (keyed by the policy's
    and stage 1's settings and the warm-start code version) so the variants after it share it. Returns
    ``(model, summary or None)``."""
    if not pre.enabled():
        return model, None
    import hashlib

    from transformers import LlavaForConditionalGeneration

    from mor_server.alignment.policy import pick_device, save_policy
    from mor_server.alignment.warmstart import WARM_START_CODE_VERSION, pretrain_policy

    key = json.dumps({"tiny": vars(cfg), "pretrain": vars(pre), "code": WARM_START_CODE_VERSION}, sort_keys=True)
    cache = ROOT / "benchmarks" / ".cache" / f"stage1-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (cache / "stage1.json").is_file():
        model = LlavaForConditionalGeneration.from_pretrained(cache, local_files_only=True)
        model.to(pick_device()[0])
        return model, {**json.loads((cache / "stage1.json").read_text()), "cached": True}
    stage1 = pretrain_policy(model, processor, pre)
    save_policy(model, processor, cache)
    (cache / "stage1.json").write_text(json.dumps(stage1))
    return model, stage1


def oracle_grpo(model, processor, split, test, a) -> dict:
    import tempfile

    from mor_server.alignment.evaluate import accuracy, format_accuracy_table
    from mor_server.alignment.grpo import GRPORunConfig, make_prompt_dataset, run_grpo
    from mor_server.alignment.policy import exact_match, save_policy
    from mor_server.alignment.rewards import completion_text

    truth = {str(e.example_id): e.answer for e in split.server_unlabeled}
    curve: list[float] = []

    def oracle(prompts=None, completions=None, example_id=None, **kw):
        r = [float(exact_match(completion_text(c), truth[str(i)])) for c, i in zip(completions, example_id)]
        curve.append(sum(r) / len(r))
        return r

    work = Path(tempfile.mkdtemp(prefix="diag-vision-"))
    save_policy(model, processor, work / "reference")
    cfg = GRPORunConfig(output_dir=str(work / "grpo"), max_steps=a.oracle_grpo_steps, save_steps=0, seed=a.seed,
                        temperature=a.grpo_temperature, num_generations=a.grpo_generations,
                        learning_rate=a.grpo_lr, beta=a.grpo_beta, progress=False)
    t1 = time.perf_counter()
    res = run_grpo(work / "reference", make_prompt_dataset(split.server_unlabeled), [oracle], None, cfg)
    seconds = time.perf_counter() - t1
    after = accuracy(res["model"], res["processor"], test)
    print(f"then oracle GRPO {a.oracle_grpo_steps} steps: overall {100 * after['overall']:.1f}% ({seconds:.0f} s)")
    print(format_accuracy_table(after))
    by_prior = yesno_by_prior(res["model"], res["processor"], test)
    print("yes/no by wording prior:", {k: f"{100 * v['accuracy']:.1f}% of {v['n']}" for k, v in by_prior.items()})
    return {"steps": a.oracle_grpo_steps, "seconds": seconds, "accuracy": after, "yesno_by_wording_prior": by_prior,
            "settings": {"temperature": cfg.temperature, "num_generations": cfg.num_generations,
                         "learning_rate": cfg.learning_rate, "beta": cfg.beta},
            "train_reward_per_20_steps": [sum(curve[i:i + 20]) / len(curve[i:i + 20])
                                          for i in range(0, len(curve), 20)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", choices=("public", "synthetic"), default="synthetic", help="SFT data source")
    ap.add_argument("--synthetic", type=int, default=3000, help="synthetic images (with --data synthetic)")
    ap.add_argument("--types", default="color,shape,yesno", help="question types of the synthetic SFT data")
    ap.add_argument("--balanced-yesno", action="store_true",
                    help="synthetic yes/no questions whose wording says nothing (each asked value present half "
                         "the time)")
    ap.add_argument("--sft-steps", type=int, default=1000, help="supervised steps (batch 32)")
    ap.add_argument("--lr", type=float, default=3e-3, help="SFT learning rate")
    ap.add_argument("--patch", type=int, default=16, help="vision patch size (64x64 images: 16 -> 16 image tokens)")
    ap.add_argument("--text-hidden", type=int, default=64, help="hidden size of the tiny Llama (and vision tower)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the tiny Llama (and of the vision tower)")
    ap.add_argument("--vision-steps", type=int, default=0, help="stage 1: vision-tower classification steps")
    ap.add_argument("--caption-steps", type=int, default=0, help="stage 1: captioning steps on synthetic images")
    ap.add_argument("--match-steps", type=int, default=0, help="stage 1: image-text matching steps (after captions)")
    ap.add_argument("--pretrain-images", type=int, default=2000, help="stage 1: synthetic images")
    ap.add_argument("--oracle-grpo-steps", type=int, default=0,
                    help="after SFT, this many GRPO steps with an oracle exact-match reward on the server's unlabeled "
                         "prompts (the ceiling any reward can give from this reference)")
    ap.add_argument("--grpo-temperature", type=float, default=1.0)
    ap.add_argument("--grpo-generations", type=int, default=8)
    ap.add_argument("--grpo-lr", type=float, default=3e-4)
    ap.add_argument("--grpo-beta", type=float, default=0.05)
    ap.add_argument("--explore-prompts", type=int, default=200,
                    help="unlabeled prompts on which the reference's exploration is measured (0: skip)")
    ap.add_argument("--eval-size", type=int, default=600, help="held-out test examples")
    ap.add_argument("--seed", type=int, default=0, help="federation split seed and policy seeds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "policy_vision.json")
    a = ap.parse_args()

    from mor_client.data.partition import make_federation_split
    from mor_client.data.synthetic import make_synthetic_examples
    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.evaluate import accuracy, format_accuracy_table
    from mor_server.alignment.policy import TinyLlavaConfig, build_tiny_llava, pick_device
    from mor_server.alignment.warmstart import PretrainConfig, SFTConfig, sft_warm_start

    cfg = TinyLlavaConfig(patch_size=a.patch, seed=a.seed, text_hidden=a.text_hidden, vision_hidden=a.text_hidden,
                          intermediate=2 * a.text_hidden, text_layers=a.layers, vision_layers=a.layers)
    model, processor = build_tiny_llava(config=cfg)
    model.to(pick_device()[0])
    split = make_federation_split(seed=a.seed, n_clients=3)
    test = heldout_test(split)[: a.eval_size]
    t0 = time.perf_counter()
    pre = PretrainConfig(vision_steps=a.vision_steps, caption_steps=a.caption_steps, match_steps=a.match_steps, images=a.pretrain_images,
                         seed=a.seed)
    model, stage1 = stage1_cached(model, processor, cfg, pre)
    stage1_s = time.perf_counter() - t0
    if a.caption_steps:
        stage1["heldout_caption_accuracy"] = caption_accuracy(model, processor, seed=a.seed)
        print("stage 1 held-out captions naming both the colour and the shape:", stage1["heldout_caption_accuracy"])
    if a.data == "public":
        data = list(split.server_public)
    else:
        data = make_synthetic_examples(a.synthetic, seed=99, question_types=tuple(a.types.split(",")),
                                       balanced_yesno=a.balanced_yesno)
    info = sft_warm_start(model, processor, data, SFTConfig(steps=a.sft_steps, learning_rate=a.lr, seed=a.seed,
                                                            max_seconds=7200), progress=True)
    seconds = time.perf_counter() - t0
    acc = accuracy(model, processor, test)
    print(f"reference: stage 1 vision {a.vision_steps} + captions {a.caption_steps} + matching {a.match_steps} steps ({stage1_s:.0f} s), "
          f"{a.data} SFT-{a.sft_steps}, patch {a.patch}: overall {100 * acc['overall']:.1f}% ({seconds:.0f} s)")
    print(format_accuracy_table(acc))
    by_prior = yesno_by_prior(model, processor, test)
    print("yes/no by wording prior:", {k: f"{100 * v['accuracy']:.1f}% of {v['n']}" for k, v in by_prior.items()})
    explore = None
    if a.explore_prompts:
        explore = exploration(model, processor, list(split.server_unlabeled)[: a.explore_prompts],
                              samples=a.grpo_generations, temperature=a.grpo_temperature)
        print("reference exploration (>= 1 of G samples right):",
              {t: round(v["any_right_rate"], 2) for t, v in explore.items()})
    grpo = oracle_grpo(model, processor, split, test, a) if a.oracle_grpo_steps else None
    rec = {"args": {k: str(v) for k, v in vars(a).items()}, "stage1": stage1, "stage1_seconds": stage1_s,
           "sft": info, "seconds": seconds, "accuracy": acc,
           "yesno_by_wording_prior": by_prior, "exploration": explore, "oracle_grpo": grpo,
           "parameters": sum(p.numel() for p in model.parameters())}
    runs = json.loads(a.out.read_text()) if a.out.is_file() else []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(runs + [rec], indent=1))
    print(f"results appended to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
