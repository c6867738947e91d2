"""Reward-model quality bars: held-out pairwise accuracy per architecture in its own domain and outside it,
the privacy-utility curve (epsilon in {1, 4, 8, inf}) and private / non-private training time.

    python benchmarks/bench_reward_models.py [--archs cnn:client0,vit:client1,lora:client2] [--epsilons 1,4,8,inf]
    python benchmarks/bench_reward_models.py --archs lora:client2,lora-minilm:client2 --epsilons 8 \
        --overrides '{"synthetic_images": 1000, "max_pairs": 2000}' --out benchmarks/results/reward_models_minilm.json
    python benchmarks/bench_reward_models.py --archs cnn:client0 --units pair,annotator --n-annotators 2000 --epsilons 1,8,inf \
        --out benchmarks/results/reward_models_annotator.json

Writes benchmarks/results/reward_models.json. Not a test: it takes minutes on 2 cores. To keep the run short,
all non-private pre-training (synthetic public data, the server's public pairs; no privacy cost) runs once per
architecture and every epsilon starts from a copy of that pre-trained model; each run otherwise uses its demo
preset (including the preset's max_pairs). "public_only_heldout_accuracy" is the pre-trained model before any
private data; "demo_preset_seconds_eps8" = pre-training + the eps-8 private phase (what `mor demo` trains).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="cnn:client0,vit:client1,lora:client2",
                    help="arch:client pairs (client0 colour, client1 shape, client2 yes/no); lora-minilm is the "
                         "lora preset on the pretrained MiniLM backbone (needs mor[minilm])")
    ap.add_argument("--units", default="pair", help="DP-SGD privacy units to compare, comma-separated: pair, annotator")
    ap.add_argument("--n-annotators", type=int, default=8, help="annotators the split's pairs are spread over")
    ap.add_argument("--epsilons", default="1,4,8,inf")
    ap.add_argument("--max-pairs", type=int, default=None, help="cap on training pairs (default: the preset's)")
    ap.add_argument("--overrides", type=json.loads, default={},
                    help='JSON of TrainConfig fields applied on top of each preset, e.g. \'{"synthetic_images": 2000}\'')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with other jobs)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reward_models.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from mor_client.data import make_federation_split, make_pairs
    from mor_client.rewards import build_model, default_vocab, demo_config, pairwise_accuracy, train_reward_model
    from mor_client.rewards.pretrain import public_pretrain

    t_all = time.perf_counter()
    split = make_federation_split(seed=a.seed, n_annotators=a.n_annotators)
    rows = []
    for spec in a.archs.split(","):
        name, client = spec.split(":")
        arch, _, backbone = name.partition("-")
        c = split.clients[client]
        base = demo_config(arch, seed=a.seed, device=a.device, progress=False, **a.overrides)
        if backbone:
            base.model_config["backbone"] = backbone
        public = make_pairs([e for e in split.server_public if e.question_type in c.question_types], seed=a.seed,
                            rejected_per_example=8) if base.pretrain_epochs else []
        vocab = default_vocab()
        torch.manual_seed(a.seed)
        pre = build_model(arch, len(vocab), **base.model_config)
        if callable(getattr(pre, "bind_vocab", None)):
            pre.bind_vocab(vocab)
        t = time.perf_counter()
        info = public_pretrain(pre, base, public_pairs=public, train_pairs=c.train, vocab=vocab)
        pretrain_s = round(time.perf_counter() - t, 2)
        public_only = pairwise_accuracy(pre, vocab, c.heldout, device=a.device) if (
            info["synthetic_pairs"] or info["public_pairs"]) else None
        pre.train()
        for unit, e in [(u, e) for e in a.epsilons.split(",") for u in a.units.split(",")]:
            eps = math.inf if e == "inf" else float(e)
            if math.isinf(eps) and unit != "pair":
                continue  # without DP there is no privacy unit: the pair row is the non-private reference
            pre_keys = {"model_config", "pretrain_epochs", "visual_epochs"}  # pre-training ran once, above
            over = {**{k: v for k, v in a.overrides.items() if k not in pre_keys and not k.startswith("synthetic_")},
                    **(dict(max_pairs=a.max_pairs) if a.max_pairs else {})}
            cfg = demo_config(arch, epsilon=None if math.isinf(eps) else eps, seed=a.seed, device=a.device,
                              progress=False, pretrain_epochs=0, synthetic_images=0, unit=unit,
                              model_config=dict(base.model_config), **over)
            t = time.perf_counter()
            res = train_reward_model(c.train, c.heldout, cfg, domain=client, model=copy.deepcopy(pre))
            wall = time.perf_counter() - t
            outside = {k: pairwise_accuracy(res.model, res.vocab, o.heldout, device=a.device)
                       for k, o in split.clients.items() if k != client}
            row = {"arch": name, "unit": unit, "units": res.card["privacy_units"], "client": client, "domain": c.domain_desc, "epsilon_target": e,
                   "epsilon": res.card["epsilon"], "delta": res.card["delta"], "pairs": res.card["data_size"],
                   "heldout_pairwise_accuracy": res.card["heldout_pairwise_accuracy"],
                   "outside_domain_accuracy": outside, "noise_multiplier": res.card["noise_multiplier"],
                   "steps": res.card["steps"], "public_pretrain_pairs": info["public_pairs"],
                   "synthetic_pretrain_pairs": info["synthetic_pairs"],
                   "synthetic_pretrain_types": list(info["synthetic_types"]),
                   "public_only_heldout_accuracy": public_only,
                   "trainable_parameters_private_phase": res.card["trainable_parameter_count"],
                   "parameters": res.card["parameter_count"],
                   "public_pretrain_seconds_once": pretrain_s, "private_phase_seconds": res.card["train_seconds"],
                   "wall_seconds": round(wall, 2)}
            print(json.dumps(row))
            rows.append(row)
    ratios, demo_seconds = {}, {}
    for arch in sorted({r["arch"] for r in rows}):
        dp = [r for r in rows if r["arch"] == arch and r["epsilon_target"] == "8" and r["unit"] == "pair"]
        nodp = [r for r in rows if r["arch"] == arch and r["epsilon_target"] == "inf" and r["unit"] == "pair"]
        if dp and nodp:
            ratios[arch] = round(dp[0]["private_phase_seconds"] / nodp[0]["private_phase_seconds"], 2)
        if dp:
            demo_seconds[arch] = round(dp[0]["public_pretrain_seconds_once"] + dp[0]["wall_seconds"], 1)
    out = {"rows": rows, "total_seconds": round(time.perf_counter() - t_all, 1),
           "notes": "non-private pre-training (synthetic public data, server public pairs) once per arch (copied "
                    "for every epsilon); demo presets otherwise; private_phase_seconds is comparable across "
                    "epsilons of one arch (same run, same machine, which is shared with other jobs)",
           "private_over_nonprivate_time_eps8": ratios, "demo_preset_seconds_eps8": demo_seconds,
           "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "device": a.device,
                       "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
           "command": "python benchmarks/bench_reward_models.py " + " ".join(f"--{k.replace('_', '-')} {json.dumps(v) if isinstance(v, dict) else v}" for k, v in
                                                                            vars(a).items() if k != "out")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
