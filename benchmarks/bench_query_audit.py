#!/usr/bin/env python3
"""What the client-side secagg guards cost the GRPO loop: runs the demo's GRPO (in-process reward models, the
same set-up as bench_federated_grpo.py) and, for every mixed-score request the loop makes, applies what each
client would apply in a plain ``secagg`` round: the query audit (same item digest with another cohort or other
weights -> refused; one on-disk SQLite per client) and the effective-contributor isolation rule (defaults:
min_contributors 2, min_weight_fraction 0.1, min_weight_grid_steps 16 at frac_bits 16). Reports how many
requests (rounds) would be refused by at least one client and the guards' time per round per client.
Writes benchmarks/results/query_audit.json.

    .venv/bin/python benchmarks/bench_query_audit.py [--steps 40] [--models DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


class GuardedBackend:
    """Wraps a reward backend; before each mixed-score request, runs every client's secagg guards on it."""

    def __init__(self, inner, audit_dir: Path, *, min_contributors=2, min_weight_fraction=0.1, grid_steps=16.0,
                 frac_bits=16, floor=False):
        from privacy.secagg.query_audit import QueryAudit

        self.inner = inner
        self.floor = floor  # apply FederatedBackend's isolation floor (privacy.secagg.weights) first
        self.audits = {c: QueryAudit(audit_dir / f"{c}.secagg-audit.sqlite") for c in inner.client_ids()}
        self.min_contributors, self.frac, self.grid = min_contributors, min_weight_fraction, grid_steps * 2.0 ** -frac_bits
        self.rounds = 0
        self.refused_audit = 0
        self.refused_isolation = 0
        self.repeated_coords = 0
        self.coords = 0
        self.guard_s: list[float] = []
        self._seen: set = set()
        self.ratios: list[float] = []  # per item: the smallest (peer weight / top weight) among the live clients
        self.items_refused = 0
        self.items = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def mixed_scores(self, items, weights):
        from privacy.secagg.errors import DifferencingError
        from privacy.secagg.query_audit import coordinate_digests, cohort_keys

        self.rounds += 1
        rid = f"q{self.rounds:06d}"
        ids = sorted(weights)
        if self.floor:
            from privacy.secagg.weights import floor_for_isolation

            M = floor_for_isolation(np.stack([np.asarray(weights[c], dtype=np.float64) for c in ids]))
            weights = {c: M[i].tolist() for i, c in enumerate(ids)}
        sizes = [len(it.candidates) for it in items]
        W = np.stack([np.repeat(np.asarray(weights[c], dtype=np.float64), sizes) for c in ids])
        t0 = time.perf_counter()
        digests = coordinate_digests(items)
        keys = cohort_keys(ids, W)
        iso = audit = False
        bad_coord = np.zeros(W.shape[1], dtype=bool)
        for i, c in enumerate(ids):
            row = W[i]
            mine = row > 0
            if mine.any():
                floor = np.maximum(self.grid, self.frac * row)
                eff = 1 + np.count_nonzero(np.delete(W, i, axis=0) >= floor, axis=0)
                iso |= int(eff[mine].min()) < self.min_contributors
                bad_coord |= mine & (eff < self.min_contributors)
            try:
                self.audits[c].claim_round(rid)
                self.audits[c].check_and_record(rid, digests, keys)
            except DifferencingError:
                audit = True
        self.guard_s.append((time.perf_counter() - t0) / len(ids))
        Wi = np.stack([np.asarray(weights[c], dtype=np.float64) for c in ids])  # (clients, items)
        srt = np.sort(Wi, axis=0)
        self.ratios.extend((srt[-2] / np.maximum(srt[-1], 1e-300)).tolist())
        starts = np.cumsum([0] + sizes[:-1])
        self.items += len(items)
        self.items_refused += int(sum(bad_coord[s0] for s0 in starts))
        self.refused_isolation += iso
        self.refused_audit += audit
        self.coords += len(digests)
        self.repeated_coords += sum(d in self._seen for d in digests)
        self._seen.update(digests)
        return self.inner.mixed_scores(items, weights)  # the loop goes on, so the whole run is measured


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--floor", action="store_true", help="apply FederatedBackend's isolation floor (default on there)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "query_audit.json")
    args = ap.parse_args()

    from bench_federated_grpo import quick_models, timed_grpo
    from mor_client.data.partition import make_federation_split
    from mor_client.rewards import RewardModelScorer
    from mor_server.alignment.calibration import calibrate_router
    from mor_server.alignment.features import FeatureExtractor
    from mor_server.alignment.grpo import make_prompt_dataset
    from mor_server.alignment.inprocess import InProcessBackend
    from mor_server.alignment.warmstart import warm_start_cached
    from mor_server.alignment.rewards import MoRReward

    work = Path(tempfile.mkdtemp(prefix="mor-bench-qa-"))
    if args.models:
        model_dirs = {p.parent.name: p for p in sorted(args.models.glob("*/model")) if (p / "card.json").exists()}
    else:
        model_dirs = quick_models(ROOT / "benchmarks" / ".cache" / "grpo-models", args.seed)
    split = make_federation_split(seed=args.seed, n_clients=3)
    ref_dir = ROOT / "benchmarks" / ".cache" / "reference"
    warm_start_cached(ref_dir, split.server_public, progress=False)
    dataset = make_prompt_dataset(split.server_unlabeled)
    scorers = {n: RewardModelScorer.from_dir(d) for n, d in model_dirs.items()}
    fe = FeatureExtractor()
    # abstain_z=None: every prompt goes to the clients (this measures rounds, not the router)
    router = calibrate_router(InProcessBackend(scorers), split.server_public, fe, seed=args.seed, abstain_z=None)
    backend = GuardedBackend(InProcessBackend(scorers), work, floor=args.floor)
    run = timed_grpo(ref_dir, dataset, MoRReward(backend, router, fe), args.steps, work / "grpo")
    res = {"command": "python benchmarks/bench_query_audit.py " + " ".join(sys.argv[1:]), "steps": args.steps,
           "clients": len(model_dirs), "isolation_floor": args.floor, "rounds": backend.rounds,
           "rounds_refused_by_query_audit": backend.refused_audit,
           "rounds_refused_by_isolation_rule": backend.refused_isolation,
           "items": backend.items, "items_refused_by_isolation_rule": backend.items_refused,
           "second_over_top_weight_quantiles": dict(zip(("p10", "p50", "p90"), np.quantile(
               backend.ratios, [0.1, 0.5, 0.9]).tolist())),
           "coordinates": backend.coords, "coordinates_seen_before": backend.repeated_coords,
           "guard_ms_per_round_per_client_mean": 1000 * statistics.mean(backend.guard_s),
           "guard_ms_per_round_per_client_max": 1000 * max(backend.guard_s),
           "grpo_step_time_mean_s": run["step_time_mean_s"]}
    print(json.dumps(res, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
