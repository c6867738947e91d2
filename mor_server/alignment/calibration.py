"""Router calibration (the Mixture of Rewards' one labelled step): the answer schema of the format rule, the
calibration items (each labelled public example with every answer valid for its question), one calibration scoring
round through the ``RewardBackend``, the fit on the answer-softmax objective GRPO uses (plus the routed clients'
expected ranking error, :meth:`MoRRouter.calibrate`), and the held-out comparison
with uniform, top-k and oracle routing (``router.calibration["heldout"]``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mor.types import ScoringItem

from ..federation.rounds import RetryPolicy
from .answers import AnswerSchema
from .evaluate import domain_of
from .features import FeatureExtractor
from .policy import normalize_answer
from .rewards import RewardBackend, RoundFailed
from .router import (MoRRouter, answer_set_trust, candidate_tensor, check_abstain_z, effective_shares,
                     live_weights)


def answer_schema(public: Sequence, unlabeled: Sequence = (), vocabulary: Sequence[str] | None = None, *,
                  typed: bool = True) -> AnswerSchema:
    """The answer schema of the format rule: typed (learned from the public split's answers and the wording of
    every public question) or, with ``typed=False``, just the answer set."""
    vocab = sorted({normalize_answer(a) for a in vocabulary} if vocabulary is not None
                   else {normalize_answer(e.answer) for e in public})
    if not typed:
        return AnswerSchema.untyped(vocab)
    return AnswerSchema.fit([(e.question, normalize_answer(e.answer)) for e in public],
                            questions=[e.question for e in unlabeled], vocabulary=vocab)


def calibration_items(public: Sequence, schema: AnswerSchema) -> list[tuple[object, list[str], int]]:
    """The router's calibration items, on the objective GRPO's ``answer_softmax`` reward uses: each labelled public
    example with every answer valid for its question (``schema.valid_answers``, plus the label if the schema missed
    it), and the index of the right one. Examples with a single candidate are skipped."""
    out = []
    for e in public:
        right = normalize_answer(e.answer)
        cands = sorted(set(schema.valid_answers(e.question)) | {right})
        if len(cands) >= 2:
            out.append((e, cands, cands.index(right)))
    if not out:
        raise ValueError("calibration_items: no public example has two or more candidate answers")
    return out


def compare_routings(router: MoRRouter, feats: np.ndarray, scores: Mapping[str, Sequence], truth: Sequence[int],
                     domains: Sequence[str], oracle: Mapping[str, str], objective: int = 0) -> dict:
    """Ranking quality of routing strategies on the same items (held-out public items): the learned router, the
    uniform mixture, the router's top-1 and top-2 clients, oracle routing (all weight, per true question type, on
    the client best for that type on the calibration items: ``oracle``) and each client alone. Accuracy is top-1
    among each item's candidates; ``loglik`` uses the router's calibrated alpha."""
    from .router import candidate_tensor, ranking_quality

    clients = list(scores)
    n = len(truth)
    S, mask, t = candidate_tensor(scores, truth, n)
    alpha = float(router.calibration.get("alpha", 1.0))
    k = len(clients)

    def as_matrix(w: Mapping[str, Sequence[float]]) -> np.ndarray:
        return np.array([w.get(c, [0.0] * n) for c in clients], dtype=np.float64).T

    Wr = as_matrix(router.weights(feats, clients, objective))
    out = {"items": n, "router": ranking_quality(Wr, S, mask, t, alpha),
           "uniform": ranking_quality(np.full((n, k), 1.0 / k), S, mask, t, alpha)}
    saved = router.top_k
    try:
        for top in (1, 2):
            if top < k:
                router.top_k = top
                out[f"top{top}"] = ranking_quality(as_matrix(router.weights(feats, clients, objective)), S, mask, t,
                                                   alpha)
    finally:
        router.top_k = saved
    W = np.array([[1.0 if oracle.get(d) == c else 0.0 for c in clients] for d in domains])
    W[W.sum(axis=1) == 0] = 1.0 / k  # a type the calibration items did not cover: uniform
    out["oracle_type"] = ranking_quality(W, S, mask, t, alpha)
    out["clients"] = {c: ranking_quality(np.eye(k)[[j] * n], S, mask, t, alpha) for j, c in enumerate(clients)}
    out["by_domain"] = {}
    for d in sorted(set(domains)):
        idx = np.array([i for i, dd in enumerate(domains) if dd == d])
        sub = (S[idx], mask[idx], t[idx])
        out["by_domain"][d] = {"items": int(len(idx)), "router": ranking_quality(Wr[idx], *sub, alpha)["accuracy"],
                               "uniform": ranking_quality(np.full((len(idx), k), 1.0 / k), *sub, alpha)["accuracy"],
                               "oracle_type": ranking_quality(W[idx], *sub, alpha)["accuracy"]}
    return out


def routing_summary(calibration: Mapping) -> str | None:
    """One line comparing the router with uniform, top-1 and oracle routing on the held-out public items."""
    h = (calibration or {}).get("heldout")
    if not h:
        return None
    parts = [f"{name} {100 * h[key]['accuracy']:.1f}%" for key, name in
             (("router", "router"), ("uniform", "uniform"), ("top1", "top-1"), ("oracle_type", "oracle by type"))
             if key in h]
    return (f"router on {h['items']} held-out public items (right answer ranked first among the valid ones): "
            + ", ".join(parts))


def summary_lines(calibration: Mapping) -> list[str]:
    """What ``mor demo`` and ``mor align`` print about the router after a run: :func:`routing_summary` and
    :func:`shares_summary`, those that have something to say."""
    return [line for line in (routing_summary(calibration), shares_summary(calibration),
                              abstain_summary(calibration)) if line]


def abstain_summary(calibration: Mapping) -> str | None:
    """One line naming the question types the router routes to no client (``calibration["trust"]``), with the
    evidence: no client's reward is used for them."""
    trust = (calibration or {}).get("trust") or {}
    off = {d: v for d, v in trust.items() if not v.get("trusted", True)}
    if not off:
        return None
    parts = [f"{d} ({v['items']} public items, right answer above a wrong one {v['win_rate']:.2f} of the time, "
             f"± {v['se']:.2f}; chance 0.50)" for d, v in off.items()]
    line = ("router abstains on " + "; ".join(parts) + ": the routed clients rank these answers no better than "
            "chance, so their completions get a constant reward, are sent to no client, and keep the reference's "
            "answers under the KL term")
    if len(off) == len(trust):
        line = ("WARNING: " + line + ". That is every question type: no client's reward reaches GRPO. Check the "
                "clients' reward models (their held-out accuracy), or set router_abstain_z to None to use them anyway")
    return line


def shares_summary(calibration: Mapping) -> str | None:
    """One line: per question type, the clients that decide at least a tenth of the mixed score on the calibration
    items (``calibration["effective_by_domain"]``, :func:`mor_server.alignment.router.effective_shares`); a weight
    alone does not say it."""
    eff = (calibration or {}).get("effective_by_domain")
    if not eff:
        return None
    parts = []
    for d, by in eff.items():
        top = sorted(by.items(), key=lambda kv: -kv[1])
        parts.append(f"{d}: " + ", ".join([f"{c} {v:.2f}" for c, v in top if v >= 0.1] or
                                          [f"{top[0][0]} {top[0][1]:.2f}"]))
    return "share of the mixed score (weight x spread of each client's scores): " + "; ".join(parts)


def out_of_fold_weights(router: MoRRouter, feats: np.ndarray, scores: Mapping, truth: np.ndarray, *, objective: int,
                        steps: int, rank_weight: float, seed: int, folds: int = 5) -> np.ndarray:
    """Each calibration item's routing weights, shape (n, clients in ``scores``' order), from a router fitted (like
    ``router``) on the other folds' items: what the router does on an item it has not seen, as on GRPO's prompts.
    Before any top-k (:func:`~mor_server.alignment.router.live_weights` applies it, among whichever clients are
    live). Uniform routing has no fit, and too few items no folds: the router's own weights are returned."""
    import copy

    n, clients = len(truth), list(scores)
    if router.routing != "learned" or n < 2 * folds:
        full = copy.copy(router)
        full.top_k = None
        w = full.weights(feats, live=clients, objective=objective)
        return np.array([w[c] for c in clients], dtype=np.float64).T
    order = np.random.default_rng(seed + 1).permutation(n)
    out = np.zeros((n, len(clients)), dtype=np.float64)
    for f in range(folds):
        test = np.sort(order[f::folds])
        train = np.setdiff1d(np.arange(n), test)
        r = MoRRouter(clients, router.feature_dim, n_objectives=router.n_objectives, hidden=router.hidden,
                      top_k=None, seed=seed, feature_config=router.feature_config, routing=router.routing)
        r.calibrate(feats[train], {c: [scores[c][i] for i in train] for c in clients}, truth[train],
                    objective=objective, steps=steps, rank_weight=rank_weight)
        w = r.weights(feats[test], live=clients, objective=objective)
        out[test] = np.array([w[c] for c in clients], dtype=np.float64).T
    return out


def calibrate_router(backend: RewardBackend, public: Sequence, features: FeatureExtractor, *, hidden: int = 32,
                     steps: int = 300, rank_weight: float = 1.0, top_k: int | None = None, objective: int = 0,
                     seed: int = 0,
                     purpose: str = "calibration", retries: int = 1, progress: bool = False,
                     schema: AnswerSchema | None = None, heldout_fraction: float = 0.2,
                     routing: str = "learned", abstain_z: float | None = 2.0) -> MoRRouter:
    """Run one calibration scoring round over the server's labelled public examples (each with every valid answer
    as a candidate) and fit a router on the answer-softmax objective GRPO uses (plus ``rank_weight`` times the routed
    clients' expected ranking error, :meth:`MoRRouter.calibrate`). A seeded ``heldout_fraction`` of the
    examples is kept out of the fit and used to compare the router with uniform, top-k and oracle routing
    (``router.calibration["heldout"]``); they are in the same round, so the comparison costs no extra release.
    With ``abstain_z`` (not None), answer sets whose routed mixture does not rank the right answer above chance by
    ``abstain_z`` standard errors on all calibration items, each weighted by a router fitted without it
    (:func:`out_of_fold_weights`), are routed to no client (:attr:`MoRRouter.abstain`,
    :func:`~mor_server.alignment.router.answer_set_trust`; the evidence is in ``router.calibration["trust"]``)."""
    abstain_z = check_abstain_z(abstain_z, "calibrate_router: abstain_z")
    schema = schema or answer_schema(public)
    cal = calibration_items(public, schema)
    items = [ScoringItem(item_id=f"cal-{i}", image=e.image, question=e.question, candidates=tuple(c))
             for i, (e, c, _) in enumerate(cal)]
    # the one retry policy (mor_server.rounds.RetryPolicy); the backend itself runs exactly one round per call
    scores = RetryPolicy.from_retries(retries).run(lambda _i: backend.client_scores(items, purpose=purpose),
                                                   what="router calibration round")
    if not scores:
        raise RoundFailed("router calibration round returned no client scores (no live clients?)")
    # clients in name order, not in the order their reports arrived: the fit (and every weight GRPO sends) is then
    # bit-identical on a rerun, which the clients' query audit needs to let the same items be summed again
    scores = {c: scores[c] for c in sorted(scores)}
    order = np.random.default_rng(seed).permutation(len(cal))
    n_held = int(round(heldout_fraction * len(cal))) if len(cal) >= 10 else 0
    held, fit = sorted(order[:n_held].tolist()), sorted(order[n_held:].tolist())
    feats = features.batch([e.image for e, _, _ in cal], [e.question for e, _, _ in cal])
    truth = np.array([t for _, _, t in cal])
    doms = [domain_of(e) for e, _, _ in cal]
    pick = lambda idx: {c: [rows[i] for i in idx] for c, rows in scores.items()}  # noqa: E731
    router = MoRRouter(list(scores), features.dim, hidden=hidden, top_k=top_k, seed=seed,
                       feature_config=features.config(), routing=routing)
    router.calibrate(feats[fit], pick(fit), truth[fit], objective=objective, steps=steps, rank_weight=rank_weight,
                     progress=progress)
    w = router.weights(feats, live=list(scores), objective=objective)
    # the scale the clients' scores live on (largest magnitude in the round): a secagg mixture clips every score to its
    # value range, and a range below this ties the answers a client ranks apart (FederatedBackend.set_score_bound)
    router.calibration["score_bound"] = float(max((abs(v) for rows in scores.values() for r in rows for v in r),
                                                  default=0.0))
    router.calibration["weights_by_domain"] = {
        d: {c: float(np.mean([w[c][i] for i, dd in enumerate(doms) if dd == d])) for c in w} for d in sorted(set(doms))}
    # who decides the ranking: the weights times the spread of each client's scores (router.effective_shares)
    router.calibration["effective_by_domain"] = effective_shares(w, scores, doms)
    if abstain_z is not None:
        keys = [tuple(sorted(schema.valid_answers(e.question))) for e, _, _ in cal]
        S, mask, t = candidate_tensor(scores, truth, len(cal))
        # out-of-fold weights: tested on the weights the router fitted on an item, a router over per-item features
        # (image, question) passes a type no client knows by picking whichever client's noise ranked each item right
        w_oof = out_of_fold_weights(router, feats, scores, truth, objective=objective, steps=steps,
                                    rank_weight=rank_weight, seed=seed)
        trust = answer_set_trust(live_weights(w_oof, range(len(scores)), router.top_k), S, mask, t, keys, z=abstain_z)
        router.abstain = sorted(k for k, v in trust.items() if not v["trusted"])
        router.trust_evidence = {"w": w_oof, "S": S, "mask": mask, "truth": t, "keys": keys, "z": abstain_z,
                                 "min_items": 5}
        # each answer set named by the question types of its own items (several when it spans types)
        label = {k: "/".join(sorted({d for d, kk in zip(doms, keys) if kk == k and d})) or "questions" for k in trust}
        clash = {d for d in label.values() if list(label.values()).count(d) > 1}  # one type, several answer sets
        router.calibration["trust"] = {(f"{label[k]} [{', '.join(k)}]" if label[k] in clash else label[k]):
                                       {**v, "answers": list(k)} for k, v in trust.items()}
        router.calibration["abstain_z"] = abstain_z
    if held:
        from .router import ranking_quality

        S, mask, t = candidate_tensor(pick(fit), truth[fit], len(fit))
        fit_doms = [doms[i] for i in fit]
        oracle = {}
        for d in sorted(set(fit_doms)):
            idx = [i for i, dd in enumerate(fit_doms) if dd == d]
            acc = {c: ranking_quality(np.eye(len(scores))[[j] * len(idx)], S[idx], mask[idx], t[idx], 1.0)["accuracy"]
                   for j, c in enumerate(scores)}
            oracle[d] = max(acc, key=acc.get)
        router.calibration["heldout"] = compare_routings(router, feats[held], pick(held), truth[held],
                                                         [doms[i] for i in held], oracle, objective)
        router.calibration["heldout"]["oracle_choice"] = oracle
    return router
