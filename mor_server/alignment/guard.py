"""The collapse guard of GRPO (issue #13): stop, or roll back, when the policy's answers degenerate.

A 383M policy trained with the tiny policy's learning rate collapsed to empty answers, and the tiny one to one answer
per question type. The guard has the policy answer a fixed probe set every few optimizer steps (greedy, no labels
read) and compares the answers with the same policy's answers when training began.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass
class CollapseGuardConfig:
    """Stop (or roll back) GRPO when the policy's answers degenerate (issue #13: a 383M policy collapsed to empty
    answers under the tiny policy's learning rate). Every ``every`` optimizer steps the policy answers a fixed probe
    set of prompts greedily (no labels are read) and the answers are judged against the same policy's answers when
    training began."""

    every: int = 20
    """Check every this many optimizer steps (0: no guard)."""
    probe_size: int = 48
    """Prompts of the probe set (the first ones of the prompt pool)."""
    max_empty_share: float = 0.5
    """Degenerate when at least this share of the probe answers is empty (nothing but special tokens/spaces) and
    that is 25 points more than at the start."""
    collapsed_types_share: float = 1.0
    """Degenerate when at least this share of the question types that had two or more distinct answers at the
    start now get one single answer (1.0: all of them), provided at least ``min_varied_types`` types had two or
    more at the start."""
    min_varied_types: int = 2
    """The one-answer-per-type rule applies only when this many question types had varied answers at the start (a
    briefly warm-started small policy often gives one answer per type for all but one type already: its one varied
    type flipping to a single answer is noise of one step, not the collapse this guards against)."""
    action: str = "stop"
    """'stop': end training at the failed check (the degenerate weights are kept and reported); 'rollback': end it
    and restore the trainable weights of the last check that passed (kept on the CPU)."""

    def validate(self) -> None:
        if self.every < 0 or self.probe_size < 1 or self.min_varied_types < 1:
            raise ValueError("CollapseGuardConfig: every must be >= 0, probe_size and min_varied_types >= 1")
        if not 0 < self.max_empty_share <= 1 or not 0 < self.collapsed_types_share <= 1:
            raise ValueError("CollapseGuardConfig: max_empty_share and collapsed_types_share must be in (0, 1]")
        if self.action not in ("stop", "rollback"):
            raise ValueError(f"CollapseGuardConfig.action must be 'stop' or 'rollback', got {self.action!r}")


def judge_answers(answers: Sequence[str], domains: Sequence[str], baseline: dict | None,
                  config: CollapseGuardConfig) -> dict:
    """Whether a probe set's answers are degenerate (see :class:`CollapseGuardConfig`). ``baseline``: this
    function's result on the answers at the start (None: this is the baseline). Returns ``{"empty_share",
    "distinct_by_type", "collapsed_types", "degenerate", "reason"}``."""
    from collections import defaultdict

    from .policy import normalize_answer

    if len(answers) != len(domains) or not answers:
        raise ValueError("judge_answers: answers and domains must be non-empty and of equal length")
    norm = [normalize_answer(a) for a in answers]
    by_type: dict[str, set] = defaultdict(set)
    for a, d in zip(norm, domains):
        if a:
            by_type[d].add(a)
    empty = sum(1 for a in norm if not a) / len(norm)
    distinct = {d: len(by_type.get(d, ())) for d in sorted(set(domains))}
    out = {"empty_share": empty, "distinct_by_type": distinct, "collapsed_types": [], "degenerate": False,
           "reason": None}
    if baseline is None:
        return out
    varied = [d for d, n in baseline["distinct_by_type"].items() if n >= 2]
    collapsed = [d for d in varied if distinct.get(d, 0) <= 1]
    out["collapsed_types"] = collapsed
    if empty >= config.max_empty_share and empty >= baseline["empty_share"] + 0.25:
        out["degenerate"] = True
        out["reason"] = (f"{100 * empty:.0f}% of the probe answers are empty (at the start: "
                         f"{100 * baseline['empty_share']:.0f}%)")
    elif len(varied) >= max(1, config.min_varied_types) \
            and len(collapsed) >= config.collapsed_types_share * len(varied):
        out["degenerate"] = True
        out["reason"] = (f"one answer per question type for {', '.join(collapsed)} (at the start: "
                         + ", ".join(f"{d} {baseline['distinct_by_type'][d]}" for d in collapsed)
                         + " distinct answers)")
    return out


def collapse_guard_callback(processor, probe: Sequence, config: CollapseGuardConfig | None = None, *,
                            domain_field: str = "question_type"):
    """A TrainerCallback applying :class:`CollapseGuardConfig` on ``probe`` (items with ``.image``,
    ``.question`` and a question type). Its ``.checks`` list every check, ``.stopped`` says where and why it
    stopped (None while it has not), ``.summary()`` is the report's entry. Under accelerate the verdict of rank 0
    is broadcast, so every rank stops at the same step."""
    import logging

    from transformers import TrainerCallback

    from .evaluate import domain_of
    from .policy import generate_answers

    cfg = config or CollapseGuardConfig()
    cfg.validate()
    probe = list(probe)[: cfg.probe_size]
    if not probe:
        raise ValueError("collapse_guard_callback: the probe set is empty")
    domains = [domain_of(e, domain_field) for e in probe]
    log = logging.getLogger("mor_server.alignment.grpo")

    class CollapseGuard(TrainerCallback):
        def __init__(self):
            self.baseline: dict | None = None
            self.checks: list[dict] = []
            self.stopped: dict | None = None
            self._good: tuple[int, dict] | None = None

        def _answers(self, model) -> list[str]:
            was_training = model.training
            try:
                return generate_answers(model, processor, probe, batch_size=len(probe))
            finally:
                model.train(was_training)

        def _snapshot(self, model, step: int) -> None:
            if cfg.action == "rollback":
                self._good = (step, {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                                     if p.requires_grad})

        def on_train_begin(self, args, state, control, model=None, **kw):
            if model is None or not cfg.every:
                return
            self.baseline = judge_answers(self._answers(model), domains, None, cfg)
            self.checks.append({"step": state.global_step, **self.baseline})
            self._snapshot(model, state.global_step)

        def on_step_end(self, args, state, control, model=None, **kw):
            if model is None or not cfg.every or self.baseline is None or state.global_step % cfg.every:
                return
            verdict = judge_answers(self._answers(model), domains, self.baseline, cfg)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():  # one decision for every rank
                box = [verdict]
                dist.broadcast_object_list(box, src=0)
                verdict = box[0]
            self.checks.append({"step": state.global_step, **verdict})
            if not verdict["degenerate"]:
                self._snapshot(model, state.global_step)
                return
            self.stopped = {"step": state.global_step, "reason": verdict["reason"], "action": cfg.action,
                            "rolled_back_to": None}
            if cfg.action == "rollback" and self._good is not None:
                good_step, weights = self._good
                import torch

                with torch.no_grad():
                    for n, p in model.named_parameters():
                        if n in weights:
                            p.copy_(weights[n].to(p.device, p.dtype))
                self.stopped["rolled_back_to"] = good_step
            msg = (f"collapse guard: the policy's answers degenerated at GRPO step {state.global_step} "
                   f"({verdict['reason']}); training stopped"
                   + (f", weights rolled back to step {self.stopped['rolled_back_to']}"
                      if self.stopped["rolled_back_to"] is not None else ""))
            log.warning(msg)
            print(f"    {msg}", flush=True)
            control.should_training_stop = True

        def summary(self) -> dict:
            return {"config": asdict(cfg), "probe_size": len(probe), "stopped": self.stopped,
                    "checks": self.checks}

    return CollapseGuard()
