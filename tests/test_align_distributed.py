"""The whole alignment job under accelerate (what `accelerate launch -m mor.entry align` runs on every rank):
two CPU processes (gloo). Rank 0 warm-starts the policy, calibrates the router (the only scoring round outside
GRPO), runs GRPO's reward rounds for both ranks and writes the report; rank 1 loads the reference rank 0 cached
and the router it saved, trains on the gathered rewards, and never calls the reward backend."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import pytest

pytest.importorskip("accelerate")


def _rank_main(out_dir: str) -> None:
    import torch.distributed as dist

    from mor_client.data.partition import make_federation_split

    from mor_server.alignment.grpo import GRPORunConfig
    from mor_server.alignment.guard import CollapseGuardConfig
    from mor_server.alignment.inprocess import InProcessBackend, LabelExpertScorer
    from mor_server.alignment.pipeline import AlignmentConfig, run_alignment
    from mor_server.alignment.policy import TinyLlavaConfig
    from mor_server.alignment.warmstart import SFTConfig

    split = make_federation_split(seed=0, public_size=60, unlabeled_size=32, max_heldout=8)
    known = list(split.server_public) + list(split.server_unlabeled)

    class Counting(InProcessBackend):
        calls: dict = {"client_scores": 0, "mixed_scores": 0}

        def client_scores(self, items, *, purpose):
            self.calls["client_scores"] += 1
            return super().client_scores(items, purpose=purpose)

        def mixed_scores(self, items, weights):
            self.calls["mixed_scores"] += 1
            return super().mixed_scores(items, weights)

    backend = Counting({f"expert_{d}": LabelExpertScorer(known, [d]) for d in ("color", "shape", "yesno")})
    cfg = AlignmentConfig(
        work_dir=str(Path(out_dir) / "run"),
        tiny=TinyLlavaConfig(image_size=32, patch_size=16, vision_hidden=32, text_hidden=32, intermediate=64, heads=2),
        sft=SFTConfig(steps=4, batch_size=16),
        grpo=GRPORunConfig(max_steps=2, prompts_per_step=2, num_generations=2, max_completion_length=2,
                           save_steps=0),
        router_steps=30, eval_size=8, curve_size=0, progress=False, device="cpu",
        collapse_guard=CollapseGuardConfig(every=1, probe_size=8))
    rep = run_alignment(backend, public=split.server_public, unlabeled=split.server_unlabeled,
                        test=list(split.server_public[:8]), config=cfg)
    rank = dist.get_rank()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({
        "world": dist.get_world_size(), "calls": backend.calls, "global_step": rep["grpo"]["global_step"],
        "warm_cached": rep["warm_start"]["cached"], "rounds_ok": rep["rounds"]["ok"],
        "guard_checks": [c["step"] for c in rep["collapse_guard"]["checks"]]}))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_alignment_under_two_processes_scores_on_rank0_only(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from accelerate import debug_launcher; from test_align_distributed import _rank_main; "
            "debug_launcher(_rank_main, args=(sys.argv[1],), num_processes=2)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=540,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["global_step"] == r1["global_step"] == 2
    # rank 0 warm-started and cached the reference; rank 1 loaded it
    assert r0["warm_cached"] is False and r1["warm_cached"] is True
    # one calibration round and one reward round per generation batch, all on rank 0
    assert r0["calls"] == {"client_scores": 1, "mixed_scores": 2} and r0["rounds_ok"] == 2
    assert r1["calls"] == {"client_scores": 0, "mixed_scores": 0}
    # the collapse guard checked at the same steps on both ranks; one report, written by rank 0
    assert r0["guard_checks"] == r1["guard_checks"] == [0, 1, 2]
    rep = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert rep["grpo"]["global_step"] == 2 and rep["rounds"]["ok"] == 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mor_align_runs_under_torchrun_with_two_processes(tmp_path):
    """The documented command shape: `torchrun`/`accelerate launch` start `mor align` once per rank; rank 0 holds
    the workdir lock (the other rank does not try to) and scores for both; one report."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    work = tmp_path / "w"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mor.entry",
                        "align", "--warm-start", "sft", "--steps", "2", "--sft-steps", "2", "--eval-size", "8",
                        "--device", "cpu",
                        "--w-format", "0", "--collapse-every", "1", "--workdir", str(work)],
                       capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    # the two ranks share one stdout, so one rank's line can land in the middle of the other's: match the
    # summaries anywhere, not at line starts
    lines = [json.loads(m) for m in re.findall(r"KL to reference [0-9.]+; rounds (\{[^}]*\}); GRPO", r.stdout)]
    assert len(lines) == 2, r.stdout[-2000:]  # both ranks finished
    rank0 = max(lines, key=lambda x: x["ok"])
    rank1 = min(lines, key=lambda x: x["ok"])
    assert rank0["ok"] == 2 and rank1 == {"ok": 0, "failed": 0, "failed_attempts": 0, "unscored_completions": 0,
                                             "abstained_prompts": 0}
    rep = json.loads((work / "report" / "report.json").read_text())
    assert rep["grpo"]["global_step"] == 2 and rep["rounds"]["ok"] == 2
