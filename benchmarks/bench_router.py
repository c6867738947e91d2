"""Does the learned router earn its place? Routing strategies compared side by side on held-out public items.

For each seed, the demo's three DP-SGD reward models (cnn on client0 / colour, vit on client1 / shape, lora on
client2 / yes-no, ε = 8, trained by `mor client train` exactly as `mor demo` trains them; cached in --workdir) are
asked, in one in-process calibration round, to score every valid answer of each of the server's labelled public
examples. The router is fitted on 80% of them (the answer-softmax objective GRPO uses) and every strategy ranks the
answers of the other 20%: the learned router, the uniform mixture, the router's top-1 and top-2 clients, oracle
routing by true question type (all weight on the client best for the type on the fit items) and each client alone.

Scenarios: ``honest`` (the three clients), ``adversary`` (plus a fourth client that inverts a label expert over every
question type: an adversarially flipped annotator), ``experts`` (three label experts, one per type: an upper bound on
what trained reward models give) and ``shapes`` (four clients, the fourth holding the procedural shapes family:
``make_federation_split(n_clients=4, include_shapes_client=True)``).

    .venv/bin/python benchmarks/bench_router.py                    # seeds 0 1 2, ~5 min of training on first run
    .venv/bin/python benchmarks/bench_router.py --seeds 0 --scenarios honest

Prints accuracy (right answer ranked first among the valid ones) mean ± spread per strategy, and writes
``benchmarks/results/router.json``.
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

CLIENTS = (("hospital-color", "cnn", "client0"), ("bank-shape", "vit", "client1"), ("lab-yesno", "lora", "client2"))
#: scenario ``shapes``: the same three on a four-client split whose last client holds the procedural shapes family
SHAPES_CLIENTS = CLIENTS + (("studio-shapes", "cnn", "client3"),)
SHAPES_SPLIT_ARGS = ("--n-clients", "4", "--include-shapes-client")
STRATEGIES = ("router", "uniform", "top1", "top2", "oracle_type")


class Inverted:
    """A client that inverts another scorer's preferences (an adversarial annotator)."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, items):
        return [[-v for v in row] for row in self.inner.score(items)]


def trained_models(seed: int, work: Path, *, clients=CLIENTS, split_args: tuple[str, ...] = ("--n-clients", "3"),
                   tag: str = "") -> dict:
    """The clients' reward models of seed ``seed``, trained once by ``mor client train`` (DP-SGD at epsilon 8) and
    cached under ``work/seed<seed><tag>/<name>``; ``split_args`` select the federation split (e.g. a shapes client)."""
    from mor_client.rewards.scorer import RewardModelScorer

    out = {}
    for name, arch, part in clients:
        d = work / f"seed{seed}{tag}" / name
        if not (d / "card.json").is_file():
            argv = [sys.executable, "-m", "mor_client.cli", "train", "--arch", arch, "--partition", part, *split_args,
                    "--epsilon", "8", "--data-seed", str(seed), "--seed", str(seed), "--out", str(d), "--quiet"]
            t0 = time.perf_counter()
            r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"training {name} failed: {r.stderr[-2000:]}")
            print(f"  trained {name} ({arch}, seed {seed}) in {time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = RewardModelScorer.from_dir(d)
    return out


def run(seed: int, scenario: str, work: Path) -> dict:
    from mor_client.data.partition import make_federation_split
    from mor_server.alignment.calibration import calibrate_router
    from mor_server.alignment.features import FeatureExtractor
    from mor_server.alignment.inprocess import InProcessBackend, LabelExpertScorer

    if scenario == "shapes":
        split = make_federation_split(seed=seed, n_clients=4, include_shapes_client=True)
    else:
        split = make_federation_split(seed=seed, n_clients=3)
    public = split.server_public
    known = list(public) + list(split.server_unlabeled)
    if scenario == "experts":
        scorers = {f"expert_{d}": LabelExpertScorer(known, [d]) for d in ("color", "shape", "yesno")}
    elif scenario == "shapes":
        scorers = trained_models(seed, work, clients=SHAPES_CLIENTS, split_args=SHAPES_SPLIT_ARGS, tag="-shapes")
    else:
        scorers = trained_models(seed, work)
        if scenario == "adversary":
            scorers["adversary"] = Inverted(LabelExpertScorer(known, ["color", "shape", "yesno"]))
    t0 = time.perf_counter()
    router = calibrate_router(InProcessBackend(scorers), public, FeatureExtractor(), seed=seed)
    cal = router.calibration
    h = cal["heldout"]
    return {"seed": seed, "scenario": scenario, "seconds": time.perf_counter() - t0, "alpha": cal["alpha"],
            "heldout_items": h["items"], **{s: h[s]["accuracy"] for s in STRATEGIES if s in h},
            "clients": {c: v["accuracy"] for c, v in h["clients"].items()},
            "mean_weight": {c: v["mean_weight"] for c, v in cal["clients"].items()},
            "by_domain": h["by_domain"], "oracle_choice": h["oracle_choice"],
            "weights_by_domain": cal["weights_by_domain"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="+", default=["honest", "adversary", "experts"],
                    choices=["honest", "adversary", "experts", "shapes"])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_router")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "router.json")
    a = ap.parse_args()
    rows = []
    for scenario in a.scenarios:
        for seed in a.seeds:
            r = run(seed, scenario, a.workdir)
            rows.append(r)
            print(f"{scenario:<10} seed {seed}: " + "  ".join(f"{s} {100 * r[s]:.1f}" for s in STRATEGIES if s in r)
                  + "   weights " + ", ".join(f"{c} {w:.2f}" for c, w in r["mean_weight"].items()), flush=True)
    print(f"\nheld-out public items, right answer ranked first among the valid ones (%), mean ± spread over seeds "
          f"{a.seeds}:")
    print(f"{'scenario':<10}" + "".join(f"{s:>16}" for s in STRATEGIES) + f"{'router-uniform':>16}")
    summary = {}
    for scenario in a.scenarios:
        rs = [r for r in rows if r["scenario"] == scenario]
        cell = {}
        line = f"{scenario:<10}"
        for s in STRATEGIES:
            v = [100 * r[s] for r in rs if s in r]
            cell[s] = {"mean": statistics.mean(v), "min": min(v), "max": max(v)} if v else None
            line += f"{cell[s]['mean']:>9.1f} ({max(v) - min(v):4.1f})" if v else f"{'-':>16}"
        gap = [100 * (r["router"] - r["uniform"]) for r in rs]
        cell["router_minus_uniform"] = {"mean": statistics.mean(gap), "min": min(gap), "max": max(gap)}
        line += f"{statistics.mean(gap):>+10.1f} ({max(gap) - min(gap):4.1f})"
        summary[scenario] = cell
        print(line)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": " ".join(["benchmarks/bench_router.py", *sys.argv[1:]]),
                                 "summary": summary, "runs": rows}, indent=1))
    print(f"\nwritten: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
