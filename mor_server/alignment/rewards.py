"""Reward callables for TRL's GRPOTrainer: the Mixture-of-Rewards reward over a backend, rule rewards, hybrid.

The seam with the federation (the lead's gRPC backend implements :class:`RewardBackend`; the in-process
backend in :mod:`mor_server.alignment.inprocess` is the baseline and what the tests use):

- ``client_ids()``: the live clients now;
- ``client_scores(items, purpose=...)``: per-client scores (plain or DP-noised), for router calibration;
- ``mixed_scores(items, weights)``: ``sum_k weights[k][i] * score_k(items[i].candidates[j])``; in secagg mode
  the server only ever sees this sum.

Both raise :class:`RoundFailed` when a round fails. :class:`MoRReward` groups a generation batch's completions
by prompt into ScoringItems (candidates = the group's completions), asks the router for per-item weights over
the live clients, runs one scoring round (retried under the one :class:`RetryPolicy`; an attempt that misses
``deadline_s`` is cancelled through ``backend.cancel()`` when the backend has one, and waited for, so attempts never
overlap), and returns one float per
completion, or ``None`` for every completion of a failed round (TRL then treats them as missing: no
advantage, never a spurious zero reward). Failed rounds are counted.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import threading
import time
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from mor.types import ScoringItem

from .features import FeatureExtractor
from .router import MoRRouter, entropy
from ..federation.rounds import RetryPolicy, RoundFailed  # noqa: F401  (RoundFailed is re-exported: backends raise it)


#: How MoRReward turns the mixed scores into rewards (see MoRReward).
SHAPINGS = ("raw", "group_sigmoid", "answer_softmax")


@runtime_checkable
class RewardBackend(Protocol):
    def client_ids(self) -> list[str]: ...  # live clients now

    def client_scores(self, items: Sequence[ScoringItem], *, purpose: str) -> dict[str, list[list[float]]]:
        """Per-client scores (plain or DP-noised; used for router calibration). Raises RoundFailed."""
        ...

    def mixed_scores(self, items: Sequence[ScoringItem], weights: dict[str, list[float]]) -> list[list[float]]:
        """sum_k weights[k][i] * score_k(items[i].candidates[j]); in secagg mode the server only ever sees this sum.
        Raises RoundFailed on failure."""
        ...


def _process_group():
    """``torch.distributed`` when this process is one rank of several (accelerate launch / DDP), else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def completion_text(completion: Any) -> str:
    """Text of one TRL completion: a string, or a conversational ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion.strip()
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content).strip()
    return str(completion).strip()


def png_bytes(image: Any) -> bytes:
    """PNG bytes of an image given as bytes (returned as is) or a PIL image."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"image must be PNG bytes or a PIL image, got {type(image).__name__}")


def _column(kwargs: dict, name: str, n: int) -> list | None:
    v = kwargs.get(name)
    if v is None:
        return None
    v = list(v)
    if len(v) != n:
        raise ValueError(f"reward column {name!r} has {len(v)} values for {n} completions")
    return v


class MoRReward:
    """The federated Mixture-of-Rewards reward, a TRL reward function (synchronous).

    backend: a :class:`RewardBackend`. router: a calibrated :class:`MoRRouter`. features: the extractor the
    router was calibrated with. objective: the alignment-objective id routed on.
    deadline_s: wall-clock limit of one scoring round attempt; retries: extra attempts after a failure (or give
    ``retry``, a :class:`RetryPolicy`). This is the only layer that retries GRPO reward rounds. An attempt past its
    deadline is cancelled through ``backend.cancel(reason)`` (the federated backend cancels the round on the server
    and waits for it) before the next attempt starts.
    The dataset given to TRL must have columns ``image_png`` (PNG bytes) or ``image`` (PIL), ``question`` and
    ``example_id``; an optional ``domain`` column feeds the routing-by-domain history.

    valid: ``valid(question, completion_text) -> bool`` (e.g. :meth:`mor_server.alignment.answers.AnswerSchema.is_valid`).
        Completions it rejects are never sent to the clients (a reward model's score for an answer it was never
        trained to rank is meaningless) and get ``None`` here; the format rule reward prices them. Counted in
        ``unscored``. A batch with no valid completion runs no round.
    shaping: ``"raw"`` returns the mixed score; ``"group_sigmoid"`` returns ``sigmoid(alpha * (r - mean of the
        prompt's scored completions))`` with the router's calibrated Bradley-Terry scale alpha: the calibrated
        probability that the completion is preferred to the group's average, bounded in (0, 1) so that, with a
        format weight above the MoR weight, no score can make a malformed answer worth more than a well-formed one.
        ``"answer_softmax"`` (needs ``anchors``): each item's candidates are the question's possible answers
        (``anchors(question)``, e.g. :meth:`mor_server.alignment.answers.AnswerSchema.valid_answers`) plus any other
        completion, each scored once; a completion's reward is its probability under the calibrated mixture,
        ``softmax_a(alpha * r(a))[completion]``: an absolute signal in (0, 1) that does not depend on which other
        completions were sampled (with group_sigmoid a group whose only well-formed completion is right gets 0.5).
    anchors: ``anchors(question) -> answers`` for ``"answer_softmax"``.
    answer_sets: ``answer_sets(question) -> answers valid for it`` (e.g. ``AnswerSchema.valid_answers``): questions
        whose answer set the router abstains on with the clients live at the round (:meth:`MoRRouter.abstain_for`)
        are sent to no client, and every well-formed completion of theirs gets the reward of an all-zero score (raw
        0, answer_softmax 1/candidates, group_sigmoid 0.5): one constant per prompt, so this reward gives them no
        advantage beyond the format rule's (well-formed over malformed). Counted in ``abstained`` (prompts with at
        least one well-formed completion).
        Defaults to ``anchors``; with neither, the router's abstentions cannot be applied and construction fails.
    """

    __name__ = "mor_reward"

    def __init__(self, backend: RewardBackend, router: MoRRouter, features: FeatureExtractor, *, objective: int = 0,
                 deadline_s: float = 30.0, retries: int = 1, metrics=None,
                 valid: Callable[[str, str], bool] | None = None, shaping: str = "raw",
                 anchors: Callable[[str], Sequence[str]] | None = None, retry: RetryPolicy | None = None,
                 answer_sets: Callable[[str], Sequence[str]] | None = None):
        if retries < 0:
            raise ValueError(f"MoRReward: retries must be >= 0, got {retries}")
        if deadline_s <= 0:
            raise ValueError(f"MoRReward: deadline_s must be > 0, got {deadline_s}")
        self.retry = retry or RetryPolicy.from_retries(retries, deadline_s)
        if shaping not in SHAPINGS:
            raise ValueError(f"MoRReward: shaping must be one of {SHAPINGS}, got {shaping!r}")
        if shaping == "answer_softmax" and anchors is None:
            raise ValueError("MoRReward: shaping='answer_softmax' needs anchors=(question -> possible answers), e.g. "
                             "AnswerSchema.valid_answers")
        self.anchors = anchors
        self.answer_sets = answer_sets or anchors
        if getattr(router, "abstain", None) and self.answer_sets is None:
            raise ValueError("MoRReward: the router abstains on some answer sets (router.abstain) but no "
                             "answer_sets=(question -> valid answers) was given to recognise their questions")
        if getattr(router, "trust_evidence", None) is not None and self.answer_sets is None:
            import warnings

            warnings.warn("MoRReward: without answer_sets=(question -> valid answers) the router cannot abstain on a "
                          "question type whose trusted clients go offline (MoRRouter.abstain_for)", stacklevel=2)
        self.abstained = 0
        self.valid = valid
        self.shaping = shaping
        self.unscored = 0
        self.backend = backend
        self.router = router
        self.features = features
        self.objective = objective
        self.deadline_s = self.retry.round_timeout_s
        self.retries = self.retry.attempts - 1
        self.metrics = metrics
        self.rounds_ok = 0
        self.rounds_failed = 0
        self.attempts_failed = 0
        self.history: list[dict] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="mor-round")
        self._lock = threading.Lock()

    # grouping ---------------------------------------------------------------------------------------
    def build_items(self, completions: Sequence, kwargs: dict) -> tuple[list[ScoringItem], list[tuple[int, int]],
                                                                         list[str | None]]:
        """Group completions by prompt: returns (items, position of each completion (item, candidate), domains)."""
        n = len(completions)
        ids = _column(kwargs, "example_id", n)
        questions = _column(kwargs, "question", n)
        images = _column(kwargs, "image_png", n) or _column(kwargs, "image", n)
        domains = _column(kwargs, "domain", n)
        if questions is None or images is None:
            raise ValueError("MoRReward needs dataset columns 'question' and 'image_png' (or 'image'); build the "
                             "GRPO dataset with mor_server.alignment.grpo.make_prompt_dataset")
        if ids is None:
            ids = [f"{q}|{hash(png_bytes(im))}" for q, im in zip(questions, images)]
        order: dict[str, int] = {}
        cands: list[list[str]] = []
        first: list[int] = []
        pos: list[tuple[int, int]] = []
        for i in range(n):
            key = str(ids[i])
            if key not in order:
                order[key] = len(cands)
                cands.append([])
                first.append(i)
            k = order[key]
            pos.append((k, len(cands[k])))
            cands[k].append(completion_text(completions[i]))
        if self.anchors is not None:  # each distinct answer once, the question's possible answers first
            uniq = []
            for k, i in enumerate(first):
                u = list(dict.fromkeys([str(a) for a in sorted(self.anchors(str(questions[i])))] + cands[k]))
                uniq.append(u)
            pos = [(k, uniq[k].index(cands[k][j])) for k, j in pos]
            cands = uniq
        items = [ScoringItem(item_id=str(ids[i]), image=png_bytes(images[i]), question=str(questions[i]),
                             candidates=tuple(c)) for i, c in zip(first, cands)]
        return items, pos, [domains[i] if domains else None for i in first]

    def _round(self, items, weights):
        fut = self._pool.submit(self.backend.mixed_scores, items, weights)
        try:
            return fut.result(timeout=self.deadline_s)
        except concurrent.futures.TimeoutError as e:
            cancel = getattr(self.backend, "cancel", None)
            if cancel is not None:  # really stop it (and wait) before any retry: rounds never overlap
                cancel(f"the reward's {self.deadline_s:g}s deadline passed")
                try:
                    fut.result(timeout=30)
                except Exception:
                    pass
            raise RoundFailed(f"scoring round missed its {self.deadline_s}s deadline") from e

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float | None]:
        if completions is None:
            raise ValueError("MoRReward: called without completions")
        dist = _process_group()
        if dist is not None:
            return self._call_distributed(dist, completions, kwargs)
        return self._call_local(completions, kwargs)

    def _call_distributed(self, dist, completions, kwargs) -> list[float | None]:
        """Under ``accelerate launch`` (DDP, several processes): every rank sends its completions and their
        dataset columns to rank 0, which runs ONE scoring round for the whole generation batch (the clients see
        one round per step, as with one process, and a prompt's completions are grouped even when TRL spread them
        over ranks) and sends each rank its rewards back. Only rank 0 needs a backend (it hosts the server)."""
        n = len(completions)
        cols = {k: list(v) for k, v in kwargs.items() if isinstance(v, (list, tuple)) and len(v) == n}
        rank, world = dist.get_rank(), dist.get_world_size()
        gathered = [None] * world if rank == 0 else None
        dist.gather_object((list(completions), cols), gathered, dst=0)
        parts = None
        if rank == 0:
            all_completions = [c for comps, _ in gathered for c in comps]
            all_cols = {k: [v for _, cs in gathered for v in cs[k]] for k in cols}
            rewards = self._call_local(all_completions, {**kwargs, **all_cols})
            parts, start = [], 0
            for comps, _ in gathered:
                parts.append(rewards[start:start + len(comps)])
                start += len(comps)
        mine = [None]
        dist.scatter_object_list(mine, parts, src=0)
        return mine[0]

    def _call_local(self, completions, kwargs) -> list[float | None]:
        n = len(completions)
        step = getattr(kwargs.get("trainer_state"), "global_step", None)
        if self.valid is None:
            return self._score(completions, kwargs, step)
        questions = _column(kwargs, "question", n)
        if questions is None:
            raise ValueError("MoRReward(valid=...) needs the dataset column 'question'")
        keep = [i for i in range(n) if self.valid(str(questions[i]), completion_text(completions[i]))]
        with self._lock:
            self.unscored += n - len(keep)
        out: list[float | None] = [None] * n
        if keep:
            sub = {k: ([v[i] for i in keep] if isinstance(v, (list, tuple)) and len(v) == n else v)
                   for k, v in kwargs.items()}
            for i, r in zip(keep, self._score([completions[i] for i in keep], sub, step)):
                out[i] = r
        return out

    def _score(self, completions: Sequence, kwargs: dict, step) -> list[float | None]:
        """One scoring round (with retries) for these completions."""
        n = len(completions)
        items, pos, domains = self.build_items(completions, kwargs)
        live = list(self.backend.client_ids())
        # questions the router routes to no client with these clients live (MoRRouter.abstain_for: a type whose
        # only trusted client is offline is abstained on too): an all-zero score, never sent
        routes = self.answer_sets is not None and (getattr(self.router, "abstain", None) or
                                                   getattr(self.router, "trust_evidence", None) is not None)
        off = [bool(routes) and self.router.abstains(self.answer_sets(it.question), live=live) for it in items]
        ask = [k for k in range(len(items)) if not off[k]]
        scores: list = [[0.0] * len(it.candidates) if o else None for it, o in zip(items, off)]
        with self._lock:
            self.abstained += len(items) - len(ask)
        if self.metrics is not None and len(items) > len(ask):
            self.metrics.abstained.inc(len(items) - len(ask))
        if not ask:  # no round at all (nothing in history: it records rounds)
            return self._shape(scores, pos)
        asked = [items[k] for k in ask]
        domains = [domains[k] for k in ask]
        t0 = time.perf_counter()
        if not live:
            return self._abstained_kept(self._fail(n, step, "no live clients"), scores, pos, items, off)
        feats = self.features.batch([it.image for it in asked], [it.question for it in asked])
        weights = self.router.weights(feats, live=live, objective=self.objective)
        def attempt(_i):
            got = self._round(asked, weights)
            if len(got) != len(asked) or any(len(s) != len(it.candidates) for s, it in zip(got, asked)):
                raise RoundFailed("backend returned scores of the wrong shape")
            return got

        def failed(_i, _e):
            with self._lock:
                self.attempts_failed += 1

        try:  # bounded retries (RoundFailed only; anything else is a bug and propagates)
            for k, got in zip(ask, self.retry.run(attempt, what="reward round", on_failure=failed)):
                scores[k] = got
        except RoundFailed as e:
            return self._abstained_kept(self._fail(n, step, str(e)), scores, pos, items, off)
        rewards = self._shape(scores, pos)
        with self._lock:
            self.rounds_ok += 1
            by_domain: dict[str, dict[str, float]] = {}
            for d in sorted({d for d in domains if d is not None}):
                idx = [i for i, dd in enumerate(domains) if dd == d]
                by_domain[d] = {c: sum(weights[c][i] for i in idx) / len(idx) for c in weights}
            self.history.append({"step": step, "ok": True, "mean_reward": sum(rewards) / n,
                                 "seconds": time.perf_counter() - t0, "items": len(asked),
                                 "abstained": len(items) - len(asked),
                                 "weights": {c: sum(w) / len(w) for c, w in weights.items()},
                                 "weights_by_domain": by_domain, "routing_entropy": entropy(weights)})
        if self.metrics is not None:
            self.metrics.round_done(True, time.perf_counter() - t0)
        return rewards

    def _shape(self, scores: Sequence[Sequence[float]], pos: Sequence[tuple[int, int]]) -> list[float]:
        if self.shaping == "raw":
            return [float(scores[k][j]) for k, j in pos]
        alpha = float(self.router.calibration.get("alpha", 1.0)) if self.router.calibration else 1.0
        if self.shaping == "answer_softmax":
            probs = []
            for s in scores:
                z = [alpha * float(v) for v in s]
                top = max(z)
                e = [math.exp(v - top) for v in z]
                total = sum(e)
                probs.append([v / total for v in e])
            return [probs[k][j] for k, j in pos]
        means = [sum(s) / len(s) for s in scores]
        return [1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, alpha * (float(scores[k][j]) - means[k])))))
                for k, j in pos]

    def _abstained_kept(self, out: list, scores: list, pos, items, off) -> list:
        """A failed round's rewards (None) with the abstained prompts' constant kept: they were never asked."""
        if not any(off):
            return out
        filled = [s if s is not None else [0.0] * len(it.candidates) for s, it in zip(scores, items)]
        shaped = self._shape(filled, pos)
        return [shaped[i] if off[k] else r for i, ((k, _j), r) in enumerate(zip(pos, out))]

    def _fail(self, n: int, step, reason: str) -> list[None]:
        with self._lock:
            self.rounds_failed += 1
            self.history.append({"step": step, "ok": False, "reason": reason})
        if self.metrics is not None:
            self.metrics.round_done(False, 0.0)
        return [None] * n


# ------------------------------------------------------------------------------------------------- rules
class FormatReward:
    """1.0 when the completion is exactly one answer word valid for its question, else 0.0.

    answers: the task's answer set (any question takes any of them), or an
    :class:`~mor_server.alignment.answers.AnswerSchema` (typed: a colour question takes a colour; needs the dataset column
    ``question``).
    """

    __name__ = "format_reward"

    def __init__(self, answers):
        from .answers import AnswerSchema

        self.schema = answers if isinstance(answers, AnswerSchema) else AnswerSchema.untyped(list(answers))
        self.answers = self.schema.vocabulary

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float]:
        n = len(completions)
        questions = _column(kwargs, "question", n) or [""] * n
        return [1.0 if self.schema.is_valid(str(q), completion_text(c)) else 0.0 for q, c in zip(questions, completions)]


class LengthReward:
    """0 up to ``max_words`` words, then -1 per extra word, floored at -1 ... scaled to [-1, 0]."""

    __name__ = "length_reward"

    def __init__(self, max_words: int = 1, cap: int = 4):
        if max_words < 1 or cap < 1:
            raise ValueError("LengthReward: max_words and cap must be >= 1")
        self.max_words = max_words
        self.cap = cap

    def __call__(self, prompts=None, completions=None, **kwargs) -> list[float]:
        return [-min(self.cap, max(0, len(completion_text(c).split()) - self.max_words)) / self.cap
                for c in completions]


def hybrid_rewards(mor: MoRReward | None, *, answers=None, w_mix: float = 1.0,
                   w_format: float = 0.0, w_length: float = 0.0) -> tuple[list, list[float]]:
    """reward = w_mix * MoR + w_format * format + w_length * length, as TRL ``(reward_funcs, reward_weights)``.

    Zero-weight terms are left out. A missing MoR reward (failed round) leaves only the rule terms for that
    completion (TRL sums rewards ignoring NaN), and a completion with no reward at all gets no advantage.
    """
    funcs, weights = [], []
    if mor is not None and w_mix != 0:
        funcs.append(mor)
        weights.append(float(w_mix))
    if w_format:
        if answers is None:
            raise ValueError("hybrid_rewards: w_format > 0 needs answers (the task's answer set)")
        funcs.append(FormatReward(answers))
        weights.append(float(w_format))
    if w_length:
        funcs.append(LengthReward())
        weights.append(float(w_length))
    if not funcs:
        raise ValueError("hybrid_rewards: every weight is zero; set w_mix (or a rule weight) > 0")
    return funcs, weights
