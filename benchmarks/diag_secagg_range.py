"""Diagnostic (issue #17): what secagg's encoding does to the routed mixture's ranking, replayed on a finished demo.

For one seed's `mor demo` work dir: the 600 held-out test questions with every valid answer as a candidate, scored
by the clients' own reward models (loaded in process from ``clients/<name>/model``), mixed with the run's router
weights (``alignment/router``), then (a) as calibrated, (b) after the secagg isolation floor
(``privacy.secagg.weights.floor_for_isolation``), (c) after the floor with every score clipped to +-16 (the secagg
transport's default value range before 2026-12-05). Prints, per question type, how often the right answer ranks
first, each client's share of scores outside +-16, the weight the floor moves and each client's mean score spread;
appends the record to ``benchmarks/results/secagg_range.json``.

    .venv/bin/python benchmarks/diag_secagg_range.py 1 benchmarks/.cache/alignment_seeds_v4/seeing-seed1
"""
import sys, json
from pathlib import Path

import numpy as np
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mor_client.data.partition import make_federation_split
from mor_client.rewards.scorer import RewardModelScorer
from mor_server.alignment.router import MoRRouter
from mor_server.alignment.features import FeatureExtractor
from mor_server.alignment.calibration import calibration_items, answer_schema
from mor_server.alignment.evaluate import domain_of
from mor_server.alignment.rewards import ScoringItem
from privacy.secagg.weights import floor_for_isolation

if len(sys.argv) != 3 or not sys.argv[1].isdigit() or not (Path(sys.argv[2]) / "alignment" / "router").is_dir():
    raise SystemExit("usage: diag_secagg_range.py SEED DEMO_WORKDIR (a finished `mor demo --seed SEED --workdir "
                     "DEMO_WORKDIR`, with alignment/router and clients/<name>/model)")
seed = int(sys.argv[1])
work = Path(sys.argv[2])
split = make_federation_split(seed=seed, n_clients=3)
from mor_server.alignment.pipeline import heldout_test
exs = heldout_test(split)[:600]
router = MoRRouter.load(work / "alignment" / "router")
fx = FeatureExtractor.from_config(router.feature_config)
schema = answer_schema(split.server_public)
cal = calibration_items(exs, schema)
items = [ScoringItem(item_id=f"i{i}", image=e.image, question=e.question, candidates=tuple(c))
         for i, (e, c, _) in enumerate(cal)]
clients = sorted(router.client_ids)
S = {c: RewardModelScorer.from_pretrained(work / "clients" / c / "model").score(items) for c in clients}
feats = fx.batch([e.image for e, _, _ in cal], [e.question for e, _, _ in cal])
W = router.weights(feats, live=clients)
Wm = np.array([W[c] for c in clients])
F = floor_for_isolation(Wm)
truth = [t for _, _, t in cal]; doms = [domain_of(e) for e, _, _ in cal]
Sc = {c: [list(np.clip(r, -16, 16)) for r in S[c]] for c in clients}
outside = {c: round(100 * float(np.mean([np.mean(np.abs(r) > 16) for r in S[c]])), 1) for c in clients}
res = {}
for name, M, scores in (("router", Wm, S), ("floored", F, S), ("floored+clip16", F, Sc)):
    acc = {}
    for d in sorted(set(doms)):
        idx = [i for i, dd in enumerate(doms) if dd == d]
        ok = 0
        for i in idx:
            mix = sum(M[k, i] * np.asarray(scores[c][i]) for k, c in enumerate(clients))
            ok += int(np.argmax(mix) == truth[i])
        acc[d] = round(100 * ok / len(idx), 1)
    res[name] = acc
runner = {}
for d in sorted(set(doms)):
    idx = [i for i, dd in enumerate(doms) if dd == d]
    gain = F[:, idx] - Wm[:, idx]
    runner[d] = {c: round(float(gain[k].mean()), 3) for k, c in enumerate(clients)}
spread = {d: {c: round(float(np.mean([np.ptp(S[c][i]) for i, dd in enumerate(doms) if dd == d])), 2)
              for c in clients} for d in sorted(set(doms))}
rec = {"seed": seed, "workdir": str(work), "acc": res, "pct_scores_outside_16": outside, "floor_weight_gain": runner,
       "score_spread": spread}
print(json.dumps(rec))
out = ROOT / "benchmarks" / "results" / "secagg_range.json"
old = json.loads(out.read_text()) if out.is_file() else {"records": []}
old["records"] = [r for r in old["records"] if r["seed"] != seed] + [rec]
old["note"] = __doc__.split("\n\n")[1].replace("\n", " ")
out.write_text(json.dumps(old, indent=1) + "\n")
