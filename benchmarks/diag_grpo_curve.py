"""Where does GRPO lose what the reference sees? Per-type held-out accuracy every N GRPO steps (issue #17).

Runs one cell of ``bench_reward_ablation.py`` (the same reference cache, reward, settings and test items; the label
carries GRPO overrides after ``~`` as there) with the pipeline's accuracy curve (overall and per question type) taken
on every evaluated item, not the first 120, every ``--every`` steps. Used to find that oracle GRPO from the ``seeing``
reference lost 10-18 points of shape within its first 25 steps while the vision tower trained, and not when it was
frozen (docs/alignment.md, "Keeping what the reference sees"). Appends one record per run to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diag_grpo_curve.py --warm-start 'seeing~freeze=' --seed 1 \\
        --cache benchmarks/.cache/reward_ablation_seeing_1t
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_reward_ablation as bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm-start", required=True, help="a bench_reward_ablation label, e.g. seeing or 'seeing~freeze='")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--method", default="oracle", help="a bench_reward_ablation reward (oracle, mor, uniform, ...)")
    ap.add_argument("--scenario", default="honest", choices=bench.SCENARIOS)
    ap.add_argument("--every", type=int, default=25, help="GRPO steps between two evaluations")
    ap.add_argument("--cache", type=Path, default=bench.ROOT / "benchmarks" / ".cache" / "reward_ablation")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "grpo_curves.json")
    a = ap.parse_args(argv)
    if a.every < 1:
        raise SystemExit(f"--every must be >= 1, got {a.every}")
    bench.grpo_overrides(a.warm_start)  # a bad label fails before any work
    t0 = time.perf_counter()
    cell = bench.run_cell(a.warm_start, a.scenario, a.method, a.seed, a.cache, bench.recipe_steps(a.warm_start),
                          curve_every=a.every, curve_size=bench.EVAL_ITEMS)
    for p in cell["accuracy_curve"]:
        print(f"  step {p['step']}: {p['accuracy']:.3f} " + " ".join(f"{k} {v:.3f}" for k, v in p["by_domain"].items()))
    rec = {"warm_start": a.warm_start, "scenario": a.scenario, "method": a.method, "seed": a.seed, "every": a.every,
           "seconds": round(time.perf_counter() - t0, 1), "reference_sha256": cell["reference_sha256"],
           "before": {"overall": cell["before"]["overall"], **cell["before"]["by_domain"]},
           "curve": cell["accuracy_curve"], "after": {"overall": cell["after"]["overall"], **cell["after"]["by_domain"]},
           "host": cell["host"]}
    old = json.loads(a.out.read_text()) if a.out.exists() else []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(old + [rec], indent=1))
    print(f"before {rec['before']}\nafter  {rec['after']}\nappended to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
