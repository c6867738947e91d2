#!/usr/bin/env python3
"""What the federation costs GRPO: the same GRPO run with the same three reward models, (a) called in-process and
(b) through the federation (3 client processes over loopback mTLS, `secagg` rounds: SecAgg+ per generation batch).
Prints the ratio of mean step times measured side by side in one run; writes
benchmarks/results/federated_grpo.json.

    .venv/bin/python benchmarks/bench_federated_grpo.py [--steps 20] [--models DIR]

--models: a folder with one trained reward-model folder per client (e.g. runs/demo/clients/*/model after
`make demo`). Without it, three quick CNN reward models (one per question-type domain) are trained first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("client0", "client1", "client2")


def quick_models(out: Path, seed: int) -> dict[str, Path]:
    dirs = {}
    for n in NAMES:
        d = out / n / "model"
        if not (d / "card.json").exists():
            subprocess.run([sys.executable, "-m", "mor_client.cli", "train", "--arch", "cnn", "--partition", n,
                            "--n-clients", "3", "--epsilon", "8", "--max-pairs", "1500", "--epochs", "3",
                            "--data-seed", str(seed), "--out", str(d), "--quiet"], check=True)
        dirs[n] = d
    return dirs


def timed_grpo(ref_dir, dataset, reward, steps: int, out: Path) -> dict:
    from mor_server.alignment.grpo import GRPORunConfig, run_grpo

    cfg = GRPORunConfig(output_dir=str(out), max_steps=steps, save_steps=0, progress=False)
    t0 = time.perf_counter()
    res = run_grpo(ref_dir, dataset, [reward], [1.0], cfg)
    wall = time.perf_counter() - t0
    step_times = [float(h["step_time"]) for h in res["log_history"] if "step_time" in h]
    rounds = [h["seconds"] for h in reward.history if h.get("ok")]
    return {"steps": res["global_step"], "wall_s": wall, "train_s": res["seconds"],
            "step_time_mean_s": statistics.mean(step_times[1:] or step_times),
            "reward_call_mean_s": statistics.mean(rounds[1:] or rounds), "rounds_ok": reward.rounds_ok,
            "rounds_failed": reward.rounds_failed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "federated_grpo.json")
    args = ap.parse_args()

    from mor_client.data.partition import make_federation_split
    from mor_client.rewards import RewardModelScorer
    from mor_server.alignment.calibration import calibrate_router
    from mor_server.alignment.features import FeatureExtractor
    from mor_server.federation.backend import FederatedBackend
    from mor_server.alignment.grpo import make_prompt_dataset
    from mor_server.alignment.inprocess import InProcessBackend
    from mor_server.alignment.warmstart import warm_start_cached
    from mor_server.apps.procs import ClientProcess, mor_client_argv, stop_all
    from mor_server.alignment.rewards import MoRReward
    from mor_server.federation.config import ServerConfig
    from mor_server.federation.thread import ServerThread
    from privacy import pki

    work = Path(tempfile.mkdtemp(prefix="mor-bench-grpo-"))
    if args.models:
        model_dirs = {p.parent.name: p for p in sorted(args.models.glob("*/model")) if (p / "card.json").exists()}
        if len(model_dirs) < 2:
            raise SystemExit(f"--models {args.models}: expected at least two NAME/model folders with card.json")
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

    print(f"in-process: {args.steps} GRPO steps ...", flush=True)
    local = timed_grpo(ref_dir, dataset, MoRReward(InProcessBackend(scorers), router, fe), args.steps,
                       work / "inproc")

    pki_dir = work / "pki"
    pki.init_ca(pki_dir)
    for n in model_dirs:
        pki.issue_client(pki_dir, n)
    server = ServerThread(ServerConfig(pki_dir=pki_dir))
    port = server.start()
    procs = [ClientProcess(n, mor_client_argv("join", "--server", f"localhost:{port}", "--creds",
                                              str(pki_dir / "clients" / n), "--model", str(d), "--modes", "secagg"),
                           work / f"{n}.log").start() for n, d in model_dirs.items()]
    try:
        server.wait_for_clients(len(procs), timeout=120)
        print(f"federated (secagg, {len(procs)} client processes): {args.steps} GRPO steps ...", flush=True)
        backend = FederatedBackend(server, mix_mode="secagg", timeout=60)
        fed = timed_grpo(ref_dir, dataset, MoRReward(backend, router, fe), args.steps, work / "fed")
    finally:
        stop_all(procs)
        server.stop()
    res = {"steps": args.steps, "clients": len(model_dirs), "mode": "secagg", "in_process": local, "federated": fed,
           "step_time_ratio": fed["step_time_mean_s"] / local["step_time_mean_s"],
           "reward_call_ratio": fed["reward_call_mean_s"] / local["reward_call_mean_s"],
           "federation_overhead_per_step_s": fed["step_time_mean_s"] - local["step_time_mean_s"]}
    print(json.dumps(res, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"GRPO step time, federated (secagg) / in-process: {res['step_time_ratio']:.2f}x "
          f"(+{100 * (res['step_time_ratio'] - 1):.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
