"""benchmarks/bench_gpu.py runs (its --cpu-smoke mode: tiny preset, 2 GRPO steps, rewards from 3 label-expert
client processes over loopback mTLS with SecAgg+ rounds) and writes the fields the README's GPU table reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_gpu_cpu_smoke_runs_and_writes_json(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--cpu-smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["reward"].startswith("3 label-expert clients over loopback") and res["device"].startswith("CPU")
    (case,) = res["cases"]
    assert case["preset"] == "tiny" and case["steps"] == 2 and case["device"] == "cpu"
    assert case["reward_rounds_ok"] == 2 and case["reward_rounds_failed"] == 0
    assert case["grpo_step_mean_s"] > 0 and case["tokens_per_s"] > 0 and 0 < case["federation_share_of_step"] < 1
    assert case["peak_gpu_memory_gib"] is None and case["warm_start"]["device"] == "cpu"
    assert 0 <= case["accuracy_before"] <= 1 and 0 <= case["accuracy_after"] <= 1
