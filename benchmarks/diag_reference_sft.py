"""Diagnostic (issue #17): the compact recipe's stage 1 once per seed (cached by diag_policy_vision.stage1_cached),
then SFT variants on the server's public split, each evaluated on the 600 held-out items of bench_reward_ablation.
Variants: STEPS@LR, suffix b for type-balanced batches (SFTConfig.balance_types). Appends to
benchmarks/results/reference_sft_probe.jsonl. docs/alignment.md, "The reference is fragile".

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diag_reference_sft.py 0 50@3e-3 50@3e-3b 200@3e-4
"""
import copy, json, sys
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
from bench_reward_ablation import cell_test, scenario_split, recipe
from diag_policy_vision import stage1_cached
from mor_server.alignment.policy import build_tiny_llava, policy_vocabulary
from mor_server.alignment.warmstart import SFTConfig, sft_warm_start
from mor_server.alignment.evaluate import accuracy
seed = int(sys.argv[1]); variants = sys.argv[2:]
split = scenario_split("honest", seed); test = cell_test(split)
tiny, pre = recipe("compact+synthetic+sft", seed)
model, processor = build_tiny_llava(policy_vocabulary(split.server_public), config=tiny)
model, s1 = stage1_cached(model, processor, tiny, pre)
def show(tag, m):
    r = accuracy(m, processor, test)
    line = {"seed": seed, "variant": tag, "overall": round(100 * r["overall"], 1),
            "by_type": {k: round(100 * v, 1) for k, v in r["by_domain"].items()},
            "top": {k: (v["distinct_answers"], v["top_answer"], round(v["top_answer_share"], 2)) for k, v in r["diversity"].items()}}
    print(json.dumps(line), flush=True)
    with open("benchmarks/results/reference_sft_probe.jsonl", "a") as f: f.write(json.dumps(line) + "\n")
show("stage1-only", model)
for v in variants:
    bal = v.endswith("b"); steps, lr = v.rstrip("b").split("@")
    m = copy.deepcopy(model)

    sft_warm_start(m, processor, split.server_public, SFTConfig(steps=int(steps), learning_rate=float(lr), seed=seed, max_seconds=3600, balance_types=bal), progress=False)
    show(v, m)
