"""Router: routing weights, live-client renormalisation, top-k, Bradley-Terry calibration on real easy-vqa
pairs with one expert client per domain, save/load."""

import numpy as np
import pytest

from mor_client.data.easyvqa import load_easyvqa
from mor_server.alignment.calibration import (answer_schema, calibrate_router, calibration_items, shares_summary,
                                              summary_lines)
from mor_server.alignment.features import FeatureExtractor
from mor_server.alignment.inprocess import InProcessBackend, LabelExpertScorer
from mor_server.alignment.router import MoRRouter, effective_shares

DOMAINS = ("color", "shape", "yesno")


@pytest.fixture(scope="module")
def public():
    test = load_easyvqa("test")
    rng = np.random.default_rng(0)
    return [test[i] for i in rng.choice(len(test), 300, replace=False)]


def test_weights_are_a_distribution_over_live_clients_and_top_k():
    fx = FeatureExtractor()
    r = MoRRouter(["a", "b", "c"], fx.dim, top_k=None, seed=1)
    # give the router non-trivial logits
    with __import__("torch").no_grad():
        r.net.out.bias.copy_(__import__("torch").tensor([2.0, 1.0, 0.0]))
    feats = np.random.default_rng(0).normal(size=(5, fx.dim)).astype(np.float32)
    w = r.weights(feats)
    assert set(w) == {"a", "b", "c"}
    np.testing.assert_allclose(np.sum([w[c] for c in w], axis=0), 1.0, rtol=1e-6)
    assert all(w["a"][i] > w["b"][i] > w["c"][i] for i in range(5))
    # client b leaves: renormalised over a and c, b absent
    w2 = r.weights(feats, live=["a", "c"])
    assert set(w2) == {"a", "c"}
    np.testing.assert_allclose(np.array(w2["a"]) + np.array(w2["c"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.array(w2["a"]) / np.array(w2["c"]), np.array(w["a"]) / np.array(w["c"]), rtol=1e-5)
    # an unknown client joins: weight 0 until recalibration, and the router says so
    w3 = r.weights(feats, live=["a", "b", "c", "dave"])
    assert w3["dave"] == [0.0] * 5 and r.needs_recalibration(["a", "dave"]) and not r.needs_recalibration(["a"])
    # only unknown clients live: uniform over them
    assert r.weights(feats, live=["x", "y"]) == {"x": [0.5] * 5, "y": [0.5] * 5}
    # top-k
    r.top_k = 1
    w4 = r.weights(feats)
    assert w4["a"] == [1.0] * 5 and w4["b"] == [0.0] * 5
    with pytest.raises(ValueError, match="features must have shape"):
        r.weights(feats[:, :3])
    with pytest.raises(ValueError, match="top_k"):
        MoRRouter(["a"], fx.dim, top_k=0)


def test_calibrated_router_routes_each_domain_to_its_expert(public, tmp_path):
    backend = InProcessBackend({f"expert_{d}": LabelExpertScorer(public, [d]) for d in DOMAINS})
    fx = FeatureExtractor()
    router = calibrate_router(backend, public, fx, steps=300, seed=0)
    by_dom = router.calibration["weights_by_domain"]
    for d in DOMAINS:
        assert by_dom[d][f"expert_{d}"] > 0.6, (d, by_dom[d])
    cal = router.calibration
    # the routed mixture ranks the right answer first more often than the uniform mixture and any single client,
    # on the calibration items and on the held-out ones
    assert cal["mixture"]["accuracy"] > cal["uniform"]["accuracy"]
    assert cal["mixture"]["accuracy"] > max(c["accuracy"] for c in cal["clients"].values())
    held = cal["heldout"]
    assert held["items"] >= 50 and held["router"]["accuracy"] > held["uniform"]["accuracy"]
    assert held["oracle_choice"] == {d: f"expert_{d}" for d in DOMAINS}
    # save / load gives the same weights
    cal = calibration_items(public, answer_schema(public))
    feats = fx.batch([e.image for e, _, _ in cal[:20]], [e.question for e, _, _ in cal[:20]])
    router.save(tmp_path / "router")
    loaded = MoRRouter.load(tmp_path / "router")
    assert loaded.client_ids == router.client_ids
    np.testing.assert_allclose(loaded.logits(feats), router.logits(feats), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="router.json"):
        MoRRouter.load(tmp_path / "nothing")


class Loud:
    """A scorer whose scores are ``factor`` times another's (a reward model trained to larger margins)."""

    def __init__(self, inner, factor):
        self.inner, self.factor = inner, factor

    def score(self, items):
        return [[self.factor * v for v in row] for row in self.inner.score(items)]


def test_effective_shares_weigh_each_client_by_the_spread_of_its_scores():
    """A weight is not who decides the ranking: with 0.3 of the weight, a client whose scores spread ten times wider
    than the other's carries 3 / (3 + 0.7) of the mixed score."""
    scores = {"loud": [[0.0, 20.0], [5.0, 5.0]], "quiet": [[0.0, 2.0], [0.0, 2.0]]}
    weights = {"loud": [0.3, 0.3], "quiet": [0.7, 0.7]}
    shares = effective_shares(weights, scores, ["yesno", "color"])
    assert shares["yesno"]["loud"] == pytest.approx(3 / 3.7) and shares["yesno"]["quiet"] == pytest.approx(0.7 / 3.7)
    # an item where the loud client scores every candidate alike: it decides nothing there
    assert shares["color"] == {"loud": 0.0, "quiet": 1.0}
    # no weighted spread at all: the item is skipped, the type gets no entry
    assert effective_shares({"a": [1.0]}, {"a": [[1.0, 1.0]]}, ["shape"]) == {}
    with pytest.raises(ValueError, match="same clients"):
        effective_shares({"a": [1.0]}, {"b": [[0.0, 1.0]]}, ["shape"])
    with pytest.raises(ValueError, match="finite"):
        effective_shares({"a": [1.0]}, {"a": [[float("nan"), 1.0]]}, ["shape"])


def test_calibration_records_who_decides_each_types_ranking(public):
    """Uniform weights over a loud colour expert (its scores x10, its noise on other types too) and a quiet shape
    expert: the weights say 0.5 / 0.5 on every type, the effective shares say the colour client's noise decides
    most of the shape questions' mixed score."""
    scorers = {"colour": Loud(LabelExpertScorer(public, ["color"]), 10.0), "shape": LabelExpertScorer(public, ["shape"])}
    router = calibrate_router(InProcessBackend(scorers), public, FeatureExtractor(), steps=1, seed=0, routing="uniform")
    cal = router.calibration
    assert cal["weights_by_domain"]["shape"] == pytest.approx({"colour": 0.5, "shape": 0.5})
    eff = cal["effective_by_domain"]
    assert eff["color"]["colour"] > 0.9 and eff["shape"]["colour"] > 0.5, eff
    assert all(sum(v.values()) == pytest.approx(1.0) for v in eff.values())
    line = shares_summary(cal)  # what mor demo and mor align print
    assert line.startswith("share of the mixed score") and "color: colour 0.9" in line, line
    assert shares_summary({}) is None
    assert line in summary_lines(cal) and summary_lines({}) == []
    # no client knows yes/no here: the router routes those questions to no client, and says so last
    assert summary_lines(cal)[-1].startswith("router abstains on yesno (") and cal["trust"]["color"]["trusted"]


class Flipped:
    """A client whose preferences are inverted (an adversarial or badly mislabelled annotator)."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, items):
        return [[1.0 - v for v in row] for row in self.inner.score(items)]


def test_router_learns_to_ignore_a_flipped_client(public):
    """Scenario B of the baselines: a fourth client with inverted preferences. Calibrated on the objective it is
    used for (the right answer among every valid one), the router puts almost no weight on it and ranks held-out
    items far better than the uniform mixture, which averaging cannot avoid."""
    scorers = {f"expert_{d}": LabelExpertScorer(public, [d]) for d in DOMAINS}
    scorers["flipped"] = Flipped(LabelExpertScorer(public, list(DOMAINS)))
    router = calibrate_router(InProcessBackend(scorers), public, FeatureExtractor(), steps=300, seed=0)
    cal = router.calibration
    assert cal["clients"]["flipped"]["mean_weight"] < 0.05, cal["clients"]
    held = cal["heldout"]
    assert held["router"]["accuracy"] >= held["uniform"]["accuracy"] + 0.2, held
    assert held["router"]["accuracy"] >= held["oracle_type"]["accuracy"] - 0.05, held


def test_uniform_routing_is_the_ablation_without_a_router(public, tmp_path):
    """``routing="uniform"`` (the reward ablation of the benchmarks): same calibration round and objective, but every
    item's weights stay uniform over the live clients and only the reward scale is fitted; it survives save/load."""
    scorers = {f"expert_{d}": LabelExpertScorer(public, [d]) for d in DOMAINS}
    scorers["flipped"] = Flipped(LabelExpertScorer(public, list(DOMAINS)))
    fx = FeatureExtractor()
    router = calibrate_router(InProcessBackend(scorers), public, fx, steps=100, seed=0, routing="uniform")
    feats = fx.batch([e.image for e in public[:7]], [e.question for e in public[:7]])
    w = router.weights(feats)
    assert all(v == [0.25] * 7 for v in w.values()), w
    assert router.weights(feats, live=["expert_color", "flipped"]) == {"expert_color": [0.5] * 7, "flipped": [0.5] * 7}
    cal = router.calibration
    assert cal["routing"] == "uniform" and cal["alpha"] != 1.0  # the scale was fitted (log_alpha starts at 0)
    assert abs(cal["clients"]["flipped"]["mean_weight"] - 0.25) < 1e-6
    # the learned router on the same round ranks the held-out items better: this is what the ablation measures
    learned = calibrate_router(InProcessBackend(scorers), public, fx, steps=100, seed=0)
    assert learned.calibration["heldout"]["router"]["accuracy"] > cal["heldout"]["router"]["accuracy"]
    again = MoRRouter.load(router.save(tmp_path / "r"))
    assert again.routing == "uniform" and again.weights(feats) == w
    with pytest.raises(ValueError, match="routing must be one of learned, uniform"):
        MoRRouter(["a"], fx.dim, routing="mixture")


def test_listwise_calibration_checks_its_input():
    fx = FeatureExtractor()
    r = MoRRouter(["a", "b"], fx.dim)
    f = np.zeros((2, fx.dim), np.float32)
    good = {"a": [[1.0, 0.0, 0.5], [0.0, 1.0]], "b": [[0.0, 1.0, 0.2], [1.0, 0.0]]}
    r.calibrate(f, good, [0, 1], steps=5)
    assert r.calibration["items"] == 2
    with pytest.raises(ValueError, match="same candidates"):
        r.calibrate(f, {"a": good["a"], "b": [[0.0, 1.0], [1.0, 0.0]]}, [0, 1], steps=5)
    with pytest.raises(ValueError, match="outside"):
        r.calibrate(f, good, [3, 0], steps=5)
    with pytest.raises(ValueError, match="finite"):
        r.calibrate(f, {"a": [[1.0, float("inf")], [0.0, 1.0]], "b": [[0.0, 1.0], [1.0, 0.0]]}, [0, 1], steps=5)


def test_calibration_rejects_bad_scores():
    fx = FeatureExtractor()
    r = MoRRouter(["a"], fx.dim)
    with pytest.raises(ValueError, match="finite"):
        r.calibrate(np.zeros((3, fx.dim), np.float32), {"a": [1.0, float("nan"), 0.0]})
    with pytest.raises(ValueError, match="score_diffs is empty"):
        r.calibrate(np.zeros((3, fx.dim), np.float32), {})


def test_an_items_weights_do_not_depend_on_its_batch():
    """The same prompt routed in batches of different size and order gets bit-identical weights: otherwise the
    clients' query audit (privacy.secagg.query_audit) refuses the repeated item as a differencing attempt, which
    failed most secagg rounds of a 400-step GRPO run once prompts started to repeat. (A batched float32 matmul's
    last bits depend on the batch; before the fix a calibrated router gave 2-6 differing weights here.)"""
    import numpy as np

    from mor_client.data.partition import make_federation_split
    from mor_server.alignment.features import FeatureExtractor
    from mor_server.alignment.router import MoRRouter

    fx = FeatureExtractor()
    split = make_federation_split(seed=0, n_clients=3)
    feats = np.stack([fx(e.image, e.question) for e in split.server_unlabeled[:64]]).astype(np.float32)
    rng = np.random.default_rng(0)
    for seed in range(3):
        r = MoRRouter(["a", "b", "c"], fx.dim, hidden=32, seed=seed)
        r.calibrate(feats, {c: rng.normal(size=64).tolist() for c in "abc"}, steps=100)
        full = r.weights(feats)
        for idx in ([0], [5, 0, 3], list(range(63, -1, -1)), list(range(8))):
            part = r.weights(feats[idx])
            for c in full:
                assert [full[c][i] for i in idx] == part[c], (seed, idx[:3], c)


class NoisyExpert:
    """Like a client's reward model: right on its own question type most of the time (score 1 for the right answer
    plus noise), loud noise on questions it never saw (3x the spread). Deterministic per (client, item, answer)."""

    def __init__(self, examples, qtype, noise=0.35, off=3.0):
        import hashlib

        from mor_server.alignment.policy import normalize_answer

        self._sha = lambda b: hashlib.sha1(b).digest()
        self.truth = {(self._sha(e.image), e.question): (normalize_answer(e.answer), e.question_type) for e in examples}
        self.qtype, self.noise, self.off = qtype, noise, off

    def score(self, items):
        out = []
        for it in items:
            answer, qtype = self.truth[(self._sha(it.image), it.question)]
            row = []
            for c in it.candidates:
                seed = int.from_bytes(self._sha(f"{self.qtype}|{it.question}|{c}".encode() + it.image)[:8], "little")
                g = float(np.random.default_rng(seed).normal())
                row.append(float(c == answer) + self.noise * g if qtype == self.qtype else self.off * g)
            out.append(row)
        return out


def test_answer_type_features_let_the_router_rank_as_well_as_routing_by_type():
    """The router's default features (the question's answer type under the answer schema): fitted on 300 public
    items with clients that are loud outside their domain, it ranks 600 fresh items within a point of routing every
    question to its own domain's client, and clearly better than a router on image + question-word features, which
    overfits the 240 items it is fitted on and leaves weight on clients that know nothing about the question."""
    from mor.types import ScoringItem
    from mor_server.alignment.calibration import compare_routings
    from mor_server.alignment.evaluate import domain_of

    test = load_easyvqa("test")
    idx = np.random.default_rng(0).choice(len(test), 900, replace=False)
    public, fresh = [test[i] for i in idx[:300]], [test[i] for i in idx[300:]]
    schema = answer_schema(public)
    backend = InProcessBackend({f"expert_{d}": NoisyExpert(public + fresh, d) for d in DOMAINS})
    cal = calibration_items(fresh, schema)
    items = [ScoringItem(item_id=f"f{i}", image=e.image, question=e.question, candidates=tuple(c))
             for i, (e, c, _) in enumerate(cal)]
    scores = backend.client_scores(items, purpose="test")
    acc = {}
    for fx in (FeatureExtractor(parts=("type",), schema=schema), FeatureExtractor()):
        router = calibrate_router(backend, public, fx, steps=300, seed=0)
        feats = fx.batch([e.image for e, _, _ in cal], [e.question for e, _, _ in cal])
        res = compare_routings(router, feats, scores, [t for _, _, t in cal], [domain_of(e) for e, _, _ in cal],
                               {d: f"expert_{d}" for d in DOMAINS})
        acc[fx.parts] = res["router"]["accuracy"]
        if fx.parts == ("type",):
            oracle = res["oracle_type"]["accuracy"]
            assert all(router.calibration["weights_by_domain"][d][f"expert_{d}"] > 0.9 for d in DOMAINS), \
                router.calibration["weights_by_domain"]
    assert acc[("type",)] >= oracle - 0.015, (acc, oracle)
    assert acc[("type",)] >= acc[("image", "question")] + 0.03, acc


def test_feature_parts_one_hot_types_and_config_round_trip(public):
    schema = answer_schema(public)
    fx = FeatureExtractor(parts=("question", "type"), schema=schema)
    assert fx.parts == ("type", "question")  # one fixed order, whatever order they are named in
    n_types = len(schema.types())
    v = fx(public[0].image, "what shape is in the image?")
    assert v.shape == (fx.dim,) == (n_types + 1 + fx.hash_dim,)
    assert v[:n_types + 1].sum() == 1.0
    assert v[schema.types().index(frozenset({"circle", "rectangle", "triangle"}))] == 1.0
    assert fx.type_features("how many dogs are there?")[-1] == 1.0  # a question of no known type
    again = FeatureExtractor.from_config(fx.config())
    np.testing.assert_array_equal(again.batch([public[1].image], [public[1].question]),
                                  fx.batch([public[1].image], [public[1].question]))
    # a router saved before the parts existed (config without them) was calibrated on image + question
    legacy = FeatureExtractor.from_config({"grid": 4, "hash_dim": 64})
    np.testing.assert_array_equal(legacy(public[2].image, public[2].question),
                                  FeatureExtractor()(public[2].image, public[2].question))
    with pytest.raises(ValueError, match="answer schema"):
        FeatureExtractor(parts=("type",))
    with pytest.raises(ValueError, match="parts must be"):
        FeatureExtractor(parts=("pixels",))


def test_bad_router_features_fail_before_any_work(tmp_path, public):
    from mor_server.alignment.pipeline import AlignmentConfig, run_alignment

    backend = InProcessBackend({"a": LabelExpertScorer(public, ["color"])})
    with pytest.raises(ValueError, match="AlignmentConfig.router_features: .*parts must be"):
        run_alignment(backend, public=public, unlabeled=public, test=public,
                      config=AlignmentConfig(work_dir=str(tmp_path / "a"), router_features=("pixels",)))
    with pytest.raises(ValueError, match="needs typed_answers"):
        run_alignment(backend, public=public, unlabeled=public, test=public,
                      config=AlignmentConfig(work_dir=str(tmp_path / "b"), typed_answers=False))
    with pytest.raises(ValueError, match="AlignmentConfig.router_rank_weight: must be a finite number >= 0"):
        run_alignment(backend, public=public, unlabeled=public, test=public,
                      config=AlignmentConfig(work_dir=str(tmp_path / "c"), router_rank_weight=-1.0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def _noisy_flipped_round(seed: int, n: int = 230):
    """Yes/no calibration items scored as measured on the flipped-client scenario (docs/alignment.md): an honest
    expert whose scores spread widely and rank ~97% of items right, a client trained on flipped labels whose scores
    spread a quarter as wide and rank ~13% right (right exactly where the expert errs), and an off-domain client at
    chance."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    m_expert = 22 * rng.normal(1.0, 0.5, n)
    m_flipped = -6 * rng.normal(1.0, 0.9, n)
    m_flipped[m_expert < 0] = np.abs(m_flipped[m_expert < 0])
    m_off = 8 * rng.normal(0.0, 1.0, n)

    def rows(m):
        out = np.zeros((n, 2))
        out[np.arange(n), truth] = m / 2
        out[np.arange(n), 1 - truth] = -m / 2
        return out.tolist()

    return {"expert": rows(m_expert), "offdomain": rows(m_off), "flipped": rows(m_flipped)}, truth


def test_router_shuts_out_a_noisy_flipped_client():
    """The attack of the flipped-client scenario: a client whose reward model ranks answers the wrong way round,
    less loudly than the honest expert. The likelihood alone is nearly flat in that client's weight (it saturates
    once the expert ranks the item right, and the flipped client hedges the expert's few confident errors), so
    before the ranking-error term the router left it 0.10-0.17 of the weight on three of these five rounds (and
    0.11-0.15 of the yes/no score on the real scenario). With the term it gets almost none, and the mixture ranks
    as well as the expert alone."""
    for seed in range(5):
        scores, truth = _noisy_flipped_round(seed)
        r = MoRRouter(list(scores), 3, seed=0)
        cal = r.calibrate(np.zeros((len(truth), 3), np.float32), scores, truth)
        assert cal["clients"]["flipped"]["mean_weight"] < 0.01, (seed, cal["clients"])
        assert cal["clients"]["expert"]["mean_weight"] > 0.98, (seed, cal["clients"])
        assert cal["mixture"]["accuracy"] >= cal["clients"]["expert"]["accuracy"], (seed, cal)
        assert cal["rank_weight"] == 1.0
    likelihood_only = [MoRRouter(list(sc), 3, seed=0).calibrate(np.zeros((len(t), 3), np.float32), sc, t,
                                                                 rank_weight=0.0)["clients"]["flipped"]["mean_weight"]
                       for sc, t in map(_noisy_flipped_round, range(5))]
    assert max(likelihood_only) > 0.05, likelihood_only  # the ablation: what the term fixes
    with pytest.raises(ValueError, match="rank_weight must be a finite number >= 0"):
        MoRRouter(["a"], 3).calibrate(np.zeros((2, 3), np.float32), {"a": [1.0, 2.0]}, rank_weight=float("nan"))


def test_rank_errors_are_the_fraction_of_wrong_candidates_ranked_at_or_above_the_right_one():
    from mor_server.alignment.router import candidate_tensor, rank_errors

    scores = {"a": [[3.0, 1.0, 2.0], [-2.0, -1.0]], "b": [[1.0, 2.0, 3.0], [-5.0, -5.0]]}
    S, mask, t = candidate_tensor(scores, [0, 1], 2)
    R = rank_errors(S, mask, t)
    # item 0 (right: candidate 0): a ranks it first, b last; item 1 (two candidates, right: 1): a right, b a tie.
    # Item 1's padded third slot scores 0, above both clients' right answer: it must not count
    np.testing.assert_allclose(R, [[0.0, 1.0], [0.0, 1.0]])
    # free of the clients' score scales (a padded candidate never counts)
    np.testing.assert_array_equal(rank_errors(S * 1000.0, mask, t), R)


def test_router_weights_do_not_depend_on_the_order_clients_answered(public):
    """Over the wire, a round's reports arrive in whatever order the clients answer, so a rerun of the same alignment
    saw its calibration scores in another client order. The router's fit then differed in the last bits, every
    secagg weight with it, and each client's query audit refused every GRPO round of the rerun as a differencing
    attempt ("already summed ... with different weights"): 300 of 301 rounds failed in a second `mor demo`. The
    same scores in any order must give bit-identical weights."""
    experts = {f"expert_{d}": LabelExpertScorer(public, [d]) for d in DOMAINS}
    fx = FeatureExtractor()
    cal = calibration_items(public, answer_schema(public))[:40]
    feats = fx.batch([e.image for e, _, _ in cal], [e.question for e, _, _ in cal])
    weights, bounds = [], set()
    for order in (list(experts), list(reversed(experts)), sorted(experts, key=lambda c: c[-3:])):
        router = calibrate_router(InProcessBackend({c: experts[c] for c in order}), public, fx, steps=60, seed=0)
        w = router.weights(feats, live=order)
        weights.append({c: np.asarray(w[c]) for c in experts})
        bounds.add(router.calibration["score_bound"])  # the largest score magnitude (sets the secagg value range)
    assert len(bounds) == 1 and bounds.pop() > 0
    for other in weights[1:]:
        for c in experts:
            assert np.array_equal(weights[0][c], other[c]), c


def test_router_abstains_on_a_type_no_client_ranks_above_chance(public, tmp_path):
    """The only colour client has flipped preferences (noisy-color). The router shuts it out, which leaves colour
    with no client that ranks it above chance: calibration says so (``trust``: win rate, standard error) and routes
    colour questions to no client; shape and yes/no keep their experts. Saved and loaded with the router; an honest
    federation abstains on nothing, and abstain_z=None turns it off."""
    from mor_server.alignment.router import answer_set_trust

    scorers = {"expert_shape": LabelExpertScorer(public, ["shape"]), "expert_yesno": LabelExpertScorer(public, ["yesno"]),
               "flipped_color": Flipped(LabelExpertScorer(public, ["color"]))}
    schema = answer_schema(public)
    colour = tuple(sorted(schema.valid_answers(next(e.question for e in public if e.question_type == "color"))))
    router = calibrate_router(InProcessBackend(scorers), public, FeatureExtractor(), steps=300, seed=0, schema=schema)
    trust = router.calibration["trust"]
    assert router.abstain == [colour], trust
    assert not trust["color"]["trusted"] and trust["color"]["win_rate"] - 2 * trust["color"]["se"] <= 0.5
    assert trust["shape"]["trusted"] and trust["yesno"]["trusted"] and trust["shape"]["win_rate"] > 0.9
    assert router.abstains(list(reversed(colour))) and not router.abstains(["yes", "no"])
    line = summary_lines(router.calibration)[-1]
    assert line.startswith("router abstains on color (") and "chance 0.50" in line, line
    assert MoRRouter.load(router.save(tmp_path / "r")).abstain == [colour]
    off = calibrate_router(InProcessBackend(scorers), public, FeatureExtractor(), steps=300, seed=0, schema=schema,
                           abstain_z=None)
    assert off.abstain == [] and "trust" not in off.calibration
    honest = calibrate_router(InProcessBackend({f"expert_{d}": LabelExpertScorer(public, [d]) for d in DOMAINS}),
                              public, FeatureExtractor(), steps=300, seed=0, schema=schema)
    assert honest.abstain == [] and all(v["trusted"] for v in honest.calibration["trust"].values())
    with pytest.raises(ValueError, match="abstain_z must be a finite number >= 0"):
        calibrate_router(InProcessBackend(scorers), public, FeatureExtractor(), abstain_z=float("nan"))
    # clients that rank nothing above chance: every type abstained, and the printed line says so first
    from mor_server.alignment.calibration import abstain_summary

    blind = {d: {"items": 40, "win_rate": 0.5, "se": 0.05, "trusted": False} for d in DOMAINS}
    assert abstain_summary({"trust": blind}).startswith("WARNING: router abstains on color (")
    assert "every question type" in abstain_summary({"trust": blind})
    assert not abstain_summary(router.calibration).startswith("WARNING")
    # the statistic itself: chance is 0.5 whatever the number of candidates, ties count half, few items are kept
    S = np.array([[[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]] * 4, dtype=np.float32)
    mask = np.ones((12, 3), dtype=bool)
    t = np.zeros(12, dtype=np.int64)
    got = answer_set_trust(np.ones((12, 1)), S, mask, t, ["a"] * 6 + ["b"] * 3 + ["c"] * 3, z=2.0, min_items=4)
    assert got["a"]["win_rate"] == pytest.approx(0.5) and not got["a"]["trusted"]
    assert got["b"]["items"] == 3 and got["b"]["trusted"]  # too few to judge


def test_abstention_is_not_fooled_by_a_router_that_fits_noise_item_by_item(public):
    """The attack: no client knows colour (its client has flipped preferences, the others answer colour with their
    own independent noise), and the router reads per-item features (image + question). Tested on the weights it was
    fitted on, the router picked, item by item, whichever client's noise happened to rank that item right, and
    colour passed the trust test (39 of 40 random federations). Tested out of fold, colour is abstained on, and the
    honest federation still is not."""
    schema = answer_schema(public)
    colour = tuple(sorted(schema.valid_answers(next(e.question for e in public if e.question_type == "color"))))
    fx = FeatureExtractor(parts=["image", "question"], schema=schema)
    noisy = {"expert_shape": LabelExpertScorer(public, ["shape"], salt="s"),
             "expert_yesno": LabelExpertScorer(public, ["yesno"], salt="y"),
             "yesno_2": LabelExpertScorer(public, ["yesno"], salt="y2"),
             "yesno_3": LabelExpertScorer(public, ["yesno"], salt="y3")}
    for seed in (0, 1):
        router = calibrate_router(InProcessBackend(noisy), public, fx, steps=300, seed=seed, schema=schema)
        assert colour in router.abstain, router.calibration["trust"]
    salted = {f"expert_{d}": LabelExpertScorer(public, [d], salt=d) for d in DOMAINS}
    honest = calibrate_router(InProcessBackend(salted), public, fx, steps=300, seed=0, schema=schema)
    assert honest.abstain == [], honest.calibration["trust"]


def test_a_type_whose_only_expert_goes_offline_is_abstained_on(public, tmp_path):
    """The colour client leaves after calibration. The router renormalises its weights over the live clients, so
    colour questions went to the shape and yes/no clients, whose opinions of colour answers are noise: the failure
    abstention exists to prevent. The router keeps its calibration evidence and tests again for the live clients."""
    schema = answer_schema(public)
    colour = tuple(sorted(schema.valid_answers(next(e.question for e in public if e.question_type == "color"))))
    yesno = ("no", "yes")
    scorers = {f"expert_{d}": NoisyExpert(public, d) for d in DOMAINS}
    router = calibrate_router(InProcessBackend(scorers), public, FeatureExtractor(), steps=300, seed=0, schema=schema)
    assert router.abstain == [] and not router.abstains(colour)
    left = ["expert_shape", "expert_yesno"]
    assert router.abstains(colour, live=left) and not router.abstains(yesno, live=left)
    assert not router.abstains(colour, live=list(scorers) + ["newcomer"])  # every known client live: as calibrated
    # none of the clients it knows live: no evidence either way, so the calibrated list (an outage must fail the
    # round, not pass as abstention)
    assert router.abstain_for(live=[]) == router.abstain_for(live=["newcomer"]) == frozenset()
    loaded = MoRRouter.load(router.save(tmp_path / "r"))
    assert loaded.abstains(colour, live=left) and not loaded.abstains(colour)
    # abstention off: no evidence is kept, nothing is re-tested
    off = calibrate_router(InProcessBackend(scorers), public, FeatureExtractor(), steps=300, seed=0, schema=schema,
                           abstain_z=None)
    assert off.trust_evidence is None and not off.abstains(colour, live=left)
    assert not (off.save(tmp_path / "r") / "trust.json").exists()  # the old evidence does not outlive its router


def test_a_saved_router_with_a_malformed_abstain_list_is_refused_in_one_line(tmp_path, public):
    import json

    router = calibrate_router(InProcessBackend({f"expert_{d}": LabelExpertScorer(public, [d]) for d in DOMAINS}),
                              public, FeatureExtractor(), steps=50, seed=0, abstain_z=None)
    path = router.save(tmp_path / "r")
    meta = json.loads((path / "router.json").read_text())
    for bad in (None, ["color"], [[1, 2]], [[]]):
        (path / "router.json").write_text(json.dumps({**meta, "abstain": bad}))
        with pytest.raises(ValueError, match="abstain must be a list of answer lists"):
            MoRRouter.load(path)
    (path / "router.json").write_text(json.dumps({**meta, "abstain": [["yes", "no"]]}))
    loaded = MoRRouter.load(path)
    assert loaded.abstain == [("no", "yes")] and loaded.abstains(["yes", "no"])
    # numpy numbers are numbers (a threshold computed with numpy), a JSON user is told to write null
    from mor_server.alignment.router import check_abstain_z

    assert check_abstain_z(np.float32(2)) == 2.0 and check_abstain_z(np.int64(3)) == 3.0
    with pytest.raises(ValueError, match="null in JSON"):
        check_abstain_z(-1)


def test_an_answer_set_spanning_several_question_types_is_named_by_all_of_them(public):
    """Untyped answers: one answer set holds every question. The trust entry (and the printed line) names every
    type in it, not the most common type of the whole calibration set."""
    schema = answer_schema(public, typed=False)
    router = calibrate_router(InProcessBackend({f"expert_{d}": LabelExpertScorer(public, [d]) for d in DOMAINS}),
                              public, FeatureExtractor(), steps=100, seed=0, schema=schema)
    assert list(router.calibration["trust"]) == ["color/shape/yesno"], router.calibration["trust"]


def test_the_live_re_test_applies_top_k_among_the_live_clients_as_routing_does(public):
    """With top_k=1, when the top colour client leaves, routing gives colour to the best live client. The re-test
    must test that mixture (here: a noisy second colour client is not chosen; the yes/no client is, and it knows
    nothing of colour), not a renormalised mixture of the top-k weights computed with everyone live."""
    from mor_server.alignment.router import live_weights

    class Scaled:
        def __init__(self, inner, k):
            self.inner, self.k = inner, k

        def score(self, items):
            return [[self.k * v for v in row] for row in self.inner.score(items)]

    schema = answer_schema(public)
    colour = tuple(sorted(schema.valid_answers(next(e.question for e in public if e.question_type == "color"))))
    fx = FeatureExtractor(parts=["type"], schema=schema)
    scorers = {"color_a": NoisyExpert(public, "color"), "color_b": Scaled(NoisyExpert(public, "color", noise=1.5), 5.0),
               "expert_shape": NoisyExpert(public, "shape"), "expert_yesno": NoisyExpert(public, "yesno")}
    router = calibrate_router(InProcessBackend(scorers), public, fx, steps=300, seed=0, schema=schema, top_k=1)
    live = ["color_b", "expert_shape", "expert_yesno"]
    q = next(e for e in public if e.question_type == "color")
    routed = router.weights(fx.batch([q.image], [q.question]), live=live)
    assert routed["expert_yesno"] == [1.0]  # what GRPO would send colour questions to
    assert router.abstains(colour, live=live)
    assert not router.abstains(colour)
    # live_weights reproduces MoRRouter.weights' restriction exactly
    full = __import__("copy").copy(router)
    full.top_k = None
    feats = fx.batch([e.image for e in public[:40]], [e.question for e in public[:40]])
    w = full.weights(feats, live=router.client_ids)
    W = np.array([[w[c][i] for c in router.client_ids] for i in range(40)])
    for sub in (live, ["color_a", "expert_yesno"], router.client_ids):
        got = live_weights(W, [router.client_ids.index(c) for c in sub], 1)
        want = router.weights(feats, live=sub)
        assert np.allclose(got, np.array([[want[c][i] for c in sub] for i in range(40)]), atol=1e-6), sub
