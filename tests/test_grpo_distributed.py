"""GRPO scaled out through accelerate (DDP): two CPU processes (gloo) train the same policy for a few steps with
the MoR reward. Rank 0 runs one scoring round per generation batch for both ranks' completions; rank 1 never
touches the backend; both ranks get their rewards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("accelerate")


def _rank_main(policy_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from mor_client.data.easyvqa import load_easyvqa
    from mor_server.alignment.features import FeatureExtractor
    from mor_server.alignment.grpo import GRPORunConfig, make_prompt_dataset, run_grpo
    from mor_server.alignment.inprocess import InProcessBackend, LabelExpertScorer
    from mor_server.alignment.rewards import MoRReward
    from mor_server.alignment.router import MoRRouter

    examples = load_easyvqa("test")[:32]

    class Counting(InProcessBackend):
        calls: list = []

        def mixed_scores(self, items, weights):
            self.calls.append(len(items))
            return super().mixed_scores(items, weights)

    backend = Counting({"colour": LabelExpertScorer(examples, ["color"]),
                        "rest": LabelExpertScorer(examples, ["shape", "yesno"])})
    fx = FeatureExtractor()
    mor = MoRReward(backend, MoRRouter(["colour", "rest"], fx.dim, seed=0), fx, deadline_s=60)
    rewards_seen: list = []

    def recording(prompts=None, completions=None, **kw):
        r = mor(prompts, completions, **kw)
        rewards_seen.append(len(r))
        return r

    recording.__name__ = "mor_reward"
    cfg = GRPORunConfig(output_dir=str(Path(out_dir) / "grpo"), max_steps=2, prompts_per_step=2, num_generations=2,
                        max_completion_length=3, save_steps=0, progress=False)
    res = run_grpo(policy_dir, make_prompt_dataset(examples[:16]), [recording], None, cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({
        "world": world, "backend_calls": backend.calls, "rounds_ok": mor.rounds_ok, "rewards_seen": rewards_seen,
        "global_step": res["global_step"]}))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_process_grpo_runs_one_round_per_batch_on_rank0(tmp_path):
    import subprocess
    import sys

    from mor_server.alignment.policy import TinyLlavaConfig, build_tiny_llava, save_policy

    model, processor = build_tiny_llava(config=TinyLlavaConfig(seed=0))
    save_policy(model, processor, tmp_path / "policy")
    # a fresh interpreter forks the ranks: forking a process whose torch thread pools already ran deadlocks
    code = ("import sys; from accelerate import debug_launcher; from test_grpo_distributed import _rank_main; "
            "debug_launcher(_rank_main, args=(sys.argv[1], sys.argv[2]), num_processes=2)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "policy"), str(tmp_path)], capture_output=True,
                       text=True, timeout=540, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["global_step"] == r1["global_step"] == 2
    # every reward call on either rank got its rewards back
    assert r0["rewards_seen"] and r1["rewards_seen"] and len(r0["rewards_seen"]) == len(r1["rewards_seen"])
    # only rank 0 ran rounds: one per generation batch, over both ranks' prompts (2 prompts each)
    assert r1["backend_calls"] == [] and r1["rounds_ok"] == 0
    assert r0["rounds_ok"] == len(r0["rewards_seen"]) and r0["backend_calls"]
    assert all(n == 4 for n in r0["backend_calls"]), r0["backend_calls"]
