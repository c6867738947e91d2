"""A run that dies leaves nothing behind, and a rerun resumes (issue #14, item 4).

The slow test kills the REAL ``mor demo`` (its smallest settings: two cnn clients on a few pairs, 8 GRPO steps with a
checkpoint every 2) with SIGKILL during reward-model training and during GRPO, stops it once with SIGTERM, and
reruns it: no ``mor-client`` survives its orchestrator, the rerun resumes GRPO from the newest checkpoint, every
ledger charges each round id at most once (and the dp calibration round exactly once: the resumed run reuses the
router), and every audit log verifies. The fast tests pin the pieces (parent-death watch, pidfile reaping, card
written last, incomplete checkpoints skipped, warm-start cache swapped in whole).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mor_server.apps.procs import pid_alive, read_pidfile, reap_stale, write_pidfile

ROOT = Path(__file__).resolve().parent.parent
MOR = [sys.executable, "-c", "import sys; from mor_server.apps.cli import mor_main; sys.exit(mor_main())"]


def _wait(pred, timeout: float, every: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()


# ------------------------------------------------------------------------------------------------ fast pieces
@pytest.mark.parametrize("pdeathsig", [True, False], ids=["prctl", "watchdog-only"])
def test_child_exits_when_its_parent_is_killed(tmp_path, pdeathsig):
    """A `mor-client`-style child armed with MOR_PARENT_PID exits within seconds of its parent's SIGKILL, through
    Linux's parent-death signal or, where there is none, the parent-pid watchdog thread alone."""
    child_code = ("import time; import mor_client.parentwatch as w; "
                  + ("" if pdeathsig else "w._set_pdeathsig = lambda sig: False; ")
                  + "assert w.watch_parent(); time.sleep(120)")
    parent_code = ("import os, subprocess, sys, time\n"
                   f"p = subprocess.Popen([sys.executable, '-c', {child_code!r}], "
                   "env={**os.environ, 'MOR_PARENT_PID': str(os.getpid())}, start_new_session=True)\n"
                   "print(p.pid, flush=True)\n"
                   "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = int(parent.stdout.readline())
    try:
        assert pid_alive(child)
        time.sleep(1.5)  # let the child arm its watch (imports)
        assert pid_alive(child)
        parent.kill()
        parent.wait(10)
        assert _wait(lambda: not pid_alive(child), 8), "the child outlived its killed parent"
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_reap_stale_stops_recorded_processes_only(tmp_path):
    argv = [sys.executable, "-c", "import time; time.sleep(120)"]
    victim = subprocess.Popen(argv, start_new_session=True)
    other = subprocess.Popen(argv, start_new_session=True)
    try:
        pids = tmp_path / "pids"
        write_pidfile(pids / "x-join.pid.json", victim, argv, "join")
        # a pidfile whose pid now runs something else (pid reuse): must not be touched
        write_pidfile(pids / "y-join.pid.json", other, [sys.executable, "-m", "mor_client.cli", "join"], "join")
        rec = read_pidfile(pids / "x-join.pid.json")
        rec["parent"] = -1  # written by "another" orchestrator (reap_stale never reaps its own children)
        (pids / "x-join.pid.json").write_text(json.dumps(rec))
        rec = read_pidfile(pids / "y-join.pid.json")
        rec["parent"] = -1
        (pids / "y-join.pid.json").write_text(json.dumps(rec))
        reaped = reap_stale(pids, grace=5)
        assert [r["pid"] for r in reaped] == [victim.pid]
        assert victim.wait(5) is not None
        assert other.poll() is None
        assert not list(pids.glob("*.pid.json"))
    finally:
        for p in (victim, other):
            if p.poll() is None:
                p.kill()
            p.wait(5)


def test_model_folder_without_card_is_not_a_model(tmp_path, monkeypatch):
    """save_model_dir removes card.json first and writes it last: interrupted mid-save, no card is left."""
    import torch

    from mor_client.rewards import store
    from mor_client.rewards.features import PAD, SEP, UNK, Vocab

    class Boom(Exception):
        pass

    model = torch.nn.Linear(2, 1)
    d = tmp_path / "m"
    store.save_model_dir(d, model, Vocab([PAD, UNK, SEP, "a"]), {"architecture": "x"})
    assert (d / store.CARD).is_file()
    real = store.atomic_write_bytes

    def dying(path, data):
        if path.name == store.VOCAB:
            raise Boom()  # "killed" after the new weights, before the card
        real(path, data)

    monkeypatch.setattr(store, "atomic_write_bytes", dying)
    with pytest.raises(Boom):
        store.save_model_dir(d, torch.nn.Linear(2, 1), Vocab([PAD, UNK, SEP, "a"]), {"architecture": "x"})
    assert not (d / store.CARD).exists()
    with pytest.raises(ValueError, match="no card.json"):
        store.read_card(d)


def _fake_checkpoint(d: Path, step: int, *, state: bool = True, extra=()) -> Path:
    ck = d / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"w")
    (ck / "optimizer.pt").write_bytes(b"o")
    if state:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for f in extra:
        (ck / f).write_text("{}")
    return ck


def test_latest_checkpoint_skips_half_written_ones(tmp_path):
    from mor_server.alignment.grpo import discard_incomplete_checkpoints, latest_checkpoint

    _fake_checkpoint(tmp_path, 2, extra=["mor_state.json"])
    _fake_checkpoint(tmp_path, 4)  # killed before the on_save callback wrote mor_state.json
    _fake_checkpoint(tmp_path, 6, state=False)  # killed before trainer_state.json
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_text('{"global_st')  # torn
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert latest_checkpoint(tmp_path, require=("mor_state.json",)).name == "checkpoint-2"
    assert sorted(discard_incomplete_checkpoints(tmp_path, require=("mor_state.json",))) == \
        ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_resume_plan_needs_the_same_unfinished_run(tmp_path):
    from mor_server.alignment import runstate

    work = tmp_path
    p = runstate.plan(work, "k1", "auto")
    assert p.checkpoint is None and not p.reuse_router and "no run.json" in p.why_fresh
    (work / "router").mkdir()
    (work / "router" / "router.json").write_text("{}")
    runstate._write_state(work, {**runstate.read_state(work), "router": True})
    _fake_checkpoint(work / "grpo", 2, extra=[runstate.MOR_STATE])
    p = runstate.plan(work, "k1", "auto")
    assert p.reuse_router and p.checkpoint.name == "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="settings"):
        runstate.plan(work, "k2", True)
    p = runstate.plan(work, "k2", "auto")  # other settings: fresh, old checkpoints gone
    assert p.checkpoint is None and not (work / "grpo" / "checkpoint-2").exists()


def test_a_resumed_run_never_reuses_a_router_or_reward_built_with_other_settings(tmp_path):
    """Changing how the router is built (its features, its abstention) or the collapse guard between a killed run and
    its restart must start fresh: a resumed run reloads the interrupted run's router, so a key without them would
    silently ignore `--no-router-abstain` or `--router-features` on the restart."""
    from dataclasses import fields, replace

    from mor_server.alignment import runstate
    from mor_server.alignment.guard import CollapseGuardConfig
    from mor_server.alignment.pipeline import AlignmentConfig

    base = AlignmentConfig()
    key = lambda c: runstate.run_key(c, tmp_path, sizes={})  # noqa: E731
    for other in (replace(base, router_abstain_z=None), replace(base, router_abstain_z=3.0),
                  replace(base, router_features=("type", "image")),
                  replace(base, collapse_guard=CollapseGuardConfig(every=7))):
        assert key(other) != key(base), other
    # a config file's 2 is the default's 2.0
    assert key(replace(base, router_abstain_z=2, router_rank_weight=1)) == key(base)
    assert key(replace(base, router_abstain_z=np.float32(2), top_k=np.int64(2))) == key(replace(base, top_k=2))
    assert key(replace(base, collapse_guard=CollapseGuardConfig(max_empty_share=1))) == \
        key(replace(base, collapse_guard=CollapseGuardConfig(max_empty_share=1.0)))
    # settings that do not change what the run computes may change on a restart
    assert key(replace(base, eval_size=10, curve_every=5, progress=False, retries=3)) == key(base)
    # every field is either in the key or named as not in it (a new field forces the decision)
    named = set(runstate._CONFIG_FIELDS) | set(runstate._NOT_IN_KEY)
    assert {f.name for f in fields(AlignmentConfig)} == named
    # the restart says which setting changed, and that the interrupted run is not continued
    work = tmp_path / "work"
    s1 = runstate.run_settings(base, tmp_path, sizes={})
    runstate.plan(work, runstate.settings_key(s1), "auto", settings=s1)
    s2 = runstate.run_settings(replace(base, router_abstain_z=None), tmp_path, sizes={})
    p = runstate.plan(work, runstate.settings_key(s2), "auto", settings=s2)
    assert p.interrupted and not p.reuse_router
    assert p.why_fresh == "settings changed since the interrupted run: router_abstain_z: 2.0 -> None"


def test_warm_start_cache_is_swapped_in_whole(tmp_path, monkeypatch):
    """A warm start killed while saving leaves no cache that the next run would trust."""
    from mor_server.alignment import warmstart

    class Boom(Exception):
        pass

    def dying_save(model, processor, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")
        raise Boom()

    monkeypatch.setattr(warmstart, "save_policy", dying_save)
    monkeypatch.setattr(warmstart, "sft_warm_start", lambda *a, **k: {"steps": 0})
    import torch

    monkeypatch.setattr(warmstart, "build_tiny_llava", lambda words=None, config=None: (torch.nn.Linear(1, 1), object()))
    monkeypatch.setattr(warmstart, "examples_digest", lambda ex: "d", raising=False)
    cache = tmp_path / "reference"
    with pytest.raises(Boom):
        warmstart.warm_start_cached(cache, [object()], progress=False)
    assert not (cache / "warm_start.json").exists() and not (cache / "config.json").exists()


def test_join_recovers_a_torn_audit_log(tmp_path, pki_dir):
    """A client killed mid-write leaves a torn last line; `mor-client join` moves it aside, records a signed
    recovery entry (privacy/audit/log.py) and carries on, instead of dying with TornTailError."""
    import socket

    from privacy.audit import AuditLog, read_entries
    from privacy.pki import ClientCredentials

    creds = pki_dir / "clients" / "alice"
    log = tmp_path / "audit.jsonl"
    with AuditLog(log, signing_key=ClientCredentials.from_dir(creds).identity_key(), actor="client:alice") as a:
        a.append("refusal", {"round_id": "r1", "mode": "dp", "code": "X", "reason": "test", "remaining_epsilon": 1.0})
    size = log.stat().st_size
    with open(log, "ab") as f:
        f.write(b'{"actor":"client:alice","event":"release","pay')  # the kill hit mid-write
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there: the client gives up after one attempt
    r = subprocess.run([sys.executable, "-m", "mor_client.cli", "join", "--server", f"localhost:{port}", "--creds",
                        str(creds), "--scorer", "fedutil:LengthScorer", "--audit", str(log), "--max-attempts", "1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
    assert "TornTailError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "recovered after an unclean shutdown" in r.stdout, r.stdout + r.stderr
    events = [e.event for e in read_entries(log)]
    assert "recovery" in events and events[-1] == "checkpoint"
    assert (tmp_path / f"audit.jsonl.torn-{size}").read_bytes().startswith(b'{"actor"')
    from privacy.audit import load_public_key, verify_log

    v = verify_log(log, load_public_key(creds / "identity.crt"))
    assert v.ok, v


# ------------------------------------------------------------------------------------------------ the real demo
def _demo(cfg_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = open(log, "wb")
    return subprocess.Popen([*MOR, "demo", "--config", str(cfg_path)], stdout=out, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT, start_new_session=True)


def _pidfiles(work: Path) -> dict[str, dict]:
    return {p.name: read_pidfile(p) for p in (work / "pids").glob("*.pid.json")} if (work / "pids").is_dir() else {}


def _kill_and_check_orphans(proc: subprocess.Popen, work: Path, sig=signal.SIGKILL, within: float = 8) \
        -> dict[str, dict]:
    """Kill the demo; every child it recorded must be gone within a few seconds."""
    children = _pidfiles(work)
    proc.send_signal(sig)
    proc.wait(60)
    gone = _wait(lambda: not any(pid_alive(r["pid"]) for r in children.values() if r), within)
    alive = {n: r["pid"] for n, r in children.items() if r and pid_alive(r["pid"])}
    for pid in alive.values():  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert gone, f"orphans survived the killed demo: {alive}"
    return children


def _ledger_rounds(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        return [(r[0], r[1]) for r in db.execute("SELECT round_id, mechanism FROM entries WHERE kind = 'release'")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_demo_leaves_nothing_behind_and_resumes(tmp_path):
    work = tmp_path / "demo"
    # w_format 0: every completion is sent to the clients, so every GRPO step is a charged secagg+dp round
    cfg = {"workdir": str(work), "seed": 0, "mode": "secagg+dp", "calibration_mode": "dp", "w_format": 0.0,
           "warm_start": "sft",
           "client_budget": 1000, "dp_noise_multiplier": 4.0,
           "clients": [{"name": "a-color", "arch": "cnn", "partition": "client0", "max_pairs": 48, "epochs": 1,
                        "pretrain_epochs": 0},
                       {"name": "b-shape", "arch": "cnn", "partition": "client1", "max_pairs": 48, "epochs": 1,
                        "pretrain_epochs": 0}],
           "grpo": {"max_steps": 8, "save_steps": 2, "prompts_per_step": 2, "num_generations": 2},
           "alignment": {"eval_size": 12, "curve_size": 0, "sft_steps": 2, "router_steps": 20, "heldout_pairs": 0}}
    cfg_path = tmp_path / "run.json"
    cfg_path.write_text(json.dumps(cfg))
    grpo = work / "alignment" / "grpo"

    # 0. SIGINT (Ctrl-C) during reward-model training: one line, exit 130, the training process stopped too
    p = _demo(cfg_path, tmp_path / "run0.log")
    assert _wait(lambda: (work / "pids" / "a-color-train.pid.json").exists() or p.poll() is not None, 180)
    assert p.poll() is None, (tmp_path / "run0.log").read_text()[-3000:]
    kids = _kill_and_check_orphans(p, work, signal.SIGINT)
    err0 = p.stderr.read().decode()
    assert p.returncode == 130 and "Traceback" not in err0, err0
    assert err0.strip().splitlines()[-1].startswith("mor demo: interrupted by SIGINT: every process it started is "
                                                    "stopped"), err0
    assert "a-color-train.pid.json" in kids and not _pidfiles(work)
    assert not (work / "clients" / "a-color" / "model").exists()

    # 1. SIGKILL during reward-model training (the second client's `mor-client train` is running)
    p = _demo(cfg_path, tmp_path / "run1.log")
    assert _wait(lambda: (work / "pids" / "b-shape-train.pid.json").exists() or p.poll() is not None, 180), \
        (tmp_path / "run1.log").read_text()[-3000:]
    assert p.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
    # the trainer may be killed before it armed its watch: it then exits as soon as it does (after its first
    # imports, ~1 s; more on a loaded machine)
    kids = _kill_and_check_orphans(p, work, within=15)
    assert "b-shape-train.pid.json" in kids
    assert (work / "clients" / "a-color" / "model" / "card.json").is_file()
    assert not (work / "clients" / "b-shape" / "model").exists()  # never a half-trained model in the cache

    # 2. rerun; SIGKILL during GRPO once a checkpoint exists
    p = _demo(cfg_path, tmp_path / "run2.log")
    assert _wait(lambda: (grpo / "checkpoint-2" / "mor_state.json").exists() or p.poll() is not None, 300)
    assert p.poll() is None, (tmp_path / "run2.log").read_text()[-3000:] + p.stderr.read().decode()[-3000:]
    log2 = (tmp_path / "run2.log").read_text()
    assert "a-color: reusing cached cnn reward model" in log2 and "b-shape: training a cnn" in log2
    kids = _kill_and_check_orphans(p, work)
    assert {"a-color-join.pid.json", "b-shape-join.pid.json"} <= set(kids)
    # as if the kill had hit mid-write: a torn last line in the server's and a client's audit log
    torn = {}
    for log in (work / "server-audit.jsonl", work / "clients" / "a-color" / "audit.jsonl"):
        torn[log] = log.stat().st_size
        with open(log, "ab") as f:
            f.write(b'{"actor":"torn-by-the-test","ev')
    calibration = {n: sorted(r for r, m in _ledger_rounds(work / "clients" / n / "ledger.sqlite")
                             if m != "secagg+dp") for n in ("a-color", "b-shape")}
    assert all(calibration.values()), calibration  # the dp calibration round was charged (once per attempt)

    # 3. rerun; SIGTERM during GRPO: a clean stop with one line, a checkpoint to resume from
    p = _demo(cfg_path, tmp_path / "run3.log")
    assert _wait(lambda: (grpo / "checkpoint-4" / "mor_state.json").exists() or p.poll() is not None, 300)
    assert p.poll() is None, (tmp_path / "run3.log").read_text()[-3000:] + p.stderr.read().decode()[-3000:]
    log3 = (tmp_path / "run3.log").read_text()
    assert "resuming the interrupted alignment run" in log3 and "GRPO from checkpoint-2" in log3, log3[-3000:]
    kids = _kill_and_check_orphans(p, work, signal.SIGTERM)
    err3 = p.stderr.read().decode()
    assert p.returncode == 128 + signal.SIGTERM, err3
    assert "Traceback" not in err3, err3
    last = err3.strip().splitlines()[-1]
    assert last.startswith("mor demo: interrupted by SIGTERM: GRPO stopped at step "), err3
    stopped_at = int(last.split("GRPO stopped at step ")[1].split()[0])
    assert 4 <= stopped_at < 8 and f"checkpoint-{stopped_at} saved" in last
    assert not _pidfiles(work), "a clean stop removes its pidfiles"

    # 4. rerun to the end: resumes from the SIGTERM checkpoint
    p = _demo(cfg_path, tmp_path / "run4.log")
    assert p.wait(420) == 0, (tmp_path / "run4.log").read_text()[-3000:] + p.stderr.read().decode()[-3000:]
    log4 = (tmp_path / "run4.log").read_text()
    assert f"GRPO from checkpoint-{stopped_at}" in log4 and f"GRPO resumed from checkpoint-{stopped_at}" in log4
    rep = json.loads((work / "report" / "demo.json").read_text())
    g = rep["alignment"]["grpo"]
    assert g["global_step"] == 8 and g["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    steps = [h["step"] for h in rep["alignment"]["log_history"] if "step" in h]
    assert min(steps) <= 2 and max(steps) == 8  # the history of the interrupted runs is kept

    # ledgers: each round id charged at most once; no second calibration charge (the resumed runs reused the router)
    for name in ("a-color", "b-shape"):
        rounds = _ledger_rounds(work / "clients" / name / "ledger.sqlite")
        ids = [r for r, _ in rounds]
        assert len(ids) == len(set(ids)), f"{name}: a round charged twice"
        assert sorted(r for r, m in rounds if m != "secagg+dp") == calibration[name], rounds

    # every audit log verifies (closed cleanly by the last run, with the crashes recorded as recovery entries)
    pki = work / "pki"
    logs = [(work / "server-audit.jsonl", pki / "server" / "identity.crt")] + [
        (work / "clients" / n / "audit.jsonl", pki / "clients" / n / "identity.crt") for n in ("a-color", "b-shape")]
    for log, cert in logs:
        r = subprocess.run([*MOR, "audit", "verify", str(log), "--public-key", str(cert), "--ca",
                            str(pki / "ca" / "ca.crt")], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, (log, r.stdout, r.stderr)
    server_events = [json.loads(line)["event"] for line in (work / "server-audit.jsonl").read_text().splitlines()]
    assert "recovery" in server_events  # the SIGKILLed runs left the server's log open; reopening recorded it
    for log, offset in torn.items():  # the torn tails were moved aside (never silently dropped) and recorded
        assert log.with_name(f"{log.name}.torn-{offset}").read_bytes() == b'{"actor":"torn-by-the-test","ev'
        assert f'"torn_offset":{offset}' in log.read_text()
