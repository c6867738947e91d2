"""run_alignment end to end on a tiny budget: warm start (then reuse of the cached reference), router
calibration over an in-process backend with one expert per domain, GRPO, evaluation report and plots."""

import json

import pytest
from prometheus_client import CollectorRegistry

from mor_client.data.partition import make_federation_split
from mor_server.alignment.pipeline import AlignmentConfig, run_alignment
from mor_server.alignment.grpo import GRPORunConfig
from mor_server.alignment.inprocess import InProcessBackend, LabelExpertScorer
from mor_server.alignment.policy import TinyLlavaConfig
from mor_server.alignment.warmstart import SFTConfig


@pytest.fixture(scope="module")
def split():
    return make_federation_split(seed=0, public_size=120, unlabeled_size=64, max_heldout=16)


def test_run_alignment_writes_report_and_plots(split, tmp_path):
    known = list(split.server_public) + list(split.server_unlabeled)
    backend = InProcessBackend({f"expert_{d}": LabelExpertScorer(known, [d]) for d in ("color", "shape", "yesno")})
    used = {e.image_id for e in known}
    from mor_client.data.easyvqa import load_easyvqa

    test = [e for e in load_easyvqa("test") if e.image_id not in used][:40]
    cfg = AlignmentConfig(
        work_dir=str(tmp_path / "run"),
        tiny=TinyLlavaConfig(image_size=32, patch_size=16, vision_hidden=32, text_hidden=32, intermediate=64, heads=2),
        sft=SFTConfig(steps=10, batch_size=16),
        grpo=GRPORunConfig(max_steps=2, prompts_per_step=2, num_generations=2, max_completion_length=2,
                           save_steps=0),
        router_steps=100, router_rank_weight=0.5, eval_size=40, curve_size=8, curve_every=1, progress=False,
        w_length=0.1)
    heldout = {name: c.heldout[:8] for name, c in split.clients.items()}
    reg = CollectorRegistry()
    rep = run_alignment(backend, public=split.server_public, unlabeled=split.server_unlabeled, test=test,
                        heldout_pairs=heldout, config=cfg, registry=reg,
                        epsilon=lambda: {"expert_color": 1.5, "expert_shape": 2.0, "expert_yesno": 0.5})
    saved = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert saved["grpo"]["global_step"] == 2 and saved["rounds"] == {"ok": 2, "failed": 0, "failed_attempts": 0,
                                                                "unscored_completions": 0, "abstained_prompts": 0}
    assert set(saved["accuracy_before"]["by_domain"]) <= {"color", "shape", "yesno"}
    assert 0.0 <= saved["accuracy_after"]["overall"] <= 1.0 and saved["kl_to_reference"] >= -1e-6
    assert set(saved["win_rate_after"]) == set(split.clients)
    assert [p["step"] for p in saved["accuracy_curve"]] == [1, 2]
    assert all(set(p["by_domain"]) <= {"color", "shape", "yesno"} and p["by_domain"] for p in saved["accuracy_curve"])
    assert {p.split("/")[-1] for p in rep["plots"]} == {"training.png", "accuracy.png", "routing.png", "epsilon.png"}
    assert reg.get_sample_value("mor_grpo_step") == 2
    assert rep["router"]["rank_weight"] == 0.5  # AlignmentConfig.router_rank_weight reaches the router's fit
    from mor_server.alignment import runstate

    # a resumed run must not reuse a router fitted with another rank weight
    key = lambda c: runstate.run_key(c, tmp_path / "run" / "reference", sizes={})  # noqa: E731
    assert key(cfg) != key(AlignmentConfig(**{**cfg.__dict__, "router_rank_weight": 1.0}))
    # the router was saved with the run, and a second run reuses the cached reference (no new SFT)
    assert (tmp_path / "run" / "router" / "router.json").is_file()
    assert saved["warm_start"]["cached"] is False
    rep2 = run_alignment(backend, public=split.server_public, unlabeled=split.server_unlabeled, test=test,
                         config=AlignmentConfig(**{**cfg.__dict__, "work_dir": str(tmp_path / "run"),
                                                   "curve_size": 0}))
    assert rep2["warm_start"]["cached"] is True and rep2["warm_start"]["steps"] == 10
    with pytest.raises(ValueError, match="unlabeled is empty"):
        run_alignment(backend, public=split.server_public, unlabeled=[], test=test, config=cfg)
