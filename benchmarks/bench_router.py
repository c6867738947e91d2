"""Does the learned router earn its place? Routing strategies compared side by side on held-out public items.

For each seed, the demo's three DP-SGD reward models (cnn on client0 / colour, vit on client1 / shape, lora on
client2 / yes-no, ε = 8, trained by `mor client train` exactly as `mor demo` trains them; cached in --workdir) are
asked, in one in-process calibration round, to score every valid answer of each of the server's labelled public
examples. The router is fitted on 80% of them (the answer-softmax objective GRPO uses) and every strategy ranks the
answers of the other 20%: the learned router, the uniform mixture, the router's top-1 and top-2 clients, oracle
routing by true question type (all weight on the client best for the type on the fit items) and each client alone.

Scenarios: ``honest`` (the three clients), ``adversary`` (plus a fourth client that inverts a label expert over every
question type: an adversarially flipped annotator; its 0/1 scores are quiet next to the trained models'),
``inflating`` (that adversary with its scores x100), ``flipped`` (a fourth client training the yes/no client's model on
the same data with every preference flipped, DP-SGD at epsilon 8: as loud as the honest clients), ``noisy-color`` and
``noisy-yesno`` (the three clients with the colour or the yes/no one trained on its data with every preference flipped:
a noisy client that no honest client of its type outvotes), ``experts`` (three label experts, one per type: an upper bound on
what trained reward models give) and ``shapes`` (four clients, the fourth holding the procedural shapes family:
``make_federation_split(n_clients=4, include_shapes_client=True)``).

Feature sets (``--features``, ``AlignmentConfig.router_features``) are compared side by side on the same scoring
rounds: ``type`` (the question's answer type under the answer schema; the default), ``image+question`` (pooled pixels
and hashed words; the default before issue #17's measurement) and ``type+question``. Besides the 60 held-out public
items, every router is also measured on the server's GRPO prompt pool (600 items a seed, the prompts the reward is
used on; their labels are read by this benchmark only).

    .venv/bin/python benchmarks/bench_router.py                    # seeds 0 1 2, ~5 min of training on first run
    .venv/bin/python benchmarks/bench_router.py --seeds 0 --scenarios honest --features type

Prints accuracy (right answer ranked first among the valid ones) mean (spread) per strategy, then who decides each
question type's mixed score on the pool under the router's and under uniform weights
(``router.effective_shares``: a weight times the spread of that client's scores, normalised), and writes
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
#: scenario ``flipped``: a fourth institution holding the yes/no client's data with every preference flipped, training
#: its reward model exactly as the others do (DP-SGD, epsilon 8): a noisy client as loud as the honest ones
FLIPPED_CLIENT = (("flipped-yesno", "lora", "client2"),)
FLIPPED_SPLIT_ARGS = ("--n-clients", "3", "--flip-fraction", "1.0")
#: scenarios ``noisy-color`` / ``noisy-yesno``: the demo's three clients, one of them noisy: that institution's
#: annotators flipped every preference and its reward model is trained on them exactly as the others are (DP-SGD,
#: epsilon 8). Unlike ``flipped`` no honest client covers its question type, so its inverted signal is the loudest
#: one there: (the honest client it replaces, the noisy one)
NOISY = {"noisy-color": ("hospital-color", ("flipped-color", "cnn", "client0")),
         "noisy-yesno": ("lab-yesno", FLIPPED_CLIENT[0])}


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


FEATURES = {"type": ("type",), "image+question": ("image", "question"), "type+question": ("type", "question")}


class Scaled:
    """A client that multiplies another scorer's scores (an adversary inflating its scores within the bound)."""

    def __init__(self, inner, factor: float):
        self.inner, self.factor = inner, factor

    def score(self, items):
        return [[self.factor * v for v in row] for row in self.inner.score(items)]


INFLATE = 100.0  # the inflating adversary's score scale: the honest models' scores spread 17-37 over an item's answers, the
# label expert's 1; the federation's declared plain-score bound is 1000


def scenario_scorers(seed: int, scenario: str, work: Path):
    """``(split, scorers)`` of a scenario."""
    from mor_client.data.partition import make_federation_split
    from mor_server.alignment.inprocess import LabelExpertScorer

    if scenario == "shapes":
        split = make_federation_split(seed=seed, n_clients=4, include_shapes_client=True)
    else:
        split = make_federation_split(seed=seed, n_clients=3)
    known = list(split.server_public) + list(split.server_unlabeled)
    if scenario == "experts":
        return split, {f"expert_{d}": LabelExpertScorer(known, [d]) for d in ("color", "shape", "yesno")}
    return split, client_scorers(seed, scenario, work, known)


def client_scorers(seed: int, scenario: str, work: Path, known) -> dict:
    """The clients of a scenario (all but ``experts``): the trained reward models (the shapes split's for ``shapes``),
    plus the fourth client of ``adversary``, ``inflating`` and ``flipped``, or one flipped in place of an honest one
    (``noisy-color``, ``noisy-yesno``); ``known``: the labelled examples the
    inverted label expert holds. Shared with bench_reward_ablation."""
    from mor_server.alignment.inprocess import LabelExpertScorer

    if scenario == "shapes":
        return trained_models(seed, work, clients=SHAPES_CLIENTS, split_args=SHAPES_SPLIT_ARGS, tag="-shapes")
    if scenario in NOISY:
        honest, noisy = NOISY[scenario]
        scorers = trained_models(seed, work, clients=tuple(c for c in CLIENTS if c[0] != honest))
        scorers.update(trained_models(seed, work, clients=(noisy,), split_args=FLIPPED_SPLIT_ARGS))
        return scorers
    scorers = trained_models(seed, work)
    if scenario == "flipped":
        scorers.update(trained_models(seed, work, clients=FLIPPED_CLIENT, split_args=FLIPPED_SPLIT_ARGS))
    if scenario in ("adversary", "inflating"):
        scorers["adversary"] = Inverted(LabelExpertScorer(known, ["color", "shape", "yesno"]))
    if scenario == "inflating":
        scorers["adversary"] = Scaled(scorers["adversary"], INFLATE)
    return scorers


def run(seed: int, scenario: str, work: Path, features: list[str]) -> list[dict]:
    """One row per feature set: the router fitted on 80% of the public items, every strategy compared on the other
    20% (``heldout``) and on the server's GRPO prompt pool (``pool``: the prompts the reward is actually used on;
    their labels are read here only to measure, never by the server)."""
    from mor.types import ScoringItem
    from mor_server.alignment.calibration import answer_schema, calibrate_router, calibration_items, compare_routings
    from mor_server.alignment.evaluate import domain_of
    from mor_server.alignment.features import FeatureExtractor
    from mor_server.alignment.inprocess import InProcessBackend
    from mor_server.alignment.router import effective_shares

    split, scorers = scenario_scorers(seed, scenario, work)
    public = split.server_public
    backend = InProcessBackend(scorers)
    schema = answer_schema(public, split.server_unlabeled)
    pool = calibration_items(split.server_unlabeled, schema)
    items = [ScoringItem(item_id=f"pool-{i}", image=e.image, question=e.question, candidates=tuple(c))
             for i, (e, c, _) in enumerate(pool)]
    pool_scores = backend.client_scores(items, purpose="benchmark")
    rows = []
    for name in features:
        fx = FeatureExtractor(parts=FEATURES[name], schema=schema)
        t0 = time.perf_counter()
        router = calibrate_router(backend, public, fx, seed=seed, schema=schema)
        seconds = time.perf_counter() - t0
        cal = router.calibration
        h = cal["heldout"]
        feats = fx.batch([e.image for e, _, _ in pool], [e.question for e, _, _ in pool])
        doms = [domain_of(e) for e, _, _ in pool]
        p = compare_routings(router, feats, pool_scores, [t for _, _, t in pool], doms, h["oracle_choice"])
        # who decides each type's mixed score on the pool: weights times the spread of each client's scores
        k, w = len(pool_scores), router.weights(feats, list(pool_scores))
        effective = {"router": effective_shares(w, pool_scores, doms),
                     "uniform": effective_shares({c: [1.0 / k] * len(doms) for c in pool_scores}, pool_scores, doms)}
        rows.append({"seed": seed, "scenario": scenario, "features": name, "seconds": seconds, "alpha": cal["alpha"],
                     "heldout_items": h["items"], **{s: h[s]["accuracy"] for s in STRATEGIES if s in h},
                     "pool_items": p["items"], "pool": {s: p[s]["accuracy"] for s in STRATEGIES if s in p},
                     "pool_by_domain": p["by_domain"],
                     "pool_clients": {c: v["accuracy"] for c, v in p["clients"].items()},
                     "clients": {c: v["accuracy"] for c, v in h["clients"].items()},
                     "mean_weight": {c: v["mean_weight"] for c, v in cal["clients"].items()},
                     "by_domain": h["by_domain"], "oracle_choice": h["oracle_choice"],
                     "weights_by_domain": cal["weights_by_domain"], "pool_effective_by_domain": effective,
                     # the router's abstention (AlignmentConfig.router_abstain_z, default 2.0): per type, how often
                     # the routed mixture ranks the right answer above a wrong one on the calibration items
                     "trust": cal.get("trust"),
                     "abstains_on": sorted(d for d, v in (cal.get("trust") or {}).items() if not v["trusted"])})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="+", default=["honest", "adversary", "inflating", "experts"],
                    choices=["honest", "adversary", "inflating", "flipped", *NOISY, "experts", "shapes"])
    ap.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES),
                    help="router feature sets compared side by side (AlignmentConfig.router_features; default: all)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "reward_ablation" / "reward_models",
                    help="where the clients' reward models are trained and cached (shared with bench_reward_ablation)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "router.json")
    a = ap.parse_args()
    rows = []
    for scenario in a.scenarios:
        for seed in a.seeds:
            for r in run(seed, scenario, a.workdir, a.features):
                rows.append(r)
                print(f"{scenario:<10} seed {seed} {r['features']:<15} pool: "
                      + "  ".join(f"{s} {100 * r['pool'][s]:.1f}" for s in STRATEGIES if s in r["pool"])
                      + "   weights " + ", ".join(f"{c} {w:.2f}" for c, w in r["mean_weight"].items()), flush=True)
    summary = {}
    for where, label in (("pool", "the server's GRPO prompt pool (600 items a seed)"),
                         ("heldout", "held-out public items (60 a seed)")):
        print(f"\n{label}: right answer ranked first among the valid ones (%), mean (spread) over seeds {a.seeds}:")
        print(f"{'scenario':<11}{'features':<16}" + "".join(f"{s:>14}" for s in STRATEGIES) + f"{'router-uniform':>16}")
        for scenario in a.scenarios:
            for name in a.features:
                rs = [r for r in rows if r["scenario"] == scenario and r["features"] == name]
                get = (lambda r, s: r["pool"].get(s)) if where == "pool" else (lambda r, s: r.get(s))
                cell, line = {}, f"{scenario:<11}{name:<16}"
                for s in STRATEGIES:
                    v = [100 * get(r, s) for r in rs if get(r, s) is not None]
                    cell[s] = {"mean": statistics.mean(v), "min": min(v), "max": max(v)} if v else None
                    line += f"{statistics.mean(v):>8.1f} ({max(v) - min(v):3.1f})" if v else f"{'-':>14}"
                gap = [100 * (get(r, "router") - get(r, "uniform")) for r in rs]
                cell["router_minus_uniform"] = {"mean": statistics.mean(gap), "min": min(gap), "max": max(gap)}
                line += f"{statistics.mean(gap):>+10.1f} ({max(gap) - min(gap):3.1f})"
                summary.setdefault(where, {}).setdefault(scenario, {})[name] = cell
                print(line)
    print("\nwho decides each type's mixed score on the pool (router.effective_shares: weight x spread of the"
          " client's scores), router / uniform weights, mean over seeds:")
    for scenario in a.scenarios:
        for name in a.features:
            rs = [r for r in rows if r["scenario"] == scenario and r["features"] == name]
            keys = sorted({(d, c) for r in rs for by in r["pool_effective_by_domain"].values()
                           for d, cs in by.items() for c in cs})
            share = {(d, c): {how: statistics.mean(r["pool_effective_by_domain"][how].get(d, {}).get(c, 0.0)
                                                   for r in rs) for how in ("router", "uniform")} for d, c in keys}
            line = "  ".join(f"{d}:{c} {v['router']:.2f}/{v['uniform']:.2f}" for (d, c), v in share.items()
                             if max(v.values()) >= 0.02)
            summary.setdefault("pool_effective", {}).setdefault(scenario, {})[name] = {
                f"{d}:{c}": v for (d, c), v in share.items()}
            print(f"{scenario:<11}{name:<16}{line}")
    print("\nthe router abstains on (no client's reward used; calibration win rate ± standard error, chance 0.50):")
    for scenario in a.scenarios:
        for name in a.features:
            for r in (r for r in rows if r["scenario"] == scenario and r["features"] == name):
                trust = r["trust"] or {}
                print(f"{scenario:<11}{name:<16}seed {r['seed']}: " + ("  ".join(
                    f"{d} {v['win_rate']:.2f}±{v['se']:.2f}{'' if v['trusted'] else ' ABSTAIN'}"
                    for d, v in trust.items()) or "-"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": " ".join(["benchmarks/bench_router.py", *sys.argv[1:]]),
                                 "summary": summary, "runs": rows}, indent=1))
    print(f"\nwritten: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
