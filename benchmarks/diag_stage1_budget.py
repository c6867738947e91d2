"""Diagnostic (issue #17): how short can the seeing recipe's public stage 1 be?

``compact+synthvqa+negation``'s stage 1 (vision 600 steps, synthetic VQA 2,000, negation 300) takes about 7.4 min
of a 2-core machine, most of the demo's 10-minute budget before reward models and GRPO. This builds the same
family with ``--vision`` vision-tower steps, then trains the ``vqa`` curriculum phase in chunks of ``--chunk``
steps up to ``--vqa`` and evaluates the policy (greedy) on the seed's 600 held-out easy-vqa test items after each
chunk: colour and shape accuracy say when the policy sees. (A chunk restarts AdamW and its 20-step warm-up; the
recipe itself runs the phase in one go, so the figures are a slight under-estimate of what one run reaches.)
Records go to ``benchmarks/results/stage1_budget.json`` (a rerun replaces the same seed and settings).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diag_stage1_budget.py --seed 0 --vision 300 --vqa 1500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "stage1_budget.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision", type=int, default=600)
    ap.add_argument("--vqa", type=int, default=1500)
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the vqa phase")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    if min(a.vision, a.vqa, a.chunk) < 1:
        raise SystemExit("--vision, --vqa and --chunk must be >= 1")

    import torch

    from mor_client.data.partition import make_federation_split
    from mor_client.data.synthetic import curriculum_phase_examples
    from mor_server.alignment.evaluate import accuracy
    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.policy import build_tiny_llava, policy_preset, policy_vocabulary
    from mor_server.alignment.warmstart import PretrainConfig, SFTConfig, pretrain_policy, sft_warm_start

    torch.set_num_threads(max(1, torch.get_num_threads()))
    split = make_federation_split(seed=a.seed, n_clients=3)
    test = list(heldout_test(split))[:600]
    tiny = replace(policy_preset("compact", seed=a.seed), vision_layers=3)
    model, proc = build_tiny_llava(policy_vocabulary(split.server_public), config=tiny)
    t0 = time.perf_counter()
    pretrain_policy(model, proc, PretrainConfig(vision_steps=a.vision, seed=a.seed), progress=False)
    points = [{"vqa_steps": 0, "seconds": round(time.perf_counter() - t0, 1)}]
    # the recipe's vqa phase is phase 0 of its curriculum: the same data seed and SFT seed
    data = curriculum_phase_examples("vqa", 20_000 + 100 * a.seed)
    done = 0
    while done < a.vqa:
        n = min(a.chunk, a.vqa - done)
        sft_warm_start(model, proc, data, SFTConfig(steps=n, batch_size=32, learning_rate=a.lr, seed=a.seed + done,
                                                    max_seconds=7200), progress=False)
        done += n
        train_s = time.perf_counter() - t0
        acc = accuracy(model, proc, test)
        by = acc["by_domain"]
        points.append({"vqa_steps": done, "seconds": round(train_s, 1), "overall": acc["overall"],
                       "color": by.get("color"), "shape": by.get("shape"), "yesno": by.get("yesno"),
                       "collapsed": acc.get("collapsed", [])})
        print(f"seed {a.seed} vision {a.vision} vqa {done}: {train_s:.0f} s, colour {by.get('color'):.3f} "
              f"shape {by.get('shape'):.3f} yes/no {by.get('yesno'):.3f}", flush=True)
        t0 += time.perf_counter() - t0 - train_s  # evaluation time is not training time
    rec = {"seed": a.seed, "vision_steps": a.vision, "vqa_lr": a.lr, "chunk": a.chunk, "points": points,
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    old = json.loads(a.out.read_text()) if a.out.is_file() else {"records": []}
    old["records"] = [r for r in old["records"] if (r["seed"], r["vision_steps"], r["vqa_lr"], r["chunk"])
                      != (a.seed, a.vision, a.lr, a.chunk)] + [rec]
    old["note"] = __doc__.split("\n\n")[1].replace("\n", " ")
    a.out.write_text(json.dumps(old, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
