"""Diagnostic (issue #17): what a benchmark reference knows about yes/no before GRPO.

For each seed, loads the reference ``bench_reward_ablation.py`` built for a warm-start label (it must be built: run a
cell of that label first) and measures
- its accuracy on 600 fresh public synthetic images with **prior-balanced** yes/no questions (the distribution the
  ``vqa`` curriculum phase of ``compact+synthvqa`` trains on) and with easy-vqa's wording (where the wording predicts
  most answers): per type, with the most frequent answer and its share;
- on the 600 held-out easy-vqa test items every cell is scored on, its probability of "no" among {"yes", "no"} per
  yes/no item at sampling temperatures 1.0 / 1.5 / 2.0: the mean, the mean minority share, and the expected share of
  GRPO groups of 8 completions holding both answers (a group with one answer has no advantage to learn from).

Writes ``benchmarks/results/reference_yesno_probe.json`` (one record per seed; a rerun replaces that seed's record).
Measured figures: docs/alignment.md, ``compact+synthvqa``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diag_reference_yesno.py --warm-start compact+synthvqa --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
OUT = ROOT / "benchmarks" / "results" / "reference_yesno_probe.json"
SYNTHETIC_IMAGES = 600
SYNTHETIC_SEED = 4242  # not a seed any recipe trains on (theirs are derived from PretrainConfig.seed)
TEMPERATURES = (1.0, 1.5, 2.0)
GROUP = 8  # the demo's GRPO group size


def group_contrast(p_no: list[float], temperature: float, group: int = GROUP) -> dict:
    """p(no | yes or no) per item at temperature 1 -> the figures at ``temperature`` (pure; unit-tested)."""
    if not p_no:
        return {"mean_p_no": None, "mean_minority": None, "groups_with_both": None}
    out = []
    for p in p_no:
        p = min(max(p, 1e-12), 1 - 1e-12)
        a, b = math.log(p) / temperature, math.log(1 - p) / temperature
        out.append(1 / (1 + math.exp(b - a)))
    minority = [min(q, 1 - q) for q in out]
    return {"mean_p_no": sum(out) / len(out), "mean_minority": sum(minority) / len(minority),
            "groups_with_both": sum(1 - q ** group - (1 - q) ** group for q in out) / len(out)}


def type_summary(acc: dict) -> dict:
    return {t: {"accuracy": round(acc["by_domain"][t], 4), "top_answer": acc["diversity"][t]["top_answer"],
                "top_answer_share": round(acc["diversity"][t]["top_answer_share"], 3)} for t in acc["by_domain"]}


def probe(label: str, seed: int, cache: Path) -> dict:
    import bench_reward_ablation as b
    import torch

    from mor_client.data.synthetic import make_synthetic_examples
    from mor_server.alignment.evaluate import accuracy, answer_logprobs, domain_of
    from mor_server.alignment.policy import load_policy

    torch.manual_seed(0)
    folder = b.reference_dir(label, seed, cache)
    if not (folder / "warm_start.json").is_file():
        raise SystemExit(f"--warm-start {label} --seeds {seed}: no reference built in {folder}; run a cell first "
                         f"(bench_reward_ablation.py --warm-start {label} --seeds {seed} --methods oracle)")
    model, processor = load_policy(folder, device="cpu")[:2]
    t0 = time.perf_counter()
    synthetic = {
        "balanced": make_synthetic_examples(SYNTHETIC_IMAGES, seed=SYNTHETIC_SEED, balanced_yesno=True),
        "easyvqa_wording": make_synthetic_examples(SYNTHETIC_IMAGES, seed=SYNTHETIC_SEED + 1),
    }
    record = {"label": label, "seed": seed, "reference": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT)
              else str(folder), "synthetic": {}}
    for name, items in synthetic.items():
        record["synthetic"][name] = type_summary(accuracy(model, processor, items))
    test = [e for e in b.cell_test(b.scenario_split("honest", seed)) if domain_of(e) == "yesno"]
    yes = answer_logprobs(model, processor, test, ["yes"] * len(test))
    no = answer_logprobs(model, processor, test, ["no"] * len(test))
    p_no = [1 / (1 + math.exp(y - n)) for y, n in zip(yes, no)]
    record["test_yesno"] = {"items": len(test),
                            "mass_on_yes_or_no": sum(math.exp(y) + math.exp(n) for y, n in zip(yes, no)) / len(test),
                            "greedy_no_share": sum(p > 0.5 for p in p_no) / len(test),
                            "by_temperature": {str(t): group_contrast(p_no, t) for t in TEMPERATURES}}
    record["seconds"] = time.perf_counter() - t0
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm-start", default="compact+synthvqa", help="a bench_reward_ablation warm-start label")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "reward_ablation")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    try:
        records = json.loads(a.out.read_text()).get("records", [])
    except (OSError, ValueError):
        records = []
    for seed in a.seeds:
        r = probe(a.warm_start, seed, a.cache)
        records = [x for x in records if (x.get("label"), x.get("seed")) != (a.warm_start, seed)] + [r]
        syn = r["synthetic"]
        by_t = r["test_yesno"]["by_temperature"]
        print(f"{a.warm_start} seed {seed}: synthetic balanced yes/no {100 * syn['balanced']['yesno']['accuracy']:.1f}% "
              f"({syn['balanced']['yesno']['top_answer']!r} {100 * syn['balanced']['yesno']['top_answer_share']:.0f}%), "
              f"easy-vqa wording {100 * syn['easyvqa_wording']['yesno']['accuracy']:.1f}%; test p(no) "
              + ", ".join(f"T={t}: {by_t[t]['mean_p_no']:.3f} (groups with both {100 * by_t[t]['groups_with_both']:.0f}%)"
                          for t in by_t), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"note": "issue #17: what each benchmark reference knows about yes/no before GRPO "
                                         "(diag_reference_yesno.py)", "records": records}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
