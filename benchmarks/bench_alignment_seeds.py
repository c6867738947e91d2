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
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def baseline(seed: int, steps: int, eval_size: int, workdir: Path) -> dict:
    """SFT on the server's public split only, evaluated like the demo (first eval_size held-out test examples)."""
    from mor_client.data.partition import make_federation_split
    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.evaluate import accuracy
    from mor_server.alignment.policy import TinyLlavaConfig
    from mor_server.alignment.warmstart import SFTConfig, warm_start_cached

    split = make_federation_split(seed=seed, n_clients=3)
    test = heldout_test(split)[:eval_size]
    model, processor, info = warm_start_cached(workdir / f"baseline-sft{steps}-seed{seed}", split.server_public,
                                               tiny=TinyLlavaConfig(seed=seed),
                                               sft=SFTConfig(steps=steps, seed=seed, max_seconds=3600),
                                               progress=False)
    return {"sft_steps": info["steps"], "accuracy": accuracy(model, processor, test)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--mode", default="secagg", choices=("plain", "secagg", "secagg+dp"))
    ap.add_argument("--baseline-steps", type=int, default=300,
                    help="SFT steps of the server-labels-only baseline (300 = 32 epochs of the 300-example split)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "alignment_seeds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "alignment_seeds.json")
    a = ap.parse_args()

    rows = []
    for s in a.seeds:
        print(f"seed {s}: mor demo --mode {a.mode} ...", flush=True)
        rep = run_demo(s, a.workdir / f"seed{s}", a.mode, [])
        al = rep["alignment"]
        base = baseline(s, a.baseline_steps, al["sizes"]["test_eval"], a.workdir)
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
    summary = {"mode": a.mode, "seeds": a.seeds, "gain_mean": statistics.mean(gains),
               "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0, "gain_min": min(gains),
               "over_baseline_mean": statistics.mean(over_base), "over_baseline_min": min(over_base),
               "baseline_steps": a.baseline_steps}
    domains = sorted(rows[0]["reference"]["by_domain"])
    print(f"\n{'seed':<6}{'reference':>10}{'aligned':>9}{'gain':>7}{'baseline':>10}   per domain (ref -> aligned)")
    for r in rows:
        per = "  ".join(f"{d} {100 * r['reference']['by_domain'][d]:.0f}->{100 * r['aligned']['by_domain'].get(d, 0):.0f}"
                        for d in domains)
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
