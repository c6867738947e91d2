"""The main job's accuracy gain over 3 seeds, against a baseline trained on the server's labels alone.

For each seed this runs the real main job (``mor demo --seed S``: DP-SGD reward models trained by three client
processes, server + clients over loopback mTLS, router calibration, GRPO with ``secagg`` federated rewards,
evaluation) in its own work folder, so reward models and warm starts are cached per seed between invocations.
Beside it, on the same held-out test examples, it trains the **server-labels-only baseline**: the same tiny
policy supervised on the server's public split (its only labels) for ``--baseline-steps`` steps, i.e. the best
use of the server's labels without the clients. Prints the per-seed table, mean and spread, and writes
``benchmarks/results/alignment_seeds.json``.

    .venv/bin/python benchmarks/bench_alignment_seeds.py              # seeds 0 1 2
    .venv/bin/python benchmarks/bench_alignment_seeds.py --seeds 0 --mode plain
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mor_server.alignment.recipes import DEFAULT_WARM_START, WARM_STARTS  # noqa: E402


def run_demo(seed: int, workdir: Path, mode: str, extra: list[str]) -> dict:
    argv = [sys.executable, "-c", "import sys; from mor_server.apps.cli import mor_main; sys.exit(mor_main())", "demo", "--seed", str(seed), "--workdir", str(workdir),
            "--mode", mode, *extra]
    t0 = time.perf_counter()
    log = workdir.with_suffix(".log")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"mor demo --seed {seed} failed (exit {r.returncode}); see {log}")
    rep = json.loads((workdir / "report" / "demo.json").read_text())
    rep["_wall_s"] = time.perf_counter() - t0
    return rep


def baseline(seed: int, steps: int, eval_size: int, workdir: Path, warm_start: str, lr: float | None = None,
             stage1_from: tuple = ()) -> dict:
    """SFT on the server's public split only, evaluated like the demo (first eval_size held-out test examples): the
    same warm-start recipe as the demo's reference (policy size, public stage 1, SFT batching), with a longer SFT
    (at ``lr``, default SFTConfig's). ``stage1_from``: checkpoints whose public stage 1 it may continue (the demo's
    own reference) instead of pre-training again."""
    from mor_client.data.partition import make_federation_split
    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.evaluate import accuracy
    from dataclasses import replace

    from mor_server.alignment.recipes import recipe_sft, warm_start_recipe
    from mor_server.alignment.warmstart import warm_start_cached

    split = make_federation_split(seed=seed, n_clients=3)
    test = heldout_test(split)[:eval_size]
    tiny, pre = warm_start_recipe(warm_start, seed=seed)
    tag = warm_start.replace("+", "_")
    sft = replace(recipe_sft(warm_start, steps, "proportional"), seed=seed, max_seconds=3600)
    if lr is not None:
        sft = replace(sft, learning_rate=lr)
        tag += f"-lr{lr:g}"
    model, processor, info = warm_start_cached(workdir / f"baseline-{tag}-sft{steps}-seed{seed}", split.server_public,
                                               tiny=tiny, pretrain=pre,
                                               # the server's labels at their best: proportional batches
                                               # (compact recipe: type-balanced SFT-300 62.8%, proportional 73.6%)
                                               sft=sft, progress=False, stage1_from=list(stage1_from))
    return {"sft_steps": info["steps"], "accuracy": accuracy(model, processor, test)}


def type_cell(acc: dict, d: str) -> str:
    """``accuracy % (distinct answers, majority-answer rate %)`` of one question type, ``COLLAPSED`` when the policy
    gives one answer to (nearly) every question of the type (evaluate.answer_diversity's rule)."""
    div = acc.get("diversity", {}).get(d, {})
    cell = f"{100 * acc['by_domain'].get(d, 0):.0f}"
    if div:
        cell += f" ({div['distinct_answers']} ans, maj {100 * div['majority_rate']:.0f})"
        if div.get("collapsed"):
            cell += " COLLAPSED"
    return cell


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--mode", default="secagg", choices=("plain", "secagg", "secagg+dp"))
    ap.add_argument("--warm-start", dest="warm_start", choices=WARM_STARTS, default=DEFAULT_WARM_START,
                    help=f"mor demo --warm-start (the demo's default: {DEFAULT_WARM_START}); the baseline uses the same "
                         "recipe")
    ap.add_argument("--baseline-steps", type=int, default=300,
                    help="SFT steps of the server-labels-only baseline (300 = 32 epochs of the 300-example split)")
    ap.add_argument("--baseline-lr", type=float, default=None,
                    help="learning rate of the baseline's SFT (default SFTConfig's 3e-3; 3e-4 is the server's labels at "
                         "their best for the compact+synthvqa recipes, docs/alignment.md)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "alignment_seeds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "alignment_seeds.json")
    a = ap.parse_args()
    if a.baseline_lr is not None and not (a.baseline_lr > 0 and math.isfinite(a.baseline_lr)):
        raise SystemExit(f"--baseline-lr must be a number > 0, got {a.baseline_lr}")

    rows = []
    for s in a.seeds:
        print(f"seed {s}: mor demo --mode {a.mode} ...", flush=True)
        sub = f"seed{s}" if a.warm_start == "sft" else f"{a.warm_start.replace('+', '_')}-seed{s}"
        rep = run_demo(s, a.workdir / sub, a.mode, ["--warm-start", a.warm_start])
        al = rep["alignment"]
        base = baseline(s, a.baseline_steps, al["sizes"]["test_eval"], a.workdir, a.warm_start, a.baseline_lr,
                        stage1_from=(a.workdir / sub / "alignment" / "reference",))
        row = {"seed": s, "reference": al["accuracy_before"], "aligned": al["accuracy_after"],
               "gain_points": al["accuracy_gain_points"], "baseline_server_labels": base,
               "aligned_minus_baseline_points": 100 * (al["accuracy_after"]["overall"] - base["accuracy"]["overall"]),
               "kl_to_reference": al["kl_to_reference"], "rounds": rep["federation"],
               "reward_models": {n: c.get("heldout_pairwise_accuracy") for n, c in rep["cards"].items()},
               "demo_seconds": rep["seconds"], "grpo_seconds": al["grpo"]["seconds"]}
        rows.append(row)
        print(f"  reference {100 * row['reference']['overall']:.1f}%  aligned {100 * row['aligned']['overall']:.1f}% "
              f"({row['gain_points']:+.1f})  server-labels baseline {100 * base['accuracy']['overall']:.1f}%  "
              f"demo {row['demo_seconds']:.0f} s", flush=True)

    gains = [r["gain_points"] for r in rows]
    over_base = [r["aligned_minus_baseline_points"] for r in rows]
    summary = {"mode": a.mode, "warm_start": a.warm_start, "seeds": a.seeds, "gain_mean": statistics.mean(gains),
               "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0, "gain_min": min(gains),
               "over_baseline_mean": statistics.mean(over_base), "over_baseline_min": min(over_base),
               "baseline_steps": a.baseline_steps, "baseline_lr": a.baseline_lr}
    domains = sorted(rows[0]["reference"]["by_domain"])
    print(f"\n{'seed':<6}{'reference':>10}{'aligned':>9}{'gain':>7}{'baseline':>10}   per type: reference -> aligned "
          "(distinct answers, majority-answer rate)")
    for r in rows:
        per = "  ".join(f"{d} {type_cell(r['reference'], d)} -> {type_cell(r['aligned'], d)}" for d in domains)
        print(f"{r['seed']:<6}{100 * r['reference']['overall']:>9.1f}%{100 * r['aligned']['overall']:>8.1f}%"
              f"{r['gain_points']:>+7.1f}{100 * r['baseline_server_labels']['accuracy']['overall']:>9.1f}%   {per}")
    print(f"gain over the reference: mean {summary['gain_mean']:+.1f} points, std {summary['gain_std']:.1f}, "
          f"min {summary['gain_min']:+.1f}; over the server-labels baseline: mean "
          f"{summary['over_baseline_mean']:+.1f}, min {summary['over_baseline_min']:+.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=1, default=str))
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
