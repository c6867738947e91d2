"""benchmarks/bench_reward_ablation.py re-reports the committed grid from a fresh clone: the cells recorded in the
results file are restored into an empty cache (never over a cached cell), and a ``server-sft`` cell (no GRPO, no
reference built) is reported and paired with MoR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _acc(overall: float, color: float, n: int = 600) -> dict:
    div = {t: {"distinct_answers": 3, "top_answer_share": 0.4, "majority_rate": 0.5, "gold_distinct": 3}
           for t in ("color", "shape", "yesno")}
    return {"overall": overall, "n": n, "by_domain": {"color": color, "shape": 0.5, "yesno": 0.6}, "diversity": div}


def _cell(method: str, seed: int, after: float, before: float | None = 0.4, n: int = 600,
          rank_weight: float | None = None) -> dict:
    cell = {"policy": "compact+synthetic+sft", "scenario": "honest", "method": method, "seed": seed,
            "seconds": 1.0, "grpo_seconds": 0.0 if method == "server-sft" else 1.0,
            "before": _acc(before, 0.2) if before is not None else None, "after": _acc(after, 0.9, n)}
    if method.startswith("mor"):  # a learned router records the rank_weight it was fitted with
        cell["router"] = {"routing": "learned",
                          "rank_weight": (0.0 if method.endswith("-ce") else 1.0) if rank_weight is None
                          else rank_weight}
    return cell



def _report(cache: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_reward_ablation.py"), "--report-only",
                           "--cache", str(cache), "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)


def test_report_only_restores_recorded_cells_and_pairs_mor_with_the_server_sft_baseline(tmp_path):
    out = tmp_path / "results.json"
    cells = [_cell("mor", 0, 0.75), _cell("mor", 1, 0.70), _cell("server-sft", 0, 0.65, before=None),
             _cell("server-sft", 1, 0.72, before=None)]
    out.write_text(json.dumps({"summary": {}, "cells": cells}))
    cache = tmp_path / "cache"
    # a cell already in the cache wins over the recorded one (the cache holds the newer measurement)
    (cache / "cells").mkdir(parents=True)
    newer = _cell("mor", 1, 0.80)
    (cache / "cells" / "compact_synthetic_sft-honest-mor-seed1.json").write_text(json.dumps(newer))

    r = _report(cache, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored 3 cells" in r.stdout
    assert sorted(p.name for p in (cache / "cells").glob("*.json")) == [
        "compact_synthetic_sft-honest-mor-seed0.json", "compact_synthetic_sft-honest-mor-seed1.json",
        "compact_synthetic_sft-honest-server-sft-seed0.json", "compact_synthetic_sft-honest-server-sft-seed1.json"]
    summary = json.loads(out.read_text())["summary"]
    assert summary["compact+synthetic+sft/honest/mor"]["aligned"] == [75.0, 80.0]
    base = summary["compact+synthetic+sft/honest/server-sft"]
    assert base["aligned"] == [65.0, 72.0] and base["reference"] == []  # no reference built: blank, not zero
    pair = summary["compact+synthetic+sft/honest/mor-minus-server-sft"]
    assert [round(x, 6) for x in pair["points"]] == [10.0, 8.0]

    # a second report restores nothing and gives the same summary
    r2 = _report(cache, out)
    assert r2.returncode == 0 and "restored" not in r2.stdout
    assert json.loads(out.read_text())["summary"] == summary


def test_cells_from_different_builds_of_a_reference_are_not_paired(tmp_path):
    # a reference rebuilt on another host can be another checkpoint: MoR from one build minus uniform from another
    # would credit the reward with the difference between the references
    out = tmp_path / "results.json"
    cells = [_cell("mor", 0, 0.74, before=0.507), _cell("uniform", 0, 0.65, before=0.495),
             _cell("mor", 1, 0.70), _cell("uniform", 1, 0.66)]
    out.write_text(json.dumps({"summary": {}, "cells": cells}))
    r = _report(tmp_path / "cache", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("not paired: compact+synthetic+sft honest seed 0: mor and uniform started from different references "
            "(50.7% and 49.5%); run both cells from one build") in r.stdout
    pair = json.loads(out.read_text())["summary"]["compact+synthetic+sft/honest/mor-minus-uniform"]
    assert pair["seeds"] == [1] and [round(x, 6) for x in pair["points"]] == [4.0]


def test_pairing_needs_the_same_reference_overall_and_per_type():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_reward_ablation import same_reference

    mor = _cell("mor", 0, 0.7)
    assert same_reference(mor, _cell("uniform", 0, 0.6))
    other = _cell("uniform", 0, 0.6)
    other["before"]["by_domain"]["shape"] = 0.45  # the same overall accuracy, another checkpoint
    assert not same_reference(mor, other)
    # the server-labels baseline records the label's own reference when it is built, and pairs only with its cells
    assert same_reference(mor, _cell("server-sft", 0, 0.65))
    assert not same_reference(mor, _cell("server-sft", 0, 0.65, before=0.5))
    assert same_reference(mor, _cell("server-sft", 0, 0.65, before=None))  # that reference was not built
    assert not same_reference(mor, _cell("uniform", 0, 0.6, before=None))  # a GRPO cell without its reference


def test_another_grpo_budget_is_another_cell(benchmark_script, tmp_path):
    """`--steps 800` must not write (or reuse) the 400-step cell: its cells carry ~max_steps=800, which run_cell applies."""
    b = benchmark_script("bench_reward_ablation")
    assert b.grpo_overrides("compact+synthvqa~max_steps=800") == {"max_steps": 800}
    assert b.cell_name("compact+synthvqa~max_steps=800", "honest", "oracle", 1) != \
        b.cell_name("compact+synthvqa", "honest", "oracle", 1)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_reward_ablation.py"), "--steps", "0",
                        "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == "--steps must be >= 1, got 0"


def test_unknown_method_is_one_line_naming_the_choices(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_reward_ablation.py"), "--methods", "sft300",
                        "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == ("--methods: unknown reward 'sft300'; use mor, mor-ce, mor-iq, mor-iq-ce, uniform, "
                                                 "oracle, server, server-sft, mor+abstain, uniform+abstain or client:<name>")
    assert not (tmp_path / "c").exists()  # nothing was created before the check


def test_reference_sft_300_aligns_from_the_server_sft_baselines_own_checkpoint(benchmark_script):
    b = benchmark_script("bench_reward_ablation")
    cache = Path("/cache")
    assert b.reference_dir("compact+synthetic+sft#ref300", 1, cache) == \
        cache / "baselines" / f"compact_synthetic_sft-sft{b.SERVER_SFT_STEPS}-seed1"
    assert b.reference_sft("compact+synthetic+sft#ref300").steps == 300
    # the demo's reference (SFT-50) keeps its own folder, and the prompt pool does not change either
    assert b.reference_dir("compact+synthetic+sft@sp600", 1, cache) == cache / "references" / "compact_synthetic_sft-seed1"
    assert b.reference_sft("sft").steps == 50
    assert b.split_label("compact+synthetic+sft@sp600#ref300") == ("compact+synthetic+sft", 600)
    assert b.cell_name("compact+synthetic+sft#ref300", "honest", "oracle", 0) == \
        "compact_synthetic_sft_ref300-honest-oracle-seed0"


def test_reference_sft_learning_rate_gets_its_own_reference(benchmark_script):
    b = benchmark_script("bench_reward_ablation")
    cache = Path("/cache")
    rec = "compact+synthetic+sft"
    assert b.parse_reference_sft("50", rec) == "" and b.parse_reference_sft("50:3e-3", rec) == ""  # the demo's SFT-50
    assert b.parse_reference_sft("300", rec) == "#ref300"
    label = "compact+synthetic+sft" + b.parse_reference_sft("200:3e-4", rec)
    sft = b.reference_sft(label)
    assert (sft.steps, sft.learning_rate) == (200, 3e-4)
    # another learning rate is another checkpoint: it must not reuse SFT-200 at the default rate
    assert b.reference_dir(label, 0, cache) != b.reference_dir("compact+synthetic+sft#ref200", 0, cache)
    assert b.parse_reference_sft("0", rec) == "#ref0"  # no SFT at all: stage 1's policy is the reference
    for bad in ("two", "200:fast", "-1", "50:-1"):
        try:
            b.parse_reference_sft(bad, rec)
        except SystemExit as e:
            assert str(e).startswith("--reference-sft"), e
        else:
            raise AssertionError(f"--reference-sft {bad} was accepted")


def test_a_plain_label_builds_the_recipes_own_reference_and_the_batch_option_is_explicit(benchmark_script, tmp_path):
    # the bench's plain label is what `mor demo --warm-start <recipe>` builds (recipes.recipe_sft: the compact recipe's
    # SFT is type-balanced, the tiny ones' proportional); the other batching is a labelled variant with its own folder
    from mor_server.alignment.recipes import recipe_sft

    b = benchmark_script("bench_reward_ablation")
    cache = Path("/cache")
    assert b.reference_sft("compact+synthetic+sft") == recipe_sft("compact+synthetic+sft")
    assert b.reference_sft("compact+synthetic+sft").balance_types and not b.reference_sft("synthetic+sft").balance_types
    assert b.reference_sft("compact+synthetic+sft@sp600~beta=0.1") == recipe_sft("compact+synthetic+sft")
    # compact+synthvqa's own reference has no SFT on the server's split: its plain label, and its own folder
    assert b.reference_sft("compact+synthvqa").steps == 0 and b.parse_reference_sft(None, "compact+synthvqa") == ""
    assert b.parse_reference_sft("50", "compact+synthvqa") == "#ref50"
    assert b.reference_dir("compact+synthvqa", 2, cache) == cache / "references" / "compact_synthvqa-seed2"
    assert b.parse_reference_sft("50", "compact+synthetic+sft", "balanced") == ""  # its own: no option in the label
    assert b.parse_reference_sft("50", "compact+synthetic+sft", "proportional") == "#ref50,proportional"
    assert b.parse_reference_sft("50", "synthetic+sft", "balanced") == "#ref50,balanced"
    assert b.parse_reference_sft("50", "synthetic+sft", "proportional") == ""
    prop = "compact+synthetic+sft#ref50,proportional"
    assert not b.reference_sft(prop).balance_types and b.reference_sft(prop).steps == 50
    assert b.reference_dir(prop, 1, cache) == cache / "baselines" / "compact_synthetic_sft-sft50-proportional-seed1"
    assert b.reference_dir("compact+synthetic+sft", 1, cache) == cache / "references" / "compact_synthetic_sft-seed1"
    assert b.reference_dir("synthetic+sft#ref50,balanced", 0, cache) == \
        cache / "baselines" / "synthetic_sft-sft50-balanced-seed0"
    assert b.reference_sft("compact+synthetic+sft#ref300,proportional").steps == 300
    try:
        b.reference_sft("compact+synthetic+sft#ref50,shuffled")
    except ValueError as e:
        assert "shuffled" in str(e)
    else:
        raise AssertionError("an unknown batch option was accepted")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_reward_ablation.py"), "--balanced-sft",
                        "--proportional-sft", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr and not (tmp_path / "c").exists()


def test_grpo_overrides_travel_in_the_label_and_share_the_reference(benchmark_script, tmp_path):
    b = benchmark_script("bench_reward_ablation")
    cache = Path("/cache")
    label = "compact+synthetic+sft#ref300~learning_rate=0.001,num_generations=4"
    assert b.grpo_overrides(label) == {"learning_rate": 1e-3, "num_generations": 4}
    assert b.grpo_overrides("compact+synthetic+sft") == {}
    assert b.grpo_overrides("seeing~freeze=embeddings+vision,warmup_steps=10") == {"freeze": "embeddings+vision",
                                                                                    "warmup_steps": 10}
    assert b.grpo_overrides("seeing~freeze=") == {"freeze": ""}  # every weight trained: seeing-v1's GRPO
    # the overrides change GRPO only: the reference (and its cache folder) is the label's without them
    assert b.reference_dir(label, 2, cache) == b.reference_dir("compact+synthetic+sft#ref300", 2, cache)
    assert b.split_label(label) == ("compact+synthetic+sft", 0)
    assert b.cell_name(label, "honest", "oracle", 2) != b.cell_name("compact+synthetic+sft#ref300", "honest", "oracle", 2)
    # a bad override is one line naming the key or the type, before anything is created
    for bad, msg in ((["lr=1e-3"], "--grpo: 'lr=1e-3' is not key=value with key one of learning_rate"),
                     (["num_generations=four"], "--grpo num_generations: 'four' is not a int"),
                     (["freeze=head"], "--grpo freeze: 'head' is not a list of embeddings, vision joined by +")):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_reward_ablation.py"), "--grpo", *bad,
                            "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o.json")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(msg), r.stderr[-2000:]
        assert not (tmp_path / "c").exists()


def test_a_cell_scored_on_other_test_items_is_not_compared_and_not_restored(tmp_path):
    # the server-sft cells recorded before the fix were scored on the whole held-out test (7,551 items on seed 0)
    # while the GRPO cells beside them used the first 600: their difference was not a paired comparison
    out = tmp_path / "results.json"
    cells = [_cell("mor", 0, 0.75), _cell("server-sft", 0, 0.65, before=None, n=7551)]
    out.write_text(json.dumps({"summary": {}, "cells": cells}))
    cache = tmp_path / "cache"
    r = _report(cache, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored 1 cells" in r.stdout
    assert not (cache / "cells" / "compact_synthetic_sft-honest-server-sft-seed0.json").exists()
    rec = json.loads(out.read_text())
    assert "compact+synthetic+sft/honest/mor-minus-server-sft" not in rec["summary"]
    assert [c["method"] for c in rec["cells"]] == ["mor"]

    # one already in the cache is named, left out of the table and the record
    (cache / "cells" / "compact_synthetic_sft-honest-server-sft-seed0.json").write_text(json.dumps(cells[1]))
    r = _report(cache, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("not compared: compact_synthetic_sft-honest-server-sft-seed0 was evaluated on 7551 test items, not the "
            "first 600; run its cell again") in r.stdout
    assert "compact+synthetic+sft/honest/server-sft" not in json.loads(out.read_text())["summary"]


def test_server_sft_cell_is_scored_on_the_same_items_as_the_grpo_cells(monkeypatch, tmp_path, benchmark_script):
    from types import SimpleNamespace

    import mor_server.alignment.evaluate as evaluate
    import mor_server.alignment.pipeline as pipeline
    import mor_server.alignment.warmstart as warmstart

    b = benchmark_script("bench_reward_ablation")
    items = [SimpleNamespace(image_id=i) for i in range(2000)]
    monkeypatch.setattr(pipeline, "heldout_test", lambda split: items)
    built = []
    monkeypatch.setattr(warmstart, "warm_start_cached",
                        lambda d, *a, **k: built.append((d, k)) or ("model", "processor", {"steps": 300}))
    seen = []
    monkeypatch.setattr(evaluate, "accuracy", lambda model, proc, test: seen.append(list(test)) or {"overall": 0.5})
    cell = b.server_sft_cell("compact+synthetic+sft", "honest", 0, SimpleNamespace(server_public=[]), tmp_path)
    assert seen == [items[: b.EVAL_ITEMS]] and b.EVAL_ITEMS == 600
    # the SFT-300 may start from the recipe's own reference when that is stage 1 as it is (no pre-training again)
    (folder, kwargs), = built
    assert kwargs["sft"].steps == b.SERVER_SFT_STEPS and folder != b.reference_dir("compact+synthetic+sft", 0, tmp_path)
    assert b.reference_dir("compact+synthetic+sft", 0, tmp_path) in kwargs["stage1_from"]
    assert kwargs["stage1_from"] == b.stage1_candidates(0, tmp_path)  # and every other recipe's reference of the seed
    assert b.cell_test(SimpleNamespace()) == items[:600]  # what run_alignment gets for the GRPO cells
    assert cell["after"] == {"overall": 0.5} and cell["before"] is None


def test_a_run_measures_a_stale_cached_cell_again_and_keeps_a_comparable_one(tmp_path, monkeypatch, capsys,
                                                                             benchmark_script):
    # the grid loop: a cell cached from the old code (scored on 7,551 items) is run again and replaced; a comparable
    # cached cell is not run; the time-left estimate counts only the cells still to run
    b = benchmark_script("bench_reward_ablation")
    cache = tmp_path / "cache"
    (cache / "cells").mkdir(parents=True)
    stale_f = cache / "cells" / "compact_synthetic_sft-honest-server-sft-seed0.json"
    kept_f = cache / "cells" / "compact_synthetic_sft-honest-server-sft-seed1.json"
    stale_f.write_text(json.dumps(_cell("server-sft", 0, 0.65, before=None, n=7551)))
    kept_f.write_text(json.dumps(_cell("server-sft", 1, 0.72, before=None)))
    ran = []

    def fake_run_cell(policy, scenario, method, seed, cache_dir, steps):
        ran.append((policy, scenario, method, seed))
        return _cell(method, seed, 0.70, before=None)

    monkeypatch.setattr(b, "run_cell", fake_run_cell)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(sys, "argv", ["bench_reward_ablation.py", "--warm-start", "compact+synthetic+sft",
                                      "--methods", "server-sft", "--seeds", "0", "1", "--cache", str(cache),
                                      "--out", str(tmp_path / "out.json")])
    assert b.main() == 0
    assert ran == [("compact+synthetic+sft", "honest", "server-sft", 0)]
    assert json.loads(stale_f.read_text())["after"]["n"] == 600
    assert json.loads(kept_f.read_text())["after"]["overall"] == 0.72
    out = capsys.readouterr().out
    assert "[1/2] compact+synthetic+sft honest server-sft seed 0" in out and "not compared" not in out
    assert json.loads((tmp_path / "out.json").read_text())["summary"][
        "compact+synthetic+sft/honest/server-sft"]["aligned"] == [70.0, 72.0]


def test_a_cached_cell_from_another_reference_checkpoint_is_measured_again(tmp_path, monkeypatch, benchmark_script):
    """A GRPO cell records the digest of the reference it started from. When the recipe's reference in the cache is
    rebuilt (other code, another host), the cached cell no longer pairs with it and is run again; a cell from the
    reference now in the cache, or from before digests were recorded, is kept."""
    b = benchmark_script("bench_reward_ablation")
    cache = tmp_path / "cache"
    (cache / "cells").mkdir(parents=True)
    for seed, weights in ((0, b"rebuilt"), (1, b"as built"), (2, b"as built")):
        ref = b.reference_dir("compact+synthetic+sft", seed, cache)
        ref.mkdir(parents=True)
        (ref / "model.safetensors").write_bytes(weights)
    old_digest = b.reference_digest(b.reference_dir("compact+synthetic+sft", 1, cache))  # the bytes b"as built"
    for seed, digest in ((0, old_digest), (1, old_digest), (2, None)):
        cell = {**_cell("oracle", seed, 0.7), **({"reference_sha256": digest} if digest else {})}
        (cache / "cells" / f"compact_synthetic_sft-honest-oracle-seed{seed}.json").write_text(json.dumps(cell))
    ran = []
    monkeypatch.setattr(b, "run_cell", lambda p, s, m, seed, c, steps: ran.append(seed) or _cell(m, seed, 0.8))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(sys, "argv", ["bench_reward_ablation.py", "--warm-start", "compact+synthetic+sft",
                                      "--methods", "oracle", "--seeds", "0", "1", "2", "--cache", str(cache),
                                      "--out", str(tmp_path / "out.json")])
    assert b.main() == 0
    assert ran == [0]
    assert b.reference_digest(tmp_path / "missing") is None


def test_server_sft_cell_trains_at_the_learning_rate_the_label_names(monkeypatch, tmp_path, benchmark_script):
    """``--reference-sft 300:3e-4 --methods server-sft``: the server-labels baseline at a gentler learning rate
    (the recipe's 3e-3 can cost what stage 1 taught), in its own cache folder; without one, the recipe's rate."""
    from types import SimpleNamespace

    import mor_server.alignment.evaluate as evaluate
    import mor_server.alignment.pipeline as pipeline
    import mor_server.alignment.warmstart as warmstart

    b = benchmark_script("bench_reward_ablation")
    monkeypatch.setattr(pipeline, "heldout_test", lambda split: [SimpleNamespace(image_id=i) for i in range(700)])
    monkeypatch.setattr(evaluate, "accuracy", lambda model, proc, test: {"overall": 0.5})
    built = []
    monkeypatch.setattr(warmstart, "warm_start_cached",
                        lambda d, *a, **k: built.append((d, k["sft"])) or ("model", "processor", {"steps": 300}))
    label = "compact+synthvqa" + b.parse_reference_sft("300:3e-4", "compact+synthvqa")
    b.server_sft_cell(label, "honest", 0, SimpleNamespace(server_public=[]), tmp_path)
    b.server_sft_cell("compact+synthvqa", "honest", 0, SimpleNamespace(server_public=[]), tmp_path)
    (gentle_dir, gentle), (own_dir, own) = built
    assert gentle.steps == own.steps == b.SERVER_SFT_STEPS and gentle.seed == own.seed == 0
    assert gentle.learning_rate == 3e-4 and own.learning_rate == warmstart.SFTConfig.learning_rate
    assert gentle_dir != own_dir  # two checkpoints, never one cache answering for both


def test_a_router_cell_fitted_without_the_ranking_error_term_is_never_reported_as_mor(tmp_path, benchmark_script):
    """A cached ``mor`` cell measured before the router's ranking-error term (its record carries no rank_weight)
    must not be paired or tabled as today's ``mor``: it is reported as not compared (and would be run again); the
    same cell under ``mor-ce`` (the likelihood-only router) is compared."""
    out = tmp_path / "results.json"
    old = _cell("mor", 0, 0.65)
    del old["router"]["rank_weight"]
    cells = [old, _cell("mor-ce", 1, 0.66), _cell("uniform", 1, 0.60)]
    out.write_text(json.dumps({"cells": cells}))
    r = _report(tmp_path / "cache", out)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "cache" / "cells" / "compact_synthetic_sft-honest-mor-seed0.json").exists()
    b = benchmark_script("bench_reward_ablation")
    assert b.stale(old).startswith("fitted with router rank_weight 0, not 1")
    assert b.stale(_cell("mor", 0, 0.65)) is None and b.stale(_cell("mor-iq-ce", 0, 0.65)) is None
    assert b.stale(_cell("mor-iq", 0, 0.65, rank_weight=0.0)) is not None
    summary = json.loads(out.read_text())["summary"]
    assert "compact+synthetic+sft/honest/mor" not in summary
    assert summary["compact+synthetic+sft/honest/mor-ce"]["aligned"] == [66.0]


def test_a_noisy_scenario_replaces_its_types_honest_client_with_one_trained_on_flipped_preferences(
        benchmark_script, monkeypatch, tmp_path):
    """``noisy-color`` / ``noisy-yesno``: the same three institutions, one of them training on its data with every
    preference flipped (``--flip-fraction 1.0``), and no honest client of that type left to outvote it."""
    router = benchmark_script("bench_router")

    def fake_trained(seed, work, *, clients=router.CLIENTS, split_args=("--n-clients", "3"), tag=""):
        return {name: (arch, part, "--flip-fraction" in split_args) for name, arch, part in clients}

    monkeypatch.setattr(router, "trained_models", fake_trained)
    for scenario, gone, noisy, part in (("noisy-color", "hospital-color", "flipped-color", "client0"),
                                        ("noisy-yesno", "lab-yesno", "flipped-yesno", "client2")):
        scorers = router.client_scorers(0, scenario, tmp_path, known=[])
        assert gone not in scorers and len(scorers) == 3, scorers
        assert scorers[noisy][1:] == (part, True)  # the replaced client's own data, every preference flipped
        assert all(not flipped for name, (_, _, flipped) in scorers.items() if name != noisy)
    honest = router.client_scorers(0, "honest", tmp_path, known=[])
    assert set(honest) == {"hospital-color", "bank-shape", "lab-yesno"}
    assert not any(flipped for _, _, flipped in honest.values())
