"""benchmarks/bench_baselines.py compares MoR with the parameter-sharing baselines on the policy the demo runs
(``--warm-start``): both families' cells of one warm start are reported side by side, never mixed with another
warm start's cells, and the committed ``sft`` grid keeps its cache keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _args(warm_start: str) -> SimpleNamespace:
    return SimpleNamespace(rounds=5, lr=1e-3, batch_size=16, local_epochs=1, delta=1e-5, max_grad_norm=1.0,
                           max_pairs=1000, eval_size=600, secagg=False, objective="sft", dpo_beta=0.1,
                           warm_start=warm_start)


def test_each_warm_start_has_its_own_baseline_cells_and_sft_keeps_its_keys():
    from bench_baselines import _cell_key

    sft = _cell_key("fedit", 8.0, 0, _args("sft"))
    # the key the committed sft grid was cached under (no warm-start field in the hash, no prefix)
    assert sft == "fedit-eps8-seed0-" + sft.rsplit("-", 1)[1] and not sft.startswith("sft")
    seeing = _cell_key("fedit", 8.0, 0, _args("seeing"))
    assert seeing.startswith("seeing-fedit-eps8-seed0-") and seeing.rsplit("-", 1)[1] != sft.rsplit("-", 1)[1]
    assert _cell_key("fedit", 8.0, 0, _args("seeing"), "adversary").startswith("seeing-adversary-fedit-")


def test_mor_cells_run_the_recipes_own_grpo_budget_unless_told_otherwise():
    from bench_baselines import reward_label

    assert reward_label("seeing", None) == "seeing"  # 150 steps, as the demo runs it
    assert reward_label("seeing", 150) == "seeing"
    assert reward_label("seeing", 400) == "seeing~max_steps=400"
    assert reward_label("sft", 400) == "sft"  # the committed grid's cells


def _reward_cell(policy: str, method: str, after: float) -> dict:
    acc = {"overall": after, "n": 600, "by_domain": {"color": 0.9, "shape": 0.8, "yesno": 0.8}, "diversity": {}}
    return {"policy": policy, "scenario": "honest", "method": method, "seed": 0, "seconds": 1.0,
            "grpo_seconds": 1.0, "before": dict(acc, overall=0.6), "after": acc, "rounds": 150}


def test_the_table_pairs_mor_and_the_baselines_of_the_same_warm_start(tmp_path, capsys):
    """With every cell cached nothing trains: the seeing table reads the seeing MoR cell and the seeing baseline
    cell, and ignores the sft MoR cell lying in the same cache."""
    from bench_baselines import _cell_key, main, reference_folder
    from bench_reward_ablation import cell_name

    reward_cells = tmp_path / "rewards" / "cells"
    reward_cells.mkdir(parents=True)
    for policy, after in (("seeing", 0.85), ("sft", 0.41)):
        (reward_cells / f"{cell_name(policy, 'honest', 'mor', 0)}.json").write_text(
            json.dumps(_reward_cell(policy, "mor", after)))
    cache = tmp_path / "baselines"
    (cache / "cells").mkdir(parents=True)
    baseline = {"method": "fedit", "epsilon_target": 8.0, "seed": 0, "secagg": False, "accuracy": 0.8,
                "by_domain": {"color": 0.9, "shape": 0.7, "yesno": 0.8}, "collapsed": [], "rounds": 5,
                "epsilon_per_client": {"client0": 7.9}, "update_bytes_per_client_per_round": 4096,
                "server_sees": "every client's update", "wall_s": 2.0, "scenario": "honest"}
    (cache / "cells" / f"{_cell_key('fedit', 8.0, 0, _args('seeing'))}.json").write_text(json.dumps(baseline))
    ref = reference_folder(cache, 0, "honest", "seeing")
    ref.mkdir(parents=True)
    (ref / "reference_accuracy_600.json").write_text(json.dumps(
        {"overall": 0.6, "n": 600, "by_domain": {"color": 0.95, "shape": 0.8, "yesno": 0.5}}))
    out = tmp_path / "out.json"
    assert main(["--warm-start", "seeing", "--privacy", "8", "--seeds", "0", "--methods", "mor", "fedit",
                 "--cache", str(cache), "--reward-cache", str(tmp_path / "rewards"), "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["mor"]["accuracy"] == [0.85] and rows["fedit"]["accuracy"] == [0.8]
    printed = capsys.readouterr().out
    assert "cached (85.0%)" in printed and "cached (80.0%)" in printed and "(seeing warm start)" in printed


def test_a_mor_cell_from_another_build_of_the_reference_is_measured_again(tmp_path, monkeypatch):
    """The baselines start from the reference now in the reward cache; a cached MoR cell that recorded another
    reference digest (another host's build) would credit the reward with the difference between the two builds,
    so it is run again, and one recording this build's digest is read."""
    import bench_baselines
    import bench_reward_ablation
    from bench_reward_ablation import cell_name, reference_dir

    ref = reference_dir("seeing", 0, tmp_path)
    ref.mkdir(parents=True)
    (ref / "model.safetensors").write_bytes(b"this host's build")
    here = bench_reward_ablation.reference_digest(ref)
    cells = tmp_path / "cells"
    cells.mkdir()
    f = cells / f"{cell_name('seeing', 'honest', 'mor', 0)}.json"
    f.write_text(json.dumps(dict(_reward_cell("seeing", "mor", 0.85), reference_sha256="0" * 64)))
    runs = []

    def fake_run(label, scenario, method, seed, cache, steps):
        runs.append((label, method, seed, steps))
        return dict(_reward_cell(label, method, 0.7), reference_sha256=here)

    monkeypatch.setattr(bench_reward_ablation, "run_cell", fake_run)
    row = bench_baselines._reward_cell("honest", "mor", 0, tmp_path, "seeing", cells)
    assert runs == [("seeing", "mor", 0, 150)] and row["accuracy"] == 0.7
    assert json.loads(f.read_text())["reference_sha256"] == here  # the re-measured cell replaced the stale one
    row = bench_baselines._reward_cell("honest", "mor", 0, tmp_path, "seeing", cells)
    assert len(runs) == 1 and row["accuracy"] == 0.7


def test_a_baseline_cell_from_another_build_of_the_reference_is_measured_again(tmp_path):
    """A baseline cell records the digest of the checkpoint it started from; once the reference in the cache is
    another build, the cell (and the reference's accuracy) no longer count as measured, and one without a digest,
    recorded before cells carried one, is still trusted."""
    from bench_baselines import reference_checkpoint
    from bench_reward_ablation import from_other_build, reference_digest, reference_dir

    ckpt = reference_checkpoint(tmp_path / "baselines", 0, "honest", "seeing", tmp_path / "rewards")
    assert ckpt == reference_dir("seeing", 0, tmp_path / "rewards")
    assert reference_checkpoint(tmp_path / "baselines", 1, "shapes", "sft").parts[-2:] == ("seed1-shapes", "reference")
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"first build")
    cell = {"accuracy": 0.8, "reference_sha256": reference_digest(ckpt)}
    assert not from_other_build(cell, ckpt)
    (ckpt / "model.safetensors").write_bytes(b"a rebuild on another host")
    assert from_other_build(cell, ckpt)
    assert not from_other_build({"accuracy": 0.8}, ckpt)
    assert not from_other_build(cell, tmp_path / "not-built")


def test_the_grid_reruns_a_baseline_cell_recorded_from_another_build(tmp_path, monkeypatch):
    """End to end through main(): the cached fedit cell recorded another checkpoint than the seeing reference now in
    the reward cache, so it is trained again (here a recorded stand-in for the federated run) and re-recorded with
    this build's digest."""
    import bench_baselines
    from bench_baselines import _cell_key, reference_folder
    from bench_reward_ablation import reference_digest, reference_dir

    ckpt = reference_dir("seeing", 0, tmp_path / "rewards")
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"this host's build")
    here = reference_digest(ckpt)
    cache = tmp_path / "baselines"
    (cache / "cells").mkdir(parents=True)
    f = cache / "cells" / f"{_cell_key('fedit', 8.0, 0, _args('seeing'))}.json"
    stale = {"method": "fedit", "epsilon_target": 8.0, "seed": 0, "secagg": False, "accuracy": 0.6,
             "by_domain": {"color": 0.9, "shape": 0.7, "yesno": 0.5}, "collapsed": [], "rounds": 5,
             "epsilon_per_client": {"client0": 7.9}, "update_bytes_per_client_per_round": 4096,
             "server_sees": "every client's update", "wall_s": 2.0, "scenario": "honest",
             "reference_sha256": "0" * 64}
    f.write_text(json.dumps(stale))
    acc = {"overall": 0.6, "n": 600, "by_domain": {"color": 0.95, "shape": 0.8, "yesno": 0.5}, "reference_sha256": here}
    ref = reference_folder(cache, 0, "honest", "seeing")
    ref.mkdir(parents=True)
    (ref / "reference_accuracy_600.json").write_text(json.dumps(acc))
    monkeypatch.setattr(bench_baselines, "_reference", lambda *a, **k: (None, [], None, None, acc))
    monkeypatch.setattr(bench_baselines, "client_examples", lambda *a, **k: {})
    trained = []

    async def fake_run(data, test, model, proc, method, eps, seed, args):
        trained.append((method, eps, seed))
        return dict(stale, accuracy=0.75, reference_sha256=None)

    monkeypatch.setattr(bench_baselines, "_federated_run", fake_run)
    out = tmp_path / "out.json"
    assert bench_baselines.main(["--warm-start", "seeing", "--privacy", "8", "--seeds", "0", "--methods", "fedit",
                                 "--cache", str(cache), "--reward-cache", str(tmp_path / "rewards"),
                                 "--out", str(out)]) == 0
    assert trained == [("fedit", 8.0, 0)]
    assert json.loads(f.read_text())["reference_sha256"] == here
    assert json.loads(out.read_text())["rows"][0]["accuracy"] == [0.75]
