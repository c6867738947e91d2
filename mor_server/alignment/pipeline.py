"""One function for the whole alignment job, given a RewardBackend:

warm start (or reuse the cached reference) -> router calibration -> GRPO with the MoR reward -> evaluation
(JSON report + PNG plots). The federation (gRPC, privacy modes) lives entirely behind the backend, so the same
function runs the in-process baseline and the federated demo.

The server only reads labels of ``public`` (its small calibration split); ``unlabeled`` provides GRPO prompts
(answers never read); ``test`` is for evaluation only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .calibration import answer_schema, calibrate_router
from .evaluate import accuracy, accuracy_callback, kl_to_reference, plot_report, win_rate, write_report
from .features import FeatureExtractor
from .grpo import GRPOMetrics, GRPORunConfig, make_prompt_dataset, run_grpo
from .guard import CollapseGuardConfig, collapse_guard_callback
from .policy import TinyLlavaConfig, load_policy, pick_device, policy_preset, save_policy
from .rewards import MoRReward, RewardBackend, hybrid_rewards
from .router import MoRRouter, check_abstain_z, check_rank_weight
from .warmstart import PretrainConfig, SFTConfig, warm_start_cached


@dataclass
class AlignmentConfig:
    """Settings of :func:`run_alignment` (defaults sized for the embedded demo on 2 CPU cores)."""

    work_dir: str = "runs/alignment"
    """Reference checkpoint (reference/), router (router/), GRPO checkpoints (grpo/), report + plots (report/)."""
    tiny: TinyLlavaConfig = field(default_factory=TinyLlavaConfig)
    """Size of the built-in policy (ignored when policy_path is set)."""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=50))
    """Warm start on the server's public split: deliberately short, so the reference is far from perfect."""
    pretrain: PretrainConfig | None = None
    """Stage 1 of the warm start before the public SFT (vision pre-training and captioning of synthetic images,
    no privacy cost; :class:`mor_server.alignment.warmstart.PretrainConfig`). None: the public SFT alone (the demo's default).
    Its seed follows the run's seed."""
    grpo: GRPORunConfig = field(default_factory=GRPORunConfig)
    """GRPO settings (output_dir is overridden to <work_dir>/grpo)."""
    policy_path: str | None = None
    """A local Hugging Face VLM directory to align instead of the built-in tiny Llava (no warm start)."""
    adapter_path: str | None = None
    """Optional peft LoRA adapter directory on top of policy_path."""
    calibration_purpose: str = "calibration"
    """Purpose string of the calibration scoring round (the backend decides plain vs dp)."""
    router_hidden: int = 32
    router_steps: int = 300
    router_rank_weight: float = 1.0
    """Weight of the routed clients' expected ranking error in the router's fit, next to the likelihood
    (:meth:`MoRRouter.calibrate`); 0: the likelihood alone, which left a client with flipped preferences 11-15% of
    the yes/no score (docs/alignment.md, "A router that shuts out a flipped client")."""
    router_abstain_z: float | None = 2.0
    """The router routes a question type (all questions with the same valid answers) to no client when its mixture
    does not rank the right answer above chance by this many standard errors on the calibration items; those
    prompts get a constant MoR reward and are sent to no client (:func:`mor_server.alignment.router.answer_set_trust`).
    None: never. With every client of a type replaced by one trained on flipped preferences, the router without it
    still let the other clients' noise take colour from 97-100% to 37-86% (docs/alignment.md)."""
    top_k: int | None = None
    """Route each item to its top-k clients only (None: all live clients)."""
    router_features: tuple = ("type",)
    """The router's input features (:mod:`mor_server.alignment.features`): any of ``type`` (the question's answer
    type under the answer schema; needs ``typed_answers``), ``image`` (pooled pixels) and ``question`` (hashed words).
    ``("type",)``: on the demo's federation the router then ranks as well as routing every question to its own
    domain's client, where image + question overfit the calibration items and left weight on clients that know
    nothing about the question (docs/alignment.md, "The router's features")."""
    routing: str = "learned"
    """``learned``: the Mixture of Rewards router; ``uniform``: the ablation without a router (uniform weights over
    the live clients, only the reward scale calibrated, on the same objective and calibration round)."""
    objective: int = 0
    """Alignment-objective id routed on."""
    w_mix: float = 1.0
    """Weight of the MoR reward in the hybrid reward."""
    w_format: float = 0.0
    """Weight of the answer-format rule reward."""
    w_length: float = 0.0
    """Weight of the length rule reward."""
    answer_vocabulary: list | None = None
    """Every answer word of the task (public metadata, e.g. easy_vqa.get_answers()); None: the answers seen in the
    public split. Answer types are learned over it (mor_server.answers.AnswerSchema)."""
    typed_answers: bool = True
    """The format rule checks the answer's type for the question (a colour for a colour question), and, when
    w_format > 0, completions that fail it are not sent to the clients (their MoR reward is missing)."""
    reward_shaping: str = "answer_softmax"
    """How the mixed score becomes the MoR reward: 'raw', 'group_sigmoid' or 'answer_softmax' (the calibrated
    probability of the completion among the question's possible answers; see MoRReward)."""
    deadline_s: float = 60.0
    """Deadline of one scoring round attempt."""
    retries: int = 1
    """Extra attempts of a failed scoring round before it counts as failed (reward None)."""
    eval_size: int = 600
    """Test examples used for the before/after accuracy (0: all given)."""
    curve_size: int = 120
    """Test examples used for the accuracy-over-steps curve (0: no curve)."""
    curve_every: int = 20
    """Evaluate the curve every this many GRPO steps."""
    seed: int = 0
    resume: bool | str = "auto"
    """Continue an interrupted run (mor_server.runstate): "auto" resumes GRPO from the newest complete checkpoint in
    <work_dir>/grpo (and reuses the calibrated router) when an unfinished run with the same settings, reference and
    resume_key left one, else starts fresh; True insists on resuming (error if there is nothing to resume); False
    always starts fresh (removing old checkpoints)."""
    resume_key: str = ""
    """Identity of what the backend scores with (e.g. digests of the clients' reward models and the privacy mode):
    part of the run's key, so a run is never resumed with different rewards."""
    progress: bool = True
    preset: str | None = None
    """The size preset this config was built from (:meth:`from_preset`; informational, recorded in the report)."""
    device: str | None = None
    """Force a device for the warm start, evaluation and GRPO ("cpu", "cuda:0"); None: CUDA (bf16) when present."""
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)
    """Stop (or roll back) GRPO when the policy's answers on a fixed probe of prompts degenerate (every=0: off)."""

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "AlignmentConfig":
        """A config with a size preset's policy and its per-size warm-start and GRPO defaults
        (:data:`PRESET_DEFAULTS`); ``overrides`` are AlignmentConfig fields, and ``grpo``/``sft`` may be dicts of
        the fields to change on top of the preset's. ``byo`` is for a model of your own (``policy_path``)."""
        if name not in PRESET_DEFAULTS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_DEFAULTS)}")
        d = PRESET_DEFAULTS[name]
        seed = overrides.get("seed", 0)
        grpo, sft = overrides.pop("grpo", {}), overrides.pop("sft", {})
        kw: dict = {"preset": name}
        kw["grpo"] = grpo if isinstance(grpo, GRPORunConfig) else GRPORunConfig(**{**d["grpo"], **grpo})
        kw["sft"] = sft if isinstance(sft, SFTConfig) else SFTConfig(**{**d["sft"], **sft})
        if name != "byo":
            kw["tiny"] = policy_preset(name, seed=seed)
        return cls(**{**kw, **overrides})


#: Per-size defaults of :meth:`AlignmentConfig.from_preset` and ``mor align --preset``. ``tiny``'s are the values
#: measured on the CPU (docs/alignment.md). The others are conservative choices made after issue #13's H200 run,
#: where the tiny policy's lr 3e-4 made the 40M policy worse (60.0% -> 43.7%) and the 383M one collapse to empty
#: answers: learning rates 10-30x lower, a stronger KL (beta 0.1), and LoRA (TRL's peft_config) for a model of
#: your own. NOT YET VALIDATED ON A GPU: no GPU was available when they were set; benchmarks/bench_gpu.py measures
#: them.
PRESET_DEFAULTS: dict[str, dict] = {
    "tiny": {"grpo": {}, "sft": {"steps": 50}},
    "small": {"grpo": {"learning_rate": 2e-5, "beta": 0.1}, "sft": {"steps": 50}},
    "base": {"grpo": {"learning_rate": 1e-5, "beta": 0.1}, "sft": {"steps": 100, "learning_rate": 1e-3,
                                                                     "max_seconds": 900.0}},
    "byo": {"grpo": {"learning_rate": 5e-5, "beta": 0.1, "lora_r": 16, "lora_alpha": 32, "prompts_per_step": 4,
                     "num_generations": 8, "max_completion_length": 8}, "sft": {"steps": 0}},
}


class _SchemaCheck:
    """Stands in for the answer schema when only the names of ``router_features`` are checked."""

    def types(self):
        return []


def router_features(parts, schema) -> FeatureExtractor:
    """The router's feature extractor for ``AlignmentConfig.router_features``, with a one-line error naming the field."""
    try:
        return FeatureExtractor(parts=parts, schema=schema)
    except ValueError as e:
        raise ValueError(f"AlignmentConfig.router_features: {e}") from None


def heldout_test(split) -> list:
    """easy-vqa test examples whose images are in neither the server's public nor its unlabeled split (both are
    carved from the test split), i.e. images the policy never saw: the evaluation set of the demo and benchmarks; plus
    the split's held-out procedural items (``split.server_heldout``) when a client holds the shapes family. Those come
    first, so the evaluation's first ``eval_size`` items include all of them."""
    from mor_client.data.easyvqa import load_easyvqa

    used = {e.image_id for e in list(split.server_public) + list(split.server_unlabeled)}
    return list(getattr(split, "server_heldout", [])) + [e for e in load_easyvqa("test") if e.image_id not in used]


class _Ranks:
    """The processes of one run: under ``accelerate launch`` (WORLD_SIZE > 1) rank 0 warm-starts the policy,
    decides the resume plan, calibrates the router (the only scoring round outside GRPO) and writes the report,
    and the other ranks wait for it and read what it wrote; GRPO's reward rounds run on rank 0 only
    (:class:`mor_server.rewards.MoRReward` gathers every rank's completions). One process: no waiting."""

    def __init__(self):
        import os

        import torch.distributed as dist

        self.dist = dist
        if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            PartialState()  # under accelerate launch / torchrun: joins the process group (and sets the GPU)
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def main(self) -> bool:
        return not self.on or self.dist.get_rank() == 0

    def wait(self) -> None:
        if self.on:
            self.dist.barrier()

    def share(self, value):
        """Rank 0's ``value`` on every rank (pickled)."""
        if not self.on:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


def run_alignment(backend: RewardBackend, *, public: Sequence, unlabeled: Sequence, test: Sequence,
                  heldout_pairs: Mapping[str, Sequence] | None = None, config: AlignmentConfig | None = None,
                  registry=None, epsilon: Callable[[], Mapping[str, float]] | None = None,
                  stop=None) -> dict:
    """Warm start -> router calibration -> GRPO -> evaluation. Returns the report dict (also written to
    ``<work_dir>/report/report.json`` with PNG plots beside it).

    An interrupted run resumes (``config.resume``, see :mod:`mor_server.runstate`); ``stop`` is an optional
    :class:`mor_server.alignment.grpo.GracefulStop` that ends GRPO with a checkpoint (raising GRPOInterrupted).

    heldout_pairs: ``{client: [PreferencePair]}`` for the per-client held-out win rates (optional).
    epsilon: called at the end for ``{client: ε spent}`` (shown in the report and plotted; optional).
    """
    from tqdm.auto import tqdm

    from transformers import AutoModelForImageTextToText

    cfg = config or AlignmentConfig()
    for name, seq in (("public", public), ("unlabeled", unlabeled), ("test", test)):
        if not seq:
            raise ValueError(f"run_alignment: {name} is empty")
    router_features(cfg.router_features, _SchemaCheck())  # a bad value fails here, not after the warm start
    if "type" in cfg.router_features and not cfg.typed_answers:
        raise ValueError("AlignmentConfig.router_features: 'type' needs typed_answers=True (an untyped answer schema "
                         "has no answer types); drop 'type' or keep the typed format rule")
    check_rank_weight(cfg.router_rank_weight, "AlignmentConfig.router_rank_weight:")  # fails before any work
    check_abstain_z(cfg.router_abstain_z, "AlignmentConfig.router_abstain_z:")
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    stages = tqdm(total=4, desc="alignment", disable=not cfg.progress)

    ranks = _Ranks()

    # 1. reference policy (under accelerate: rank 0 builds it; the others then load what it saved)
    t0 = time.perf_counter()
    ref_dir = work / "reference"
    if not ranks.main:
        ranks.wait()
    if cfg.policy_path:
        model, processor = load_policy(cfg.policy_path, adapter=cfg.adapter_path, device=cfg.device)
        if cfg.adapter_path:
            model = model.merge_and_unload()
        if ranks.main:
            save_policy(model, processor, ref_dir)
        warm = {"policy_path": cfg.policy_path, "adapter_path": cfg.adapter_path}
    else:
        # the policy's initialisation and SFT follow the run's seed (so do the baselines built beside it)
        model, processor, warm = warm_start_cached(ref_dir, public, tiny=replace(cfg.tiny, seed=cfg.seed),
                                                   sft=replace(cfg.sft, seed=cfg.seed),
                                                   pretrain=replace(cfg.pretrain, seed=cfg.seed) if cfg.pretrain
                                                   else None, progress=cfg.progress, device=cfg.device,
                                                   # a reference built there by a recipe whose stage 1 this one
                                                   # continues (compact+synthvqa -> +negation) is not built again
                                                   stage1_from=[ref_dir])
    if ranks.main:
        ranks.wait()
    timings["warm_start_s"] = time.perf_counter() - t0
    stages.set_postfix_str("warm start done")
    stages.update(1)

    from . import runstate

    if ranks.main:
        settings = runstate.run_settings(cfg, ref_dir, sizes={"public": len(public), "unlabeled": len(unlabeled)})
        plan = runstate.plan(work, runstate.settings_key(settings), cfg.resume, settings=settings)
    else:
        plan = None
    plan = ranks.share(plan)
    if plan.interrupted and ranks.main:
        print(f"    not resuming the interrupted alignment run in {work} ({plan.why_fresh}): starting fresh",
              flush=True)
    if plan.reuse_router and ranks.main:
        print(f"    resuming the interrupted alignment run in {work}: "
              + (f"GRPO from {plan.checkpoint.name}" if plan.checkpoint else "GRPO from step 0 (no checkpoint yet)")
              + ", router from the interrupted run"
              + (f"; discarded incomplete {', '.join(plan.discarded)}" if plan.discarded else ""), flush=True)

    eval_set = list(test)[: cfg.eval_size] if cfg.eval_size else list(test)
    before = accuracy(model, processor, eval_set)
    before_win = {c: win_rate(model, processor, list(p)) for c, p in (heldout_pairs or {}).items() if p}

    # 2. router (calibrated on the answer-softmax objective over the format rule's valid answers, plus the routed
    # clients' expected ranking error: router_rank_weight)
    t0 = time.perf_counter()
    schema = answer_schema(public, unlabeled, cfg.answer_vocabulary, typed=cfg.typed_answers)
    if plan.reuse_router:  # calibrated by the interrupted run: no second calibration round (nor its charge)
        router = MoRRouter.load(work / "router")
        features = FeatureExtractor.from_config(router.feature_config)
    elif not ranks.main:  # rank 0 runs the calibration round; the other ranks load the router it saves
        ranks.wait()
        router = MoRRouter.load(work / "router")
        features = FeatureExtractor.from_config(router.feature_config)
    else:
        features = router_features(cfg.router_features, schema)
        router = calibrate_router(backend, public, features, hidden=cfg.router_hidden, steps=cfg.router_steps,
                                  rank_weight=cfg.router_rank_weight, top_k=cfg.top_k, objective=cfg.objective,
                                  seed=cfg.seed,
                                  purpose=cfg.calibration_purpose, retries=cfg.retries, routing=cfg.routing,
                                  schema=schema, abstain_z=cfg.router_abstain_z)
        runstate.save_router(router, work / "router")
        ranks.wait()
    bound = router.calibration.get("score_bound")
    if bound and callable(getattr(backend, "set_score_bound", None)):  # a backend with a bounded encoding (secagg)
        backend.set_score_bound(bound)
    timings["router_s"] = time.perf_counter() - t0
    stages.set_postfix_str("router calibrated")
    stages.update(1)

    # 3. GRPO
    t0 = time.perf_counter()
    metrics = GRPOMetrics(registry)
    if ranks.main:
        (work / "router" / "answer_schema.json").write_text(json.dumps(schema.to_dict(), indent=1))
    mor = MoRReward(backend, router, features, objective=cfg.objective, deadline_s=cfg.deadline_s,
                    retries=cfg.retries, metrics=metrics, shaping=cfg.reward_shaping,
                    valid=schema.is_valid if cfg.w_format > 0 else None,
                    anchors=schema.valid_answers if cfg.reward_shaping == "answer_softmax" else None,
                    answer_sets=schema.valid_answers)
    funcs, weights = hybrid_rewards(mor, answers=schema, w_mix=cfg.w_mix, w_format=cfg.w_format,
                                    w_length=cfg.w_length)
    gcfg = GRPORunConfig(**{**asdict(cfg.grpo), "output_dir": str(work / "grpo"), "seed": cfg.seed,
                            "progress": cfg.progress, "device": cfg.grpo.device or cfg.device})
    curve = accuracy_callback(processor, list(test)[: cfg.curve_size], cfg.curve_every) \
        if cfg.curve_size and cfg.curve_every else None
    if plan.checkpoint is not None:  # the reward's counters/history and the curve so far, as checkpointed
        runstate.restore(plan.checkpoint, mor, curve)
    # the collapse guard's probe: the first prompts of the unlabeled pool (answers never read)
    guard = collapse_guard_callback(processor, list(unlabeled), cfg.collapse_guard) \
        if cfg.collapse_guard.every else None
    res = run_grpo(ref_dir, make_prompt_dataset(unlabeled), funcs, weights, gcfg, metrics=metrics,
                   resume=plan.checkpoint or False, stop=stop,
                   callbacks=[*([curve] if curve else []), *([guard] if guard else []),
                              *([runstate.state_callback(mor, curve)] if ranks.main else [])])
    timings["grpo_s"] = time.perf_counter() - t0
    stages.set_postfix_str("GRPO done")
    stages.update(1)

    # 4. evaluation
    t0 = time.perf_counter()
    aligned = res["model"]
    ref_model = AutoModelForImageTextToText.from_pretrained(ref_dir, local_files_only=True,
                                                            dtype=next(aligned.parameters()).dtype)
    ref_model.to(next(aligned.parameters()).device).eval()
    after = accuracy(aligned, processor, eval_set)
    after_win = {c: win_rate(aligned, processor, list(p)) for c, p in (heldout_pairs or {}).items() if p}
    kl = kl_to_reference(aligned, ref_model, processor, eval_set[: min(len(eval_set), 200)])
    timings["eval_s"] = time.perf_counter() - t0
    ok = [h for h in mor.history if h.get("ok")]
    routing: dict[str, dict[str, list[float]]] = {}
    for h in ok:
        for d, ws in h.get("weights_by_domain", {}).items():
            for c, v in ws.items():
                routing.setdefault(d, {}).setdefault(c, []).append(v)
    routing_mean = {d: {c: float(np.mean(v)) for c, v in ws.items()} for d, ws in routing.items()}
    eps = dict(epsilon()) if epsilon else {}
    log = [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in res["log_history"]]
    report = {
        "accuracy_before": before, "accuracy_after": after,
        "accuracy_gain_points": 100 * (after["overall"] - before["overall"]),
        "kl_to_reference": kl, "win_rate_before": before_win, "win_rate_after": after_win,
        "rounds": {"ok": mor.rounds_ok, "failed": mor.rounds_failed, "failed_attempts": mor.attempts_failed,
                   "unscored_completions": mor.unscored, "abstained_prompts": mor.abstained},
        "answer_types": [sorted(t) for t in schema.types()],
        "router": router.calibration, "routing_by_domain_grpo": routing_mean, "epsilon": eps,
        "grpo": {"global_step": res["global_step"], "seconds": res["seconds"], "resumed_from": res["resumed_from"],
                 "config": res["config"]},
        "warm_start": warm, "accuracy_curve": curve.points if curve else [], "log_history": log,
        "collapse_guard": guard.summary() if guard else None, "preset": cfg.preset,
        "device": {"device": str(next(aligned.parameters()).device), "dtype": str(next(aligned.parameters()).dtype),
                   "picked": str(pick_device(cfg.device)[0])},
        "timings": {**timings, "total_s": time.perf_counter() - t_start},
        "sizes": {"public": len(public), "unlabeled": len(unlabeled), "test_eval": len(eval_set)},
    }
    out = work / "report"
    if ranks.main:  # one writer under accelerate
        report["report_path"] = str(write_report(report, out))
        report["plots"] = [str(p) for p in plot_report(
            out, log_history=log, accuracy_points=report["accuracy_curve"], before=before, after=after,
            routing_by_domain=routing_mean or router.calibration.get("weights_by_domain"), epsilon=eps)]
        write_report(report, out)
        runstate.mark_complete(work)
    else:
        report["report_path"], report["plots"] = str(out / "report.json"), []
    ranks.wait()
    stages.set_postfix_str("evaluated")
    stages.update(1)
    stages.close()
    report["model"] = aligned
    report["processor"] = processor
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mor_server.alignment.pipeline``: an alias of ``mor align`` (mor_server/apps/align_cli.py)."""
    import sys

    from ..apps.cli import mor_main

    return mor_main(["align", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
