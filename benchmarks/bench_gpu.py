#!/usr/bin/env python3
"""GRPO on a GPU, by policy size (issue #13): for each preset (tiny 0.24M, small 40M, base 383M) x step count,
the warm-start time on the device, accuracy before/after GRPO, the GRPO step time, tokens/s, peak GPU memory, the
collapse guard's verdict, and the federation's share of a GRPO step. Writes benchmarks/results/gpu.json.

    .venv/bin/python benchmarks/bench_gpu.py                       # tiny,small,base x 50 steps, on CUDA
    .venv/bin/python benchmarks/bench_gpu.py --presets base --steps 20,100
    .venv/bin/python benchmarks/bench_gpu.py --cpu-smoke           # tiny, 2 steps, on the CPU: checks it runs

The rewards come from three label-expert clients (one per question type: colour, shape, yes/no;
mor_server.alignment.inprocess.LabelExpertScorer, the upper bound of a trained reward model) that join a federation server
over loopback mTLS as separate `mor client join` processes, with SecAgg+ reward rounds (`--mode secagg`; use
`--in-process` to call the same experts in-process instead). The federation's share of a step is the mean wall time
of a reward round over the mean GRPO step time (both measured in the same run). GRPO uses each preset's defaults
(mor_server.alignment.PRESET_DEFAULTS); --lr/--beta override them for every preset.

--cpu-smoke writes benchmarks/results/gpu_cpu_smoke.json (never gpu.json): CPU figures are not GPU results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOMAINS = {"ColorExpert": "color", "ShapeExpert": "shape", "YesNoExpert": "yesno"}


def _expert(domain: str):
    """A label expert of one question type over the server's public + unlabeled split of MOR_BENCH_SEED (what a
    client process builds; the seed comes through the environment because `--scorer` classes take no argument)."""
    from mor_client.data.partition import make_federation_split
    from mor_server.alignment.inprocess import LabelExpertScorer

    split = make_federation_split(seed=int(os.environ.get("MOR_BENCH_SEED", "0")))
    return LabelExpertScorer(list(split.server_public) + list(split.server_unlabeled), [domain])


class ColorExpert:
    def __init__(self):
        self._s = _expert("color")

    def score(self, items):
        return self._s.score(items)


class ShapeExpert(ColorExpert):
    def __init__(self):
        self._s = _expert("shape")


class YesNoExpert(ColorExpert):
    def __init__(self):
        self._s = _expert("yesno")


class Federation:
    """A federation server here and one `mor client join` process per label expert, over loopback mTLS."""

    def __init__(self, work: Path, seed: int, mode: str):
        from privacy import pki

        from mor_server.federation.backend import FederatedBackend
        from mor_server.apps.procs import ClientProcess, mor_client_argv
        from mor_server.federation.config import ServerConfig
        from mor_server.federation.thread import ServerThread

        pki_dir = work / "pki"
        pki.init_ca(pki_dir)
        for name in DOMAINS:
            pki.issue_client(pki_dir, name.lower())
        self.server = ServerThread(ServerConfig(pki_dir=pki_dir))
        port = self.server.start()
        env = {"MOR_BENCH_SEED": str(seed), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.procs = [ClientProcess(name.lower(), mor_client_argv(
            "join", "--server", f"localhost:{port}", "--creds", str(pki_dir / "clients" / name.lower()),
            "--scorer", f"{Path(__file__).resolve()}:{name}", "--modes", mode), work / f"{name}.log",
            env=env).start() for name in DOMAINS]
        try:
            self.server.wait_for_clients(len(self.procs), timeout=300, mode=mode)
        except BaseException:
            self.close()
            raise
        self.backend = FederatedBackend(self.server, mix_mode=mode, timeout=120, min_clients=2)

    def close(self) -> None:
        from mor_server.apps.procs import stop_all

        stop_all(self.procs)
        self.server.stop()


def _cuda():
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def run_case(preset: str, steps: int, *, split, test, backend, router, features, work: Path, device: str | None,
             sft_steps: int | None, lr: float | None, beta: float | None, guard_every: int) -> dict:
    from dataclasses import replace

    from mor_server.alignment.evaluate import accuracy
    from mor_server.alignment.grpo import GRPOMetrics, GRPORunConfig, make_prompt_dataset, run_grpo
    from mor_server.alignment.guard import CollapseGuardConfig, collapse_guard_callback
    from mor_server.alignment.pipeline import AlignmentConfig
    from mor_server.alignment.warmstart import warm_start_cached
    from mor_server.alignment.rewards import MoRReward

    cuda = _cuda() if device in (None, "cuda") else None
    acfg = AlignmentConfig.from_preset(preset)
    sft = acfg.sft if sft_steps is None else replace(acfg.sft, steps=sft_steps)
    if cuda:
        cuda.synchronize()
    t0 = time.perf_counter()
    # a fresh warm start per preset and run (no cache reuse: its time is part of what is measured)
    model, processor, warm = warm_start_cached(work / f"ref-{preset}-{steps}", split.server_public, tiny=acfg.tiny,
                                               sft=sft, progress=False, device=device)
    if cuda:
        cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    before = accuracy(model, processor, test)
    eval_s = time.perf_counter() - t0
    del model
    if cuda:
        cuda.empty_cache()
        cuda.reset_peak_memory_stats()
    over = {k: v for k, v in (("learning_rate", lr), ("beta", beta)) if v is not None}
    gcfg = GRPORunConfig(**{**acfg.grpo.__dict__, **over, "output_dir": str(work / f"grpo-{preset}-{steps}"),
                            "max_steps": steps, "save_steps": 0, "progress": False, "device": device})
    metrics = GRPOMetrics()
    mor = MoRReward(backend, router, features, metrics=metrics, deadline_s=120)
    guard = collapse_guard_callback(processor, list(split.server_unlabeled),
                                    CollapseGuardConfig(every=guard_every)) if guard_every else None
    res = run_grpo(work / f"ref-{preset}-{steps}", make_prompt_dataset(split.server_unlabeled), [mor], [1.0], gcfg,
                   metrics=metrics, callbacks=[guard] if guard else [])
    peak = cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    after = accuracy(res["model"], processor, test)
    logs = res["log_history"]
    step_times = [float(h["step_time"]) for h in logs if "step_time" in h]
    tokens = [float(h["num_tokens"]) for h in logs if "num_tokens" in h]
    rounds = [h["seconds"] for h in mor.history if h.get("ok")]
    steady = step_times[1:] or step_times  # the first step also warms kernels and caches
    step_mean = statistics.mean(steady) if steady else float("nan")
    round_mean = statistics.mean(rounds[1:] or rounds) if rounds else float("nan")
    return {
        "preset": preset, "steps": res["global_step"], "steps_asked": steps,
        "parameters": sum(p.numel() for p in res["model"].parameters()),
        "grpo": {k: getattr(gcfg, k) for k in ("learning_rate", "beta", "prompts_per_step", "num_generations",
                                                  "max_completion_length", "lora_r")},
        "device": str(next(res["model"].parameters()).device), "dtype": str(next(res["model"].parameters()).dtype),
        "warm_start_s": round(warm_s, 3), "warm_start": {k: warm.get(k) for k in ("steps", "seconds", "device",
                                                                                  "final_loss")},
        "eval_before_s": round(eval_s, 3),
        "grpo_step_mean_s": step_mean, "grpo_step_first_s": step_times[0] if step_times else None,
        "grpo_total_s": res["seconds"],
        "tokens_per_s": (tokens[-1] / sum(step_times)) if tokens and step_times else None,
        "peak_gpu_memory_gib": peak,
        "reward_round_mean_s": round_mean, "reward_rounds_ok": mor.rounds_ok, "reward_rounds_failed": mor.rounds_failed,
        "federation_share_of_step": round_mean / step_mean if step_times and rounds else None,
        "accuracy_before": before["overall"], "accuracy_after": after["overall"],
        "collapsed_types_after": after["collapsed"],
        "collapse_guard": guard.stopped if guard else "off",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small,base", help="comma-separated presets (tiny, small, base)")
    ap.add_argument("--steps", default="50", help="comma-separated GRPO step counts")
    ap.add_argument("--sft-steps", type=int, default=None, help="warm-start steps (default: each preset's)")
    ap.add_argument("--lr", type=float, default=None, help="GRPO learning rate for every preset (default: preset's)")
    ap.add_argument("--beta", type=float, default=None, help="KL weight for every preset (default: preset's)")
    ap.add_argument("--eval-size", type=int, default=300, help="held-out test questions for accuracy")
    ap.add_argument("--guard-every", type=int, default=10, help="collapse-guard check every N steps (0: off)")
    ap.add_argument("--mode", default="secagg", choices=("plain", "secagg"), help="federated reward rounds' mode")
    ap.add_argument("--in-process", action="store_true", help="call the label experts in-process (no federation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny preset, 2 steps, 5 warm-start steps, 32 eval questions, on the CPU: checks the "
                         "benchmark runs; writes gpu_cpu_smoke.json")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/gpu.json)")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        a.presets, a.steps, a.eval_size, a.guard_every = "tiny", "2", 32, 1
        a.sft_steps = 5 if a.sft_steps is None else a.sft_steps
    device = "cpu" if a.cpu_smoke else None
    if not a.cpu_smoke and _cuda() is None:
        print("bench_gpu: no CUDA device here; run it on a GPU machine, or --cpu-smoke to check that it runs",
              file=sys.stderr)
        return 2
    out = a.out or ROOT / "benchmarks" / "results" / ("gpu_cpu_smoke.json" if a.cpu_smoke else "gpu.json")
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    steps = [int(s) for s in a.steps.split(",") if s.strip()]

    from mor_client.data.partition import make_federation_split
    from mor_server.alignment.calibration import calibrate_router
    from mor_server.alignment.pipeline import heldout_test
    from mor_server.alignment.features import FeatureExtractor
    from mor_server.alignment.inprocess import InProcessBackend

    os.environ["MOR_BENCH_SEED"] = str(a.seed)
    split = make_federation_split(seed=a.seed)
    test = heldout_test(split)[: a.eval_size]
    work = Path(tempfile.mkdtemp(prefix="mor-bench-gpu-"))
    features = FeatureExtractor()
    local = InProcessBackend({n.lower(): cls() for n, cls in (("ColorExpert", ColorExpert),
                                                              ("ShapeExpert", ShapeExpert),
                                                              ("YesNoExpert", YesNoExpert))})
    # abstain_z=None: every prompt goes to the clients (this measures rounds, not the router)
    router = calibrate_router(local, split.server_public, features, seed=a.seed, abstain_z=None)
    fed = None if a.in_process else Federation(work, a.seed, a.mode)
    cases = []
    try:
        backend = local if fed is None else fed.backend
        for preset in presets:
            for n in steps:
                print(f"bench_gpu: {preset} x {n} steps ...", flush=True)
                case = run_case(preset, n, split=split, test=test, backend=backend, router=router,
                                features=features, work=work, device=device, sft_steps=a.sft_steps, lr=a.lr,
                                beta=a.beta, guard_every=a.guard_every)
                print(json.dumps(case), flush=True)
                cases.append(case)
    finally:
        if fed is not None:
            fed.close()
    import torch
    import transformers
    import trl

    cuda = _cuda()
    res = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "reward": "in-process label experts" if a.in_process else
                     f"3 label-expert clients over loopback mTLS ({a.mode} rounds)",
           "device": cuda.get_device_name(0) if cuda and device != "cpu" else
                     f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
           "eval_size": len(test), "seed": a.seed, "cases": cases}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"bench_gpu: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
