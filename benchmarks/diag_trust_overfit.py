"""Can the router's trust test be passed by fitting noise? In-sample against out-of-fold weights, side by side.

A federation in which no client knows colour: a shape expert and ``--clients - 1`` yes/no experts, each right on its
own question type (1 for the right answer, 0 otherwise) and answering every other question with uniform noise of its
own (salted per client, so the clients' noise is independent). ``--trials`` such federations (seed = trial) are
calibrated on 300 public easy-vqa items with the router's features (``--features``), and the colour answer set's
trust test (:func:`mor_server.alignment.router.answer_set_trust`, z = 2) is run twice on the same calibration round:
on the weights of the router fitted on those items (the test's first version) and on out-of-fold weights
(:func:`mor_server.alignment.calibration.out_of_fold_weights`, what ``calibrate_router`` uses now). Chance is 0.5;
a sound test passes colour in about 2% of the federations (z = 2, one-sided).

    .venv/bin/python benchmarks/diag_trust_overfit.py                         # 40 trials, image+question features
    .venv/bin/python benchmarks/diag_trust_overfit.py --features type --trials 10

Writes ``benchmarks/results/trust_overfit.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--clients", type=int, default=4, help="clients in each federation (one shape expert, the rest "
                                                           "yes/no experts; none knows colour)")
    p.add_argument("--features", nargs="+", default=["image", "question"], choices=["type", "image", "question"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trust_overfit.json"))
    a = p.parse_args(argv)
    if a.trials < 1 or a.clients < 2:
        p.error("--trials must be >= 1 and --clients >= 2")

    from mor_client.data.easyvqa import load_easyvqa
    from mor_server.alignment.calibration import answer_schema, calibrate_router
    from mor_server.alignment.features import FeatureExtractor
    from mor_server.alignment.inprocess import InProcessBackend, LabelExpertScorer
    from mor_server.alignment.router import answer_set_trust

    test = load_easyvqa("test")
    public = [test[i] for i in np.random.default_rng(0).choice(len(test), 300, replace=False)]
    schema = answer_schema(public)
    colour = tuple(sorted(schema.valid_answers(next(e.question for e in public if e.question_type == "color"))))
    rows, t0 = [], time.perf_counter()
    for trial in range(a.trials):
        scorers = {"shape": LabelExpertScorer(public, ["shape"], salt=f"{trial}s")}
        for k in range(a.clients - 1):
            scorers[f"yesno{k}"] = LabelExpertScorer(public, ["yesno"], salt=f"{trial}y{k}")
        fx = FeatureExtractor(parts=a.features, schema=schema)
        router = calibrate_router(InProcessBackend(scorers), public, fx, steps=300, seed=trial, schema=schema)
        ev = router.trust_evidence
        w_in = router.weights(_cal_features(fx, public, schema), live=router.client_ids)
        w_in = np.array([w_in[c] for c in router.client_ids], dtype=np.float64).T
        got = {}
        for name, w in (("in_sample", w_in), ("out_of_fold", ev["w"])):
            v = answer_set_trust(w, ev["S"], ev["mask"], ev["truth"], ev["keys"], z=2.0)[colour]
            got[name] = {"win_rate": v["win_rate"], "se": v["se"], "trusted": v["trusted"]}
        rows.append({"trial": trial, **got})
        print(f"trial {trial:2d}: colour in-sample {got['in_sample']['win_rate']:.2f}±{got['in_sample']['se']:.2f} "
              f"{'TRUSTED' if got['in_sample']['trusted'] else 'abstain'}   out-of-fold "
              f"{got['out_of_fold']['win_rate']:.2f}±{got['out_of_fold']['se']:.2f} "
              f"{'TRUSTED' if got['out_of_fold']['trusted'] else 'abstain'}", flush=True)
    summary = {k: {"trusted": sum(r[k]["trusted"] for r in rows), "trials": len(rows),
                   "mean_win_rate": float(np.mean([r[k]["win_rate"] for r in rows]))}
               for k in ("in_sample", "out_of_fold")}
    print(f"colour passed the trust test (no client knows colour): in-sample weights "
          f"{summary['in_sample']['trusted']}/{a.trials} (mean win rate {summary['in_sample']['mean_win_rate']:.3f}), "
          f"out-of-fold {summary['out_of_fold']['trusted']}/{a.trials} "
          f"(mean {summary['out_of_fold']['mean_win_rate']:.3f}); {time.perf_counter() - t0:.0f} s")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "benchmarks/diag_trust_overfit.py " + " ".join(argv or sys.argv[1:]),
                               "features": a.features, "clients": a.clients, "summary": summary, "trials": rows},
                              indent=1))
    print(f"written: {out}")
    return 0


def _cal_features(fx, public, schema):
    """Features of the calibration items in calibrate_router's order (calibration_items over the public split)."""
    from mor_server.alignment.calibration import calibration_items

    cal = calibration_items(public, schema)
    return fx.batch([e.image for e, _, _ in cal], [e.question for e, _, _ in cal])


if __name__ == "__main__":
    raise SystemExit(main())
