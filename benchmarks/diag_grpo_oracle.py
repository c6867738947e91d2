"""Diagnostic: GRPO on the tiny policy with an *oracle* exact-match reward (the ceiling any reward can give).

Warm-starts (or reuses) the tiny Llava on the server's public split for ``--sft-steps`` steps, then runs TRL's
GRPO whose reward is 1 iff the completion exactly matches the unlabeled prompt's true answer (which the real
server never reads: this is a diagnostic, not a baseline). Prints accuracy before/after on held-out test images
per question type and the training-reward curve; writes ``benchmarks/results/grpo_oracle.json``.

    .venv/bin/python benchmarks/diag_grpo_oracle.py --sft-steps 50 --steps 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft-steps", type=int, default=50)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.02)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-size", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "grpo_oracle")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grpo_oracle.json")
    a = ap.parse_args()

    from mor_client.data.partition import make_federation_split
    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.evaluate import accuracy
    from mor_server.alignment.grpo import GRPORunConfig, make_prompt_dataset, run_grpo
    from mor_server.alignment.policy import TinyLlavaConfig, exact_match
    from mor_server.alignment.warmstart import SFTConfig, warm_start_cached
    from mor_server.alignment.rewards import completion_text

    split = make_federation_split(seed=a.seed, n_clients=3)
    test = heldout_test(split)[: a.eval_size]
    truth = {str(e.example_id): e.answer for e in split.server_unlabeled}
    ref = a.workdir / f"reference-sft{a.sft_steps}-seed{a.seed}"
    model, processor, _ = warm_start_cached(ref, split.server_public, tiny=TinyLlavaConfig(seed=a.seed),
                                            sft=SFTConfig(steps=a.sft_steps, seed=a.seed, max_seconds=3600))
    before = accuracy(model, processor, test)
    curve: list[float] = []

    def oracle(prompts=None, completions=None, example_id=None, **kw):
        r = [float(exact_match(completion_text(c), truth[str(i)])) for c, i in zip(completions, example_id)]
        curve.append(sum(r) / len(r))
        return r

    cfg = GRPORunConfig(output_dir=str(a.workdir / "grpo"), max_steps=a.steps, learning_rate=a.lr, beta=a.beta,
                        temperature=a.temperature, save_steps=0, seed=a.seed)
    t0 = time.perf_counter()
    res = run_grpo(ref, make_prompt_dataset(split.server_unlabeled), [oracle], None, cfg)
    seconds = time.perf_counter() - t0
    after = accuracy(res["model"], res["processor"], test)
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "before": before, "after": after,
           "gain_points": 100 * (after["overall"] - before["overall"]), "grpo_seconds": seconds,
           "train_reward_per_10_steps": [sum(curve[i:i + 10]) / len(curve[i:i + 10]) for i in range(0, len(curve), 10)]}
    print(f"oracle GRPO, SFT-{a.sft_steps} reference, {a.steps} steps ({seconds:.0f} s): "
          f"{100 * before['overall']:.1f}% -> {100 * after['overall']:.1f}% ({out['gain_points']:+.1f}); " +
          ", ".join(f"{d} {100 * before['by_domain'][d]:.0f}->{100 * after['by_domain'].get(d, 0):.0f}"
                    for d in sorted(before["by_domain"])))
    print("training reward per 10 steps:", [round(x, 2) for x in out["train_reward_per_10_steps"]])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
