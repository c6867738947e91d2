"""Crash and resume of the real ``mor demo`` (tiny settings): how fast its clients go when it is killed, and what a
rerun resumes from.

    .venv/bin/python benchmarks/bench_crash_resume.py [--workdir DIR] [--steps 12]

1. runs ``mor demo`` (two cnn clients on 48 pairs, ``secagg+dp``, a GRPO checkpoint every 2 steps) until
   ``checkpoint-2`` is complete, then ``kill -9``;
2. times how long each child recorded in ``WORKDIR/pids`` outlives it;
3. reruns the same command to the end and reads what it resumed from, and the ledgers (round ids charged).

Writes ``benchmarks/results/crash_resume.json``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mor_server.apps.procs import pid_alive, read_pidfile  # noqa: E402

MOR = [sys.executable, "-c", "import sys; from mor_server.apps.cli import mor_main; sys.exit(mor_main())"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    base = a.workdir or Path(tempfile.mkdtemp(prefix="mor-crash-"))
    base.mkdir(parents=True, exist_ok=True)
    work = base / "demo"
    clients = [{"name": n, "arch": "cnn", "partition": f"client{i}", "max_pairs": 48, "epochs": 1,
                "pretrain_epochs": 0} for i, n in enumerate(("a-color", "b-shape"))]
    cfg = {"workdir": str(work), "mode": "secagg+dp", "calibration_mode": "dp", "w_format": 0.0, "warm_start": "sft",
           "client_budget": 1000, "dp_noise_multiplier": 4.0, "clients": clients,
           "grpo": {"max_steps": a.steps, "save_steps": 2, "prompts_per_step": 2, "num_generations": 2},
           "alignment": {"eval_size": 12, "curve_size": 0, "sft_steps": 2, "router_steps": 20, "heldout_pairs": 0}}
    cfg_path = base / "run.json"
    cfg_path.write_text(json.dumps(cfg))
    grpo = work / "alignment" / "grpo"

    def demo(tag):
        return subprocess.Popen([*MOR, "demo", "--config", str(cfg_path)], stdout=open(base / f"{tag}.out", "w"),
                                stderr=open(base / f"{tag}.err", "w"), cwd=ROOT, start_new_session=True)

    t0 = time.time()
    p = demo("first")
    while not (grpo / "checkpoint-2" / "mor_state.json").exists():
        if p.poll() is not None:
            raise SystemExit(f"the demo ended before checkpoint-2 (exit {p.returncode}); see {base}/first.err")
        time.sleep(0.05)
    kids = {f.name.removesuffix(".pid.json"): read_pidfile(f)["pid"] for f in (work / "pids").glob("*.pid.json")}
    t_kill = time.time()
    p.kill()
    p.wait()
    left, gone = dict(kids), {}
    while left and time.time() - t_kill < 30:
        for n, pid in list(left.items()):
            if not pid_alive(pid):
                gone[n] = round(time.time() - t_kill, 3)
                left.pop(n)
        time.sleep(0.02)
    t1 = time.time()
    p = demo("rerun")
    rc = p.wait()
    t2 = time.time()
    rep = json.loads((work / "report" / "demo.json").read_text()) if rc == 0 else {}
    ledgers = {}
    for c in clients:
        with sqlite3.connect(work / "clients" / c["name"] / "ledger.sqlite") as db:
            ids = [r[0] for r in db.execute("SELECT round_id FROM entries WHERE kind = 'release'")]
        ledgers[c["name"]] = {"releases": len(ids), "distinct_round_ids": len(set(ids))}
    out = {"first_run_to_checkpoint_2_s": round(t_kill - t0, 1), "children_gone_after_kill_s": gone,
           "children_still_alive_after_30s": left, "rerun_exit": rc, "rerun_wall_s": round(t2 - t1, 1),
           "resumed_from": Path(rep["alignment"]["grpo"]["resumed_from"]).name if rep else None,
           "final_step": rep.get("alignment", {}).get("grpo", {}).get("global_step"), "ledgers": ledgers,
           "workdir": str(base)}
    print(json.dumps(out, indent=1))
    res = ROOT / "benchmarks" / "results" / "crash_resume.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(out, indent=1))
    return 0 if rc == 0 and not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
