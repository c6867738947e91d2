"""Evaluation of an aligned policy: exact-match accuracy (overall and per domain), KL to the reference,
held-out preference win rates, a JSON report and matplotlib plots.

Examples are duck-typed like in :mod:`mor_server.alignment.policy` (``.image``, ``.question``, ``.answer``, and a domain
field, ``question_type`` by default). Preference pairs have ``.example``, ``.chosen``, ``.rejected``.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .policy import (EOS, ImageCache, autocast_for, exact_match, generate_answers, model_device, normalize_answer,
                     user_message)

log = logging.getLogger(__name__)


def domain_of(example, field: str = "question_type") -> str:
    """The domain an example is reported under (``field``, falling back to ``domain``)."""
    return str(getattr(example, field, None) or getattr(example, "domain", None) or "all")


def accuracy(model, processor, examples: Sequence, *, domain_field: str = "question_type",
             batch_size: int = 64, answers: Sequence[str] | None = None) -> dict:
    """Greedy strict exact-match accuracy (:func:`~mor_server.alignment.policy.exact_match`) with the answer diversity that
    tells a policy that sees from one that repeats a common word.

    Returns ``{"overall", "n", "by_domain": {d: acc}, "counts": {d: n}, "diversity": {d: ...}, "collapsed": [d]}``
    where ``diversity[d]`` is :func:`answer_diversity` of the policy's answers against the gold answers of that
    domain (majority-answer rate, distinct answers, entropy), and ``collapsed`` lists the domains whose answers
    collapsed to (almost) one word. ``answers``: precomputed policy answers (else generated greedily).
    """
    if not examples:
        raise ValueError("accuracy: examples is empty")
    if answers is None:
        answers = generate_answers(model, processor, list(examples), batch_size=batch_size)
    if len(answers) != len(examples):
        raise ValueError(f"accuracy: {len(answers)} answers for {len(examples)} examples")
    hits: dict[str, list[int]] = defaultdict(list)
    given: dict[str, list[str]] = defaultdict(list)
    gold: dict[str, list[str]] = defaultdict(list)
    for a, e in zip(answers, examples):
        d = domain_of(e, domain_field)
        hits[d].append(int(exact_match(a, e.answer)))
        given[d].append(normalize_answer(a))
        gold[d].append(normalize_answer(e.answer))
    allh = [h for v in hits.values() for h in v]
    diversity = {d: answer_diversity(given[d], gold[d]) for d in sorted(hits)}
    collapsed = [d for d, v in diversity.items() if v["collapsed"]]
    if collapsed:
        log.warning("answers collapsed in %s: %s", ", ".join(collapsed),
                    "; ".join(f"{d}: {diversity[d]['top_answer']!r} for {100 * diversity[d]['top_answer_share']:.0f}%"
                              f" of questions (majority-answer rate {100 * diversity[d]['majority_rate']:.1f}%)"
                              for d in collapsed))
    return {"overall": sum(allh) / len(allh), "n": len(allh),
            "by_domain": {d: sum(v) / len(v) for d, v in sorted(hits.items())},
            "counts": {d: len(v) for d, v in sorted(hits.items())},
            "diversity": diversity, "collapsed": collapsed}


def _entropy_bits(values: Sequence[str]) -> float:
    n = len(values)
    return max(0.0, float(-sum((c / n) * math.log2(c / n) for c in Counter(values).values()))) if n else 0.0


def is_collapsed(top_answer_share: float, majority_rate: float, gold_distinct: int, collapse_share: float = 0.9) -> bool:
    """The collapse rule of :func:`answer_diversity` (also applied to stored diversity records by the benchmarks)."""
    return bool(gold_distinct >= 2 and top_answer_share >= collapse_share and majority_rate < collapse_share)


def answer_diversity(answers: Sequence[str], gold: Sequence[str], *, collapse_share: float = 0.9) -> dict:
    """How varied a policy's answers are, next to what a constant answer would score.

    ``majority_rate``: accuracy of always giving the most common gold answer (the bar a constant policy reaches);
    ``distinct_answers`` / ``gold_distinct``: how many different answers the policy gave / the gold set has;
    ``entropy_bits`` / ``gold_entropy_bits``: Shannon entropy of those distributions; ``top_answer`` and
    ``top_answer_share``: the policy's most frequent answer and its share. ``collapsed`` is True when the policy
    gives one answer to at least ``collapse_share`` of the questions while the gold answers are not that uniform
    themselves (their commonest answer below ``collapse_share``): a colour type answered "brown" throughout, and a
    yes/no type answered "yes" throughout, are both collapsed; a type whose gold answer is nearly always the same
    is not.
    """
    if len(answers) != len(gold) or not gold:
        raise ValueError("answer_diversity: answers and gold must be non-empty and of equal length")
    a = [normalize_answer(x) for x in answers]
    g = [normalize_answer(x) for x in gold]
    top, top_n = Counter(a).most_common(1)[0]
    maj_n = Counter(g).most_common(1)[0][1]
    gold_distinct = len(set(g))
    share = top_n / len(a)
    return {"majority_rate": maj_n / len(g), "distinct_answers": len(set(a)), "gold_distinct": gold_distinct,
            "entropy_bits": _entropy_bits(a), "gold_entropy_bits": _entropy_bits(g),
            "top_answer": top, "top_answer_share": share,
            "collapsed": is_collapsed(share, maj_n / len(g), gold_distinct, collapse_share)}


def format_accuracy_table(acc: Mapping) -> str:
    """One line per domain: accuracy next to the majority-answer rate, distinct answers and entropy (a report's
    text form; a collapsed domain is flagged)."""
    lines = [f"{'domain':<10} {'acc %':>6} {'majority %':>10} {'distinct':>9} {'entropy':>8}  top answer"]
    for d, v in acc.get("diversity", {}).items():
        flag = "  <- COLLAPSED to one answer" if v["collapsed"] else ""
        lines.append(f"{d:<10} {100 * acc['by_domain'][d]:6.1f} {100 * v['majority_rate']:10.1f} "
                     f"{v['distinct_answers']:>4}/{v['gold_distinct']:<4} {v['entropy_bits']:8.2f}  "
                     f"{v['top_answer']!r} ({100 * v['top_answer_share']:.0f}%){flag}")
    return "\n".join(lines)


def _encode(processor, examples, answers, device, images: ImageCache | None = None):
    """Prompt + answer + </s>, left-padded; returns the batch and each row's answer-token count."""
    tok = processor.tokenizer
    prompts = [processor.apply_chat_template(user_message(e.question), add_generation_prompt=True) for e in examples]
    texts = [p + " " + normalize_answer(a) + " " + EOS for p, a in zip(prompts, answers)]
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = processor(images=(images or ImageCache()).pils(examples), text=texts, return_tensors="pt",
                        padding=True)
    finally:
        tok.padding_side = old
    n_ans = [len(tok(" " + normalize_answer(a) + " " + EOS, add_special_tokens=False)["input_ids"]) for a in answers]
    return {k: v.to(device) for k, v in enc.items()}, n_ans


@torch.no_grad()
def answer_logprobs(model, processor, examples: Sequence, answers: Sequence[str], *, batch_size: int = 64,
                    images: ImageCache | None = None) -> list[float]:
    """log p(answer + </s> | image, question) under the model, one per example (on the model's device, bf16
    autocast on CUDA, log-probabilities in fp32). images: decoded images shared with other passes."""
    device = model_device(model)
    out: list[float] = []
    for b in range(0, len(examples), batch_size):
        ex, an = list(examples[b: b + batch_size]), list(answers[b: b + batch_size])
        enc, n_ans = _encode(processor, ex, an, device, images)
        with autocast_for(device):
            logits = model(**enc).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = enc["input_ids"][:, 1:]
        tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        for i, n in enumerate(n_ans):
            out.append(float(tok_lp[i, -n:].sum()))
    return out


@torch.no_grad()
def kl_to_reference(model, ref_model, processor, examples: Sequence, *, batch_size: int = 64) -> float:
    """Mean sequence KL(policy || reference) along the policy's greedy answers (sum over answer tokens)."""
    if not examples:
        raise ValueError("kl_to_reference: examples is empty")
    device = model_device(model)
    if model_device(ref_model) != device:
        raise ValueError(f"kl_to_reference: the reference is on {model_device(ref_model)}, the policy on {device}; "
                         f"move both to one device")
    cache = ImageCache()
    answers = generate_answers(model, processor, list(examples), batch_size=batch_size, images=cache)
    total = 0.0
    for b in range(0, len(examples), batch_size):
        ex, an = list(examples[b: b + batch_size]), answers[b: b + batch_size]
        enc, n_ans = _encode(processor, ex, an, device, cache)
        with autocast_for(device):
            lp = torch.log_softmax(model(**enc).logits.float()[:, :-1], dim=-1)
            lq = torch.log_softmax(ref_model(**enc).logits.float()[:, :-1], dim=-1)
        kl_tok = (lp.exp() * (lp - lq)).sum(-1)
        for i, n in enumerate(n_ans):
            total += float(kl_tok[i, -n:].sum())
    return total / len(examples)


def win_rate(model, processor, pairs: Sequence, *, batch_size: int = 64) -> float:
    """Fraction of preference pairs where the policy gives the chosen answer a higher log-probability."""
    if not pairs:
        raise ValueError("win_rate: pairs is empty")
    ex = [p.example for p in pairs]
    cache = ImageCache()  # both passes encode the same images: decode each once
    lc = answer_logprobs(model, processor, ex, [p.chosen for p in pairs], batch_size=batch_size, images=cache)
    lr = answer_logprobs(model, processor, ex, [p.rejected for p in pairs], batch_size=batch_size, images=cache)
    return sum(float(c > r) for c, r in zip(lc, lr)) / len(pairs)


def accuracy_callback(processor, examples: Sequence, every: int, *, domain_field: str = "question_type"):
    """A TrainerCallback that records ``{"step", "accuracy", "by_domain"}`` (overall and per-type accuracy) on
    ``examples`` every ``every`` steps (``.points``)."""
    from transformers import TrainerCallback

    class AccuracyCallback(TrainerCallback):
        def __init__(self):
            self.points: list[dict] = []

        def on_step_end(self, args, state, control, model=None, **kw):
            if model is not None and every > 0 and state.global_step % every == 0:
                was_training = model.training
                acc = accuracy(model, processor, examples, domain_field=domain_field)
                self.points.append({"step": state.global_step, "accuracy": acc["overall"],
                                    "by_domain": acc["by_domain"]})
                model.train(was_training)

    return AccuracyCallback()


# ------------------------------------------------------------------------------------------------ report
def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write ``report.json`` (floats rounded to 4 places) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def clean(v):
        if isinstance(v, float):  # 4 places; below 1e-3 (learning rates) 4 significant digits instead of 0.0
            return None if math.isnan(v) else round(v, 4) if abs(v) >= 1e-3 or v == 0 else float(f"{v:.4g}")
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path = out / "report.json"
    path.write_text(json.dumps(clean(report), indent=1))
    return path


def plot_report(out_dir: str | Path, *, log_history: Sequence[Mapping] = (), accuracy_points: Sequence[Mapping] = (),
                before: Mapping | None = None, after: Mapping | None = None,
                routing_by_domain: Mapping[str, Mapping[str, float]] | None = None,
                epsilon: Mapping[str, float] | None = None) -> list[Path]:
    """PNG plots: reward and accuracy over steps, accuracy per domain before/after, routing weights by domain,
    ε per client (each drawn only when its data is given). Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    steps = [h["step"] for h in log_history if "reward" in h and "step" in h]
    rewards = [h["reward"] for h in log_history if "reward" in h and "step" in h]
    if steps or accuracy_points:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if steps:
            ax.plot(steps, rewards, label="mean reward", color="tab:blue")
            ax.set_ylabel("reward")
        ax.set_xlabel("GRPO step")
        if accuracy_points:
            ax2 = ax.twinx()
            ax2.plot([p["step"] for p in accuracy_points], [p["accuracy"] for p in accuracy_points], "o-",
                     color="tab:green", label="accuracy")
            ax2.set_ylabel("exact-match accuracy")
            ax2.set_ylim(0, 1)
        ax.set_title("Reward and accuracy over GRPO steps")
        fig.tight_layout()
        paths.append(out / "training.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if before and after:
        doms = sorted(set(before["by_domain"]) | set(after["by_domain"]))
        x = np.arange(len(doms) + 1)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(x - 0.2, [before["overall"]] + [before["by_domain"].get(d, 0) for d in doms], 0.4, label="reference")
        ax.bar(x + 0.2, [after["overall"]] + [after["by_domain"].get(d, 0) for d in doms], 0.4, label="aligned")
        ax.set_xticks(x, ["overall"] + doms)
        ax.set_ylim(0, 1)
        ax.set_ylabel("exact-match accuracy")
        ax.legend()
        ax.set_title("Test accuracy before / after alignment")
        fig.tight_layout()
        paths.append(out / "accuracy.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if routing_by_domain:
        doms = sorted(routing_by_domain)
        clients = sorted({c for d in doms for c in routing_by_domain[d]})
        fig, ax = plt.subplots(figsize=(6, 3.5))
        bottom = np.zeros(len(doms))
        for c in clients:
            v = np.array([routing_by_domain[d].get(c, 0.0) for d in doms])
            ax.bar(doms, v, bottom=bottom, label=c)
            bottom += v
        ax.set_ylabel("mean routing weight")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Routing weights by domain")
        fig.tight_layout()
        paths.append(out / "routing.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if epsilon:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = sorted(epsilon)
        ax.bar(names, [epsilon[n] for n in names], color="tab:red")
        ax.set_ylabel("ε spent")
        ax.set_title("Privacy spent per client")
        fig.tight_layout()
        paths.append(out / "epsilon.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
