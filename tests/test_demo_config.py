"""`mor demo` configuration: clear errors naming the setting, never a traceback from deep inside."""

import json
import subprocess
import sys

import pytest

from mor_server.apps.demo import DemoConfig


def test_config_file_errors_name_the_setting(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"epsilon": 4, "grpo_steps": 10}))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['grpo_steps'\]"):
        DemoConfig.from_file(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DemoConfig.from_file(bad)
    bad.write_bytes(b"\xb2\xff{}")  # not UTF-8 at all
    with pytest.raises(ValueError, match=f"--config {bad}: not valid JSON"):
        DemoConfig.from_file(bad)
    with pytest.raises(ValueError, match="no such file"):
        DemoConfig.from_file(tmp_path / "missing.json")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"epsilon": "inf", "mode": "plain", "grpo": {"max_steps": 5}}))
    cfg = DemoConfig.from_file(good, seed=3)
    cfg.validate()
    assert cfg.epsilon == float("inf") and cfg.seed == 3 and cfg.grpo == {"max_steps": 5}
    assert cfg.warm_start == "seeing"  # the default recipe; the config file or --warm-start selects another
    good.write_text(json.dumps({"warm_start": "synthetic+sft"}))
    assert DemoConfig.from_file(good).warm_start == "synthetic+sft"


@pytest.mark.parametrize("change,msg", [
    ({"mode": "secret"}, r"mode: must be 'plain', 'dp', 'secagg' or 'secagg\+dp', got 'secret'"),
    ({"calibration_mode": "secagg"}, "calibration_mode"),
    ({"clients": []}, r"clients: needs at least 1 item"),
    ({"clients": [{"name": "a", "arch": "cnn", "partition": "client0"}] * 2}, "names must be unique"),
    ({"clients": [{"name": "a b", "arch": "cnn", "partition": "client0"}]}, r"clients\[0\].name"),
    ({"clients": [{"name": "a", "arch": "cnn"}]}, r"clients\[0\].partition is missing"),
    ({"epsilon": -1}, "epsilon: must be greater than 0, got -1"),
    ({"epsilon": None}, "epsilon: must be a valid number, got None"),
    ({"mode": "secagg", "clients": [{"name": "a", "arch": "cnn", "partition": "client0"}]}, "at least 2 clients"),
    ({"warm_start": "imagenet"}, r"warm_start: must be 'sft', 'synthetic\+sft', 'compact\+synthetic\+sft', 'compact\+curriculum\+sft', "
                              r"'compact\+synthvqa', 'compact\+synthvqa\+negation', 'seeing' or 'seeing-v1', got 'imagenet'"),
])
def test_validate_rejects_bad_settings(change, msg):
    with pytest.raises(ValueError, match=msg):
        DemoConfig(**change).validate()


def test_cli_prints_one_line_error(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"mode": "nope"}))
    r = subprocess.run([sys.executable, "-c", "import sys; from mor_server.apps.cli import mor_main; sys.exit(mor_main())",
                        "demo", "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "mode: must be" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(cfg) in r.stderr


def test_demo_warm_start_recipe_sets_the_references_sft(tmp_path, monkeypatch):
    """`mor demo --warm-start compact+synthetic+sft` builds its reference with a type-balanced SFT-50 (the proportional
    one left colour and shape questions answered "yes" on both rebuilt seeds, 0 and 2); the default `sft` recipe keeps the
    proportional SFT-50; `alignment.sft_steps` changes the steps, not the batching; `alignment.sft_batches` the
    batching."""
    from types import SimpleNamespace

    import mor_server.alignment.pipeline as pipeline
    from mor_server.apps import demo

    seen = []
    monkeypatch.setattr(pipeline, "run_alignment", lambda backend, **kw: seen.append(kw["config"]) or {})
    server = SimpleNamespace(metrics=SimpleNamespace(registry=None))
    for warm, alignment in (("compact+synthetic+sft", None), ("sft", None), ("compact+synthetic+sft", {"sft_steps": 80}),
                            ("compact+synthetic+sft", {"sft_steps": 300, "sft_batches": "proportional"}),
                            ("sft", {"sft_batches": "balanced"}), ("compact+synthvqa", None),
                            ("compact+synthvqa", {"sft_steps": 50}), ("sft", {"sft_steps": 0})):
        cfg = DemoConfig(workdir=str(tmp_path / warm), warm_start=warm, seed=1, alignment=alignment)
        demo.align(cfg, tmp_path / warm, None, server)
    assert [(c.sft.steps, c.sft.balance_types) for c in seen] == [(50, True), (50, False), (80, True), (300, False),
                                                                  (50, True), (0, False), (50, False), (0, False)]
    assert seen[5].pretrain.yesno_curriculum == "vqa=2000"  # compact+synthvqa: public synthetic VQA, no public SFT
    # and its GRPO samples at temperature 1.5 (recipes.RECIPES[...].grpo) unless the config sets one; the others at 1.0
    assert [c.grpo.temperature for c in seen] == [1.0] * 5 + [1.5, 1.5, 1.0]
    demo.align(DemoConfig(workdir=str(tmp_path / "t"), warm_start="compact+synthvqa", grpo={"temperature": 1.2}),
               tmp_path / "t", None, server)
    assert seen[-1].grpo.temperature == 1.2
    with pytest.raises(ValueError, match="alignment.sft_batches must be one of balanced, proportional, got 'shuffled'"):
        demo.align(DemoConfig(workdir=str(tmp_path / "x"), alignment={"sft_batches": "shuffled"}), tmp_path / "x",
                   None, server)
    assert seen[0].tiny.text_hidden == 128 and seen[0].pretrain.caption_steps > 0


def test_demo_default_is_the_policy_that_sees_on_the_demo_budget(tmp_path, monkeypatch):
    """`mor demo` without --warm-start builds the compact policy with the short public stage 1 (synthetic VQA 1,000
    steps, the negation readout 300, each phase on a cosine-decayed learning rate) and runs 150 GRPO steps at
    temperature 1.5 with the vision tower frozen; --steps / grpo.max_steps / grpo.freeze still win."""
    from types import SimpleNamespace

    import mor_server.alignment.pipeline as pipeline
    from mor_server.apps import demo

    seen = []
    monkeypatch.setattr(pipeline, "run_alignment", lambda backend, **kw: seen.append(kw["config"]) or {})
    server = SimpleNamespace(metrics=SimpleNamespace(registry=None))
    assert DemoConfig().warm_start == "seeing"
    demo.align(DemoConfig(workdir=str(tmp_path / "d"), seed=2), tmp_path / "d", None, server)
    demo.align(DemoConfig(workdir=str(tmp_path / "e"), grpo={"max_steps": 400, "freeze": ""}), tmp_path / "e", None,
               server)
    c = seen[0]
    assert c.pretrain.yesno_curriculum == "vqa=1000,negation=300" and c.pretrain.vision_steps == 600
    assert c.pretrain.seed == 2 and c.tiny.seed == 2 and (c.tiny.patch_size, c.tiny.vision_layers) == (8, 3)
    assert c.pretrain.curriculum_schedule == "cosine"
    assert c.sft.steps == 0 and (c.grpo.max_steps, c.grpo.temperature, c.grpo.freeze) == (150, 1.5, "vision")
    assert (seen[1].grpo.max_steps, seen[1].grpo.freeze) == (400, "")
    with pytest.raises(ValueError, match="^grpo.freeze: unknown part 'head'; use a comma-separated list of embeddings, "
                                         "vision"):
        DemoConfig(grpo={"freeze": "head"}).validate()


def test_alignment_router_rank_weight_is_a_number_and_reaches_the_config(tmp_path):
    """`mor demo --config` may set the router's ranking-error weight (0: the likelihood-only router of the ablation);
    anything but a finite number >= 0 is one line naming the setting."""
    from mor_server.apps.demo import alignment_overrides

    ok = DemoConfig.from_file(_write(tmp_path, {"alignment": {"router_rank_weight": 0}}))
    assert alignment_overrides(ok) == {"router_rank_weight": 0}
    assert alignment_overrides(DemoConfig.from_file(_write(tmp_path, {"alignment": {"router_rank_weight": 2.5}}))) \
        == {"router_rank_weight": 2.5}
    for bad in (-1, "1", True, float("inf")):
        cfg = DemoConfig.from_file(_write(tmp_path, {"alignment": {"router_rank_weight": bad}}))
        with pytest.raises(ValueError, match=r"^alignment.router_rank_weight must be a finite number >= 0"):
            alignment_overrides(cfg)


def test_alignment_router_abstain_z_is_a_number_or_null(tmp_path):
    """`mor demo --config` may set how sure the router must be that a question type's mixture ranks above chance
    before it uses any client's reward there (null: always use them); anything else is one line naming it."""
    from mor_server.apps.demo import alignment_overrides

    for ok in (0, 3.5, None):
        cfg = DemoConfig.from_file(_write(tmp_path, {"alignment": {"router_abstain_z": ok}}))
        assert alignment_overrides(cfg) == {"router_abstain_z": ok}
    for bad in (-1, "2", True, float("nan")):
        cfg = DemoConfig.from_file(_write(tmp_path, {"alignment": {"router_abstain_z": bad}}))
        with pytest.raises(ValueError, match=r"^alignment.router_abstain_z must be a finite number >= 0 .* or None"):
            alignment_overrides(cfg)


def _write(tmp_path, obj) -> "object":
    f = tmp_path / "run.json"
    f.write_text(json.dumps(obj))
    return f


def test_report_warns_when_most_federated_rounds_failed(tmp_path):
    """A run whose reward rounds were mostly refused (a spent budget, the query audit) trained on the format rule
    alone; its report must say so instead of presenting the accuracy as the federation's."""
    from mor_server.apps.demo import rounds_warning

    assert rounds_warning({"rounds_completed": 151, "rounds_failed": 0}, tmp_path) is None
    assert rounds_warning({"rounds_completed": 100, "rounds_failed": 40}, tmp_path) is None
    w = rounds_warning({"rounds_completed": 1, "rounds_failed": 300}, tmp_path)
    assert w.startswith("300 of 301 federated rounds failed") and "audit.jsonl" in w and "--workdir" in w
    assert str(tmp_path / "clients") in w and "\n" not in w
