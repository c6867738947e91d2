"""Diagnostic (issue #17): how the reference's SFT decides what it answers.

Builds the ``compact+synthetic+sft`` recipe's stage 1 once per seed (cached by ``diag_policy_vision.stage1_cached``),
then runs each SFT variant on a copy of it, on the server's public split, and evaluates the result on the 600 held-out
items every ``bench_reward_ablation`` cell is scored on: per type accuracy, distinct answers and the most frequent
answer. Variants are ``STEPS@LR``, with a ``b`` suffix for type-balanced batches (``SFTConfig.balance_types``).
Appends one line per variant (and one for stage 1 alone) to ``benchmarks/results/reference_sft_probe.jsonl``.
Measured figures: docs/alignment.md, "The reference is fragile".

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diag_reference_sft.py 0 50@3e-3 50@3e-3b 200@3e-4
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = ROOT / "benchmarks" / "results" / "reference_sft_probe.jsonl"


def parse_variant(text: str) -> tuple[int, float, bool]:
    """``STEPS@LR[b]`` -> (steps, lr, type-balanced); one line naming the form when it is not that."""
    balanced = text.endswith("b")
    steps, sep, lr = text.removesuffix("b").partition("@")
    try:
        if not sep:
            raise ValueError
        return int(steps), float(lr), balanced
    except ValueError:
        raise SystemExit(f"variant {text!r} is not STEPS@LR or STEPS@LRb (e.g. 50@3e-3, 50@3e-3b)") from None


def main() -> int:
    if len(sys.argv) < 2 or not sys.argv[1].isdigit():
        raise SystemExit("usage: diag_reference_sft.py SEED STEPS@LR[b] ...")
    seed, variants = int(sys.argv[1]), [parse_variant(v) for v in sys.argv[2:]]  # bad variants fail before training

    from bench_reward_ablation import cell_test, recipe, scenario_split
    from diag_policy_vision import stage1_cached

    from mor_server.alignment.evaluate import accuracy
    from mor_server.alignment.policy import build_tiny_llava, policy_vocabulary
    from mor_server.alignment.warmstart import SFTConfig, sft_warm_start

    split = scenario_split("honest", seed)
    test = cell_test(split)
    tiny, pre = recipe("compact+synthetic+sft", seed)
    model, processor = build_tiny_llava(policy_vocabulary(split.server_public), config=tiny)
    model, _ = stage1_cached(model, processor, tiny, pre)

    def show(tag: str, m) -> None:
        r = accuracy(m, processor, test)
        line = {"seed": seed, "variant": tag, "overall": round(100 * r["overall"], 1),
                "by_type": {k: round(100 * v, 1) for k, v in r["by_domain"].items()},
                "top": {k: (v["distinct_answers"], v["top_answer"], round(v["top_answer_share"], 2))
                        for k, v in r["diversity"].items()}}
        print(json.dumps(line), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(line) + "\n")

    show("stage1-only", model)
    for text, (steps, lr, balanced) in zip(sys.argv[2:], variants):
        m = copy.deepcopy(model)
        sft_warm_start(m, processor, split.server_public, SFTConfig(steps=steps, learning_rate=lr, seed=seed,
                                                                    max_seconds=3600, balance_types=balanced),
                       progress=False)
        show(text, m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
