"""Diagnostic (issue #17): can the compact policy learn to *compare* the colour or shape a yes/no question names
with the image's, or only the question's wording?

Supervised on easy-vqa-format synthetic data the compact family answers yes/no from the wording alone (82.5-84.3%,
docs/alignment.md, "Where the 85% ceiling stops"). This script starts from the seed's stage-1 checkpoint (vision
pre-training, shared with ``diag_policy_vision.py`` through ``benchmarks/.cache``) and trains a sequence of
supervised phases on public synthetic questions (mor_client.data.synthetic, never easy-vqa's data), then measures:

* on held-out synthetic **prior-balanced** yes/no questions (each asked colour or shape present half the time, so
  the wording says nothing; chance is 50%): affirmative and negated accuracy;
* on the held-out easy-vqa test: yes/no accuracy split by whether the wording alone gives the answer.

Phases (``--phases``, comma-separated ``name=steps`` or ``name=steps@lr``, run in order):

* ``words:red+blue``: affirmative balanced presence questions that name only these colours/shapes;
* ``affirmative``: affirmative balanced presence questions about any colour or shape;
* ``balanced``: balanced yes/no questions, half negated (``balanced_yesno=True``);
* ``mixed:0.2``: balanced yes/no questions of which this fraction is negated, the rest affirmative;
* ``colorshape``: colour and shape questions (what the policy learns to 100% / 95%);
* ``public``: the seed's server public split (300 labelled easy-vqa examples: the warm start's SFT, e.g.
  ``public=50@3e-3`` as in the ``compact+curriculum+sft`` recipe).

``--caption-steps 1000`` adds the recipes' captioning part to stage 1. After each phase the easy-vqa colour and
shape accuracy is recorded too.

Appends one record per run to ``benchmarks/results/yesno_composition.json``. Example (about 10 min on one core):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diag_yesno_composition.py --phases words:red=400,affirmative=1500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def phase_data(name: str, index: int, seed: int):
    """A phase's examples (mor_client.data.synthetic.curriculum_phase_examples, the warm start's curriculum data) from
    this script's own data seeds, disjoint from the held-out draw."""
    from mor_client.data.synthetic import curriculum_phase_examples

    return curriculum_phase_examples(name, 1000 + 100 * seed + index)


def negation_group(example) -> str:
    from mor_client.data.synthetic import is_negated

    return "negated" if is_negated(example.question) else "affirmative"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--phases", required=True, help="comma-separated name=steps (see the module docstring)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the phases that do not name one")
    ap.add_argument("--vision-steps", type=int, default=600, help="stage 1: vision-tower classification steps")
    ap.add_argument("--caption-steps", type=int, default=0, help="stage 1: captioning steps after the vision part")
    ap.add_argument("--seed", type=int, default=0, help="policy init, stage 1 and data seed")
    ap.add_argument("--heldout", type=int, default=800, help="held-out balanced synthetic yes/no questions")
    ap.add_argument("--save", type=Path, default=None, help="save the policy after the last phase here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "yesno_composition.json")
    a = ap.parse_args()
    from mor_client.data.synthetic import parse_curriculum

    try:  # public: the seed's server public split (trained below)
        phases = parse_curriculum(a.phases, default_lr=a.lr, extra_phases=("public",))
    except ValueError as e:
        ap.error(f"--phases: {e}")
    if not phases:
        ap.error("--phases: name at least one phase, e.g. words:red=400,affirmative=1500")

    from diag_policy_vision import stage1_cached, tally, wording_group

    from mor_client.data.partition import make_federation_split
    from mor_client.data.synthetic import make_synthetic_examples
    from mor_server.alignment.evaluate import domain_of
    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.policy import TinyLlavaConfig, build_tiny_llava, generate_answers, pick_device
    from mor_server.alignment.warmstart import PretrainConfig, SFTConfig, sft_warm_start

    # the compact width as in diag_policy_vision's supervised-ceiling runs (3 layers in both towers)
    cfg = TinyLlavaConfig(patch_size=8, seed=a.seed, text_hidden=128, vision_hidden=128, intermediate=256,
                          text_layers=3, vision_layers=3)
    model, processor = build_tiny_llava(config=cfg)
    model.to(pick_device()[0])
    model, _ = stage1_cached(model, processor, cfg, PretrainConfig(vision_steps=a.vision_steps,
                                                                   caption_steps=a.caption_steps, seed=a.seed))
    split = make_federation_split(seed=a.seed, n_clients=3)
    test = heldout_test(split)[:600]
    test_yn = [e for e in test if domain_of(e) == "yesno"]
    test_cs = [e for e in test if domain_of(e) != "yesno"]
    heldout = make_synthetic_examples(a.heldout, seed=500_000 + a.seed, question_types=("yesno",),
                                      balanced_yesno=True)
    evals = []
    for i, (name, steps, lr) in enumerate(phases):
        data = list(split.server_public) if name == "public" else phase_data(name, i, a.seed)
        t0 = time.perf_counter()
        info = sft_warm_start(model, processor, data, SFTConfig(steps=steps, learning_rate=lr, seed=a.seed + i,
                                                                max_seconds=7200), progress=False)
        seconds = round(time.perf_counter() - t0, 1)
        held_ans = generate_answers(model, processor, heldout, max_new_tokens=4)
        test_ans = generate_answers(model, processor, test_yn, max_new_tokens=4)  # once for both splits below
        cs_ans = generate_answers(model, processor, test_cs, max_new_tokens=4)
        ev = {"phase": f"{name}={steps}" + (f"@{lr:g}" if lr != a.lr else ""), "examples": len(data),
              "final_loss": info["final_loss"], "seconds": seconds,
              "synthetic_balanced": tally(heldout, held_ans, negation_group),
              "easyvqa_yesno_by_wording_prior": tally(test_yn, test_ans, wording_group),
              "easyvqa_yesno": tally(test_yn, test_ans, negation_group),
              "easyvqa_color_shape": tally(test_cs, cs_ans, domain_of)}
        print(f"after {ev['phase']}: loss {info['final_loss']:.3f}; balanced held-out "
              + ", ".join(f"{k} {100 * v['accuracy']:.1f}% (says yes {100 * v['yes'] / v['n']:.0f}%)"
                          for k, v in ev["synthetic_balanced"].items())
              + "; easy-vqa yes/no " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%"
                                                 for k, v in ev["easyvqa_yesno_by_wording_prior"].items())
              + ", " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in ev["easyvqa_yesno"].items())
              + "; " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in ev["easyvqa_color_shape"].items()),
              flush=True)
        evals.append(ev)
    if a.save:
        from mor_server.alignment.policy import save_policy

        save_policy(model, processor, a.save)
    rec = {"args": {k: str(v) for k, v in vars(a).items()}, "evals": evals,
           "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diag_yesno_composition.py "
                      + " ".join(sys.argv[1:])}
    runs = json.loads(a.out.read_text()) if a.out.is_file() else []
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(runs + [rec], indent=1))
    print("appended to", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
