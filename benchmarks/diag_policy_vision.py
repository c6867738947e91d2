"""Diagnostic: can the built-in policy learn to *see* (colour and shape) at all, and from what?

Issue #17 found every aligned policy answering each colour question with one word. This script separates the
policy's capacity from the reward: it trains the built-in tiny Llava **supervised** (the strongest signal there
is) on one of two public sources and reports per-type accuracy next to the majority-answer rate and the number
of distinct answers (mor_server.evaluate), on held-out easy-vqa test images:

* ``--data public``: the server's 300 labelled public examples (what the demo's warm start uses);
* ``--data synthetic``: examples drawn by the project's own Pillow renderer (mor_client.data.synthetic; public
  by construction, no privacy cost), ``--synthetic N`` images.

Optionally the vision tower is first pre-trained alone (``--vision-steps``) to classify the synthetic images'
colour and shape from every patch token. Writes ``benchmarks/results/policy_vision.json`` (appends one record per
run). Example (measured figures in docs/alignment.md, "Can the tiny policy see?"):

    .venv/bin/python benchmarks/diag_policy_vision.py --data synthetic --sft-steps 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pretrain_vision(model, processor, cfg, *, n_images: int, steps: int, seed: int = 777) -> dict:
    """Every patch token of the vision tower (and their mean) classifies the image's colour and shape."""
    import torch

    from mor_client.data.easyvqa import COLORS, SHAPE_NAMES
    from mor_client.data.synthetic import make_synthetic_examples, synthetic_attributes
    from mor_server.policy import to_pil

    ex = make_synthetic_examples(n_images, seed=seed)
    pix = processor.image_processor([to_pil(e.image) for e in ex], return_tensors="pt")["pixel_values"]
    attrs = [synthetic_attributes(seed, i) for i in range(n_images)]
    ys = torch.tensor([SHAPE_NAMES.index(s) for s, _ in attrs])
    yc = torch.tensor([COLORS.index(c) for _, c in attrs])
    tower = model.model.vision_tower
    hc, hs = torch.nn.Linear(cfg.vision_hidden, len(COLORS)), torch.nn.Linear(cfg.vision_hidden, len(SHAPE_NAMES))
    opt = torch.optim.AdamW([*tower.parameters(), *hc.parameters(), *hs.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    ce = torch.nn.functional.cross_entropy
    acc_c = acc_s = 0.0
    for _ in range(steps):
        idx = torch.randint(0, n_images, (64,), generator=gen)
        h = tower(pixel_values=pix[idx]).last_hidden_state
        t = h.shape[1]
        pc, ps = hc(h.mean(1)), hs(h.mean(1))
        loss = (ce(hc(h).flatten(0, 1), yc[idx].repeat_interleave(t)) + ce(hs(h).flatten(0, 1),
                ys[idx].repeat_interleave(t)) + ce(pc, yc[idx]) + ce(ps, ys[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc_c, acc_s = float((pc.argmax(1) == yc[idx]).float().mean()), float((ps.argmax(1) == ys[idx]).float().mean())
    return {"steps": steps, "images": n_images, "last_batch_colour_acc": acc_c, "last_batch_shape_acc": acc_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", choices=("public", "synthetic"), default="synthetic", help="SFT data source")
    ap.add_argument("--synthetic", type=int, default=3000, help="synthetic images (with --data synthetic)")
    ap.add_argument("--types", default="color,shape,yesno", help="question types of the synthetic SFT data")
    ap.add_argument("--sft-steps", type=int, default=1000, help="supervised steps (batch 32)")
    ap.add_argument("--lr", type=float, default=3e-3, help="SFT learning rate")
    ap.add_argument("--patch", type=int, default=16, help="vision patch size (64x64 images: 16 -> 16 image tokens)")
    ap.add_argument("--vision-steps", type=int, default=0, help="vision-tower pre-training steps (0: none)")
    ap.add_argument("--oracle-grpo-steps", type=int, default=0,
                    help="after SFT, this many GRPO steps with an oracle exact-match reward on the server's unlabeled "
                         "prompts (the ceiling any reward can give from this reference; demo GRPO settings)")
    ap.add_argument("--eval-size", type=int, default=600, help="held-out test examples")
    ap.add_argument("--seed", type=int, default=0, help="federation split seed (test images, public split)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "policy_vision.json")
    a = ap.parse_args()

    import torch

    from mor_client.data.partition import make_federation_split
    from mor_client.data.synthetic import make_synthetic_examples
    from mor_server.alignment import heldout_test
    from mor_server.evaluate import accuracy, format_accuracy_table
    from mor_server.policy import SFTConfig, TinyLlavaConfig, build_tiny_llava, sft_warm_start

    cfg = TinyLlavaConfig(patch_size=a.patch, seed=a.seed)
    model, processor = build_tiny_llava(config=cfg)
    split = make_federation_split(seed=a.seed, n_clients=3)
    test = heldout_test(split)[: a.eval_size]
    t0 = time.perf_counter()
    vision = pretrain_vision(model, processor, cfg, n_images=2000, steps=a.vision_steps) if a.vision_steps else None
    if a.data == "public":
        data = list(split.server_public)
    else:
        data = make_synthetic_examples(a.synthetic, seed=99, question_types=tuple(a.types.split(",")))
    info = sft_warm_start(model, processor, data, SFTConfig(steps=a.sft_steps, learning_rate=a.lr, seed=a.seed,
                                                            max_seconds=7200), progress=True)
    seconds = time.perf_counter() - t0
    acc = accuracy(model, processor, test)
    print(f"{a.data} SFT-{a.sft_steps}, patch {a.patch}, vision pre-training {a.vision_steps} steps: "
          f"overall {100 * acc['overall']:.1f}% ({seconds:.0f} s)")
    print(format_accuracy_table(acc))
    grpo = None
    if a.oracle_grpo_steps:
        import tempfile

        from mor_server.grpo import GRPORunConfig, make_prompt_dataset, run_grpo
        from mor_server.policy import exact_match, save_policy
        from mor_server.rewards import completion_text

        truth = {str(e.example_id): e.answer for e in split.server_unlabeled}
        curve: list[float] = []

        def oracle(prompts=None, completions=None, example_id=None, **kw):
            r = [float(exact_match(completion_text(c), truth[str(i)])) for c, i in zip(completions, example_id)]
            curve.append(sum(r) / len(r))
            return r

        work = Path(tempfile.mkdtemp(prefix="diag-vision-"))
        save_policy(model, processor, work / "reference")
        t1 = time.perf_counter()
        res = run_grpo(work / "reference", make_prompt_dataset(split.server_unlabeled), [oracle], None,
                       GRPORunConfig(output_dir=str(work / "grpo"), max_steps=a.oracle_grpo_steps, save_steps=0,
                                     seed=a.seed))
        after = accuracy(res["model"], res["processor"], test)
        grpo = {"steps": a.oracle_grpo_steps, "seconds": time.perf_counter() - t1, "accuracy": after,
                "train_reward_per_20_steps": [sum(curve[i:i + 20]) / len(curve[i:i + 20])
                                              for i in range(0, len(curve), 20)]}
        print(f"then oracle GRPO {a.oracle_grpo_steps} steps: overall {100 * after['overall']:.1f}% "
              f"({grpo['seconds']:.0f} s)")
        print(format_accuracy_table(after))
    rec = {"args": {k: str(v) for k, v in vars(a).items()}, "vision_pretraining": vision, "sft": info,
           "seconds": seconds, "accuracy": acc, "oracle_grpo": grpo,
           "parameters": sum(p.numel() for p in model.parameters())}
    runs = json.loads(a.out.read_text()) if a.out.is_file() else []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(runs + [rec], indent=1))
    print(f"results appended to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
