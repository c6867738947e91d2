"""MoR reward callable and the GRPO driver over TRL: the reward reaching TRL is the routed mixture, a failed
round yields None (never 0) and is counted, checkpoints and resume continue the step count, Prometheus."""

import hashlib
import math
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from mor_client.data.easyvqa import load_easyvqa
from mor_server.alignment.features import FeatureExtractor
from mor_server.alignment.grpo import GRPOMetrics, GRPORunConfig, make_prompt_dataset, run_grpo
from mor_server.alignment.inprocess import InProcessBackend
from mor_server.alignment.policy import TinyLlavaConfig, build_tiny_llava, exact_match, normalize_answer, save_policy
from mor_server.alignment.rewards import FormatReward, LengthReward, MoRReward, RoundFailed, hybrid_rewards
from mor_server.alignment.router import MoRRouter


class LabelScorer:
    """Exact-match-aware scorer built from real labelled examples (score 1 for the right answer), plus offset."""

    def __init__(self, examples, offset=0.0):
        self.truth = {(hashlib.sha1(e.image).digest(), e.question): normalize_answer(e.answer) for e in examples}
        self.offset = offset

    def score(self, items):
        return [[self.offset + float(exact_match(c, self.truth.get((hashlib.sha1(it.image).digest(), it.question))))
                 for c in it.candidates] for it in items]


class FlakyBackend(InProcessBackend):
    """Fails the first ``fail`` mixed rounds (or all when fail < 0)."""

    def __init__(self, scorers, fail):
        super().__init__(scorers)
        self.fail = fail
        self.calls = 0

    def mixed_scores(self, items, weights):
        self.calls += 1
        if self.fail < 0 or self.calls <= self.fail:
            raise RoundFailed("injected failure")
        return super().mixed_scores(items, weights)


@pytest.fixture(scope="module")
def examples():
    return load_easyvqa("test")[:64]


@pytest.fixture(scope="module")
def router():
    fx = FeatureExtractor()
    r = MoRRouter(["a", "b"], fx.dim, seed=0)
    import torch

    with torch.no_grad():  # a non-uniform, input-dependent router
        r.net.out.weight.normal_(0, 1.0)
        r.net.out.bias.copy_(torch.tensor([0.5, -0.5]))
    return r


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    model, processor = build_tiny_llava(config=TinyLlavaConfig(image_size=32, patch_size=16, vision_hidden=32,
                                                               text_hidden=32, intermediate=64, heads=2))
    return save_policy(model, processor, tmp_path_factory.mktemp("policy"))


def trl_kwargs(exs, group):
    """The columns TRL hands a reward function for a batch (each prompt repeated `group` times)."""
    rep = [e for e in exs for _ in range(group)]
    return {"example_id": [e.example_id for e in rep], "question": [e.question for e in rep],
            "image_png": [e.image for e in rep], "domain": [e.question_type for e in rep]}


def test_reward_is_the_routed_mixture(examples, router):
    sa, sb = LabelScorer(examples), LabelScorer(examples, offset=0.25)
    backend = InProcessBackend({"a": sa, "b": sb})
    fx = FeatureExtractor()
    mor = MoRReward(backend, router, fx)
    exs = examples[:3]
    completions = [[{"role": "assistant", "content": c}] for e in exs
                   for c in (e.answer, "blue", "no", e.answer + " x")]
    got = mor(prompts=None, completions=completions, **trl_kwargs(exs, 4))
    w = router.weights(fx.batch([e.image for e in exs], [e.question for e in exs]), live=["a", "b"])
    assert len(got) == 12
    for i, e in enumerate(exs):
        for j in range(4):
            c = completions[4 * i + j][0]["content"]
            right = float(exact_match(c, e.answer))  # "<answer> x" rambles: not a match
            expected = w["a"][i] * right + w["b"][i] * (0.25 + right)
            assert got[4 * i + j] == pytest.approx(expected, rel=1e-6)
    assert mor.rounds_ok == 1 and mor.rounds_failed == 0
    assert len({round(w["a"][i], 6) for i in range(3)}) > 1  # weights really are per item


def test_failed_round_is_none_not_zero_and_counted(examples, router):
    reg = CollectorRegistry()
    metrics = GRPOMetrics(reg)
    exs = examples[:2]
    completions = [e.answer for e in exs for _ in range(2)]
    dead = MoRReward(FlakyBackend({"a": LabelScorer(examples)}, fail=-1), router, FeatureExtractor(), retries=2,
                     metrics=metrics)
    assert dead(completions=completions, **trl_kwargs(exs, 2)) == [None] * 4
    assert dead.rounds_failed == 1 and dead.attempts_failed == 3 and dead.backend.calls == 3
    assert metrics.value("mor_reward_rounds_total", {"outcome": "failed"}) == 1
    # one failure then success: the bounded retry recovers
    flaky = MoRReward(FlakyBackend({"a": LabelScorer(examples)}, fail=1), router, FeatureExtractor(), retries=1)
    assert flaky(completions=completions, **trl_kwargs(exs, 2)) == [1.0] * 4
    assert flaky.rounds_ok == 1 and flaky.attempts_failed == 1

    class Slow(InProcessBackend):
        def mixed_scores(self, items, weights):
            time.sleep(0.5)
            return super().mixed_scores(items, weights)

    slow = MoRReward(Slow({"a": LabelScorer(examples)}), router, FeatureExtractor(), deadline_s=0.05, retries=0)
    assert slow(completions=completions, **trl_kwargs(exs, 2)) == [None] * 4
    assert "deadline" in slow.history[-1]["reason"]
    with pytest.raises(ValueError, match="image_png"):
        slow(completions=completions, question=[e.question for e in exs for _ in range(2)])


def test_rule_rewards_and_hybrid():
    comps = ["yes", "blue circle", "banana", [{"role": "assistant", "content": "no"}]]
    assert FormatReward(["yes", "no", "blue"])(completions=comps) == [1.0, 0.0, 0.0, 1.0]
    assert LengthReward(max_words=1, cap=4)(completions=comps) == [0.0, -0.25, 0.0, 0.0]
    funcs, weights = hybrid_rewards(None, answers=["yes"], w_mix=0, w_format=0.5, w_length=0.1)
    assert weights == [0.5, 0.1] and isinstance(funcs[0], FormatReward)
    with pytest.raises(ValueError, match="needs answers"):
        hybrid_rewards(None, w_format=1.0)
    with pytest.raises(ValueError, match="every weight is zero"):
        hybrid_rewards(None)


def small_cfg(out, steps, **kw):
    return GRPORunConfig(output_dir=str(out), max_steps=steps, prompts_per_step=2, num_generations=2,
                         max_completion_length=2, logging_steps=1, progress=False, **kw)


def test_grpo_steps_through_trl_checkpoint_and_resume(examples, router, policy_dir, tmp_path):
    reg = CollectorRegistry()
    backend = InProcessBackend({"a": LabelScorer(examples), "b": LabelScorer(examples, offset=0.25)})
    metrics = GRPOMetrics(reg)
    mor = MoRReward(backend, router, FeatureExtractor(), metrics=metrics)
    ds = make_prompt_dataset(examples[:16])
    assert "answer" not in ds.column_names
    res = run_grpo(policy_dir, ds, [mor], [1.0], small_cfg(tmp_path / "run", 2, save_steps=2), metrics=metrics)
    assert res["global_step"] == 2 and (tmp_path / "run" / "checkpoint-2").is_dir()
    # one scoring round per generation batch, and TRL logged exactly the rewards the MoR callable returned
    assert mor.rounds_ok == 2
    logged = [h["reward"] for h in res["log_history"] if "reward" in h]
    assert logged == pytest.approx([h["mean_reward"] for h in mor.history], rel=1e-5)
    assert reg.get_sample_value("mor_grpo_step") == 2
    assert reg.get_sample_value("mor_reward_rounds_total", {"outcome": "ok"}) == 2
    # resume: the step count continues from the checkpoint
    mor2 = MoRReward(backend, router, FeatureExtractor())
    res2 = run_grpo(policy_dir, ds, [mor2], [1.0], small_cfg(tmp_path / "run", 3, save_steps=2), resume=True)
    assert res2["resumed_from"].endswith("checkpoint-2") and res2["global_step"] == 3 and mor2.rounds_ok == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_grpo(policy_dir, ds, [mor2], [1.0], small_cfg(tmp_path / "empty", 1), resume=True)


def test_grpo_survives_failed_rounds(examples, router, policy_dir, tmp_path):
    backend = FlakyBackend({"a": LabelScorer(examples)}, fail=-1)
    mor = MoRReward(backend, router, FeatureExtractor(), retries=0)
    res = run_grpo(policy_dir, make_prompt_dataset(examples[:8]), [mor], [1.0],
                   small_cfg(tmp_path / "fail", 2, save_steps=0))
    assert res["global_step"] == 2 and mor.rounds_failed == 2 and mor.rounds_ok == 0
    logged = [h["rewards/mor_reward/mean"] for h in res["log_history"] if "rewards/mor_reward/mean" in h]
    assert logged and all(v is None or math.isnan(v) for v in logged)  # missing, not zero
    with pytest.raises(ValueError, match="num_generations"):
        GRPORunConfig(num_generations=1).validate()


def test_malformed_completions_are_not_sent_and_rewards_are_bounded(examples, router):
    """valid=...: a completion of the wrong type never reaches the clients (MoR reward missing, the format rule
    prices it); group_sigmoid: the calibrated preference over the group's mean, in (0, 1)."""
    from mor_server.alignment.answers import AnswerSchema

    class Recording(InProcessBackend):
        sent: list = []

        def mixed_scores(self, items, weights):
            self.sent.extend(c for it in items for c in it.candidates)
            return super().mixed_scores(items, weights)

    schema = AnswerSchema.fit([(e.question, e.answer) for e in examples])
    backend = Recording({"a": LabelScorer(examples)})
    exs = [e for e in examples if e.question_type == "color"][:2]
    wrong = [a for a in ("red", "blue", "green", "gray", "teal", "brown", "yellow", "black") if a != exs[0].answer][0]
    completions = [c for e in exs for c in (e.answer, "yes", "", wrong)]
    mor = MoRReward(backend, router, FeatureExtractor(), valid=schema.is_valid, shaping="group_sigmoid")
    got = mor(completions=completions, **trl_kwargs(exs, 4))
    assert got[1] is None and got[2] is None and got[5] is None and got[6] is None
    assert "yes" not in backend.sent and "" not in backend.sent and mor.unscored == 4
    assert got[0] > 0.5 > got[3] and all(0.0 < got[i] < 1.0 for i in (0, 3, 4, 7))
    # no well-formed completion at all: no round is run
    n_rounds = mor.rounds_ok
    assert mor(completions=["yes"] * 4, **trl_kwargs(exs[:1], 4)) == [None] * 4 and mor.rounds_ok == n_rounds
    with pytest.raises(ValueError, match="shaping"):
        MoRReward(backend, router, FeatureExtractor(), shaping="softmax")


def test_answer_softmax_rewards_are_the_mixtures_probability_among_the_questions_answers(examples, router):
    """answer_softmax: every possible answer of the question is scored once (duplicates and the group's luck do
    not matter) and a completion's reward is softmax(alpha * mixed score)[completion]; a group whose only
    well-formed completion is right still rewards it (group_sigmoid would give 0.5)."""
    import math as m

    from mor_server.alignment.answers import AnswerSchema

    class Recording(InProcessBackend):
        items: list = []

        def mixed_scores(self, items, weights):
            self.items.extend(items)
            return super().mixed_scores(items, weights)

    import copy

    schema = AnswerSchema.fit([(e.question, e.answer) for e in examples])
    backend = Recording({"a": LabelScorer(examples)})
    ex = [e for e in examples if e.question_type == "color"][0]
    router = copy.deepcopy(router)
    router.calibration = {"alpha": 5.0}  # the calibrated Bradley-Terry scale
    mor = MoRReward(backend, router, FeatureExtractor(), valid=schema.is_valid, shaping="answer_softmax",
                    anchors=schema.valid_answers)
    got = mor(completions=[ex.answer, "yes", ex.answer, ""], **trl_kwargs([ex], 4))
    item = backend.items[-1]
    assert sorted(item.candidates) == sorted(schema.valid_answers(ex.question))  # each answer once
    alpha, n = 5.0, len(item.candidates)
    want = m.exp(alpha) / (m.exp(alpha) + (n - 1))  # LabelScorer: 1 for the right answer, 0 otherwise
    assert got[0] == pytest.approx(want) and got[2] == pytest.approx(want) and got[1] is None and got[3] is None
    lone = mor(completions=[ex.answer, "yes", "", "no"], **trl_kwargs([ex], 4))
    assert lone[0] == pytest.approx(want) and want > 0.5
    with pytest.raises(ValueError, match="anchors"):
        MoRReward(backend, router, FeatureExtractor(), shaping="answer_softmax")


def test_a_type_the_router_abstains_on_is_sent_to_no_client_and_gets_no_advantage(examples, router):
    """The attack: every client that knows colour is replaced by one with flipped preferences. The router shuts it
    out, but without abstention the colour completions still got the other clients' opinion of colour answers, and
    GRPO's per-group normalisation made that noise a full-size advantage (colour 97-100% -> 37-86%, docs). A type
    the router abstains on is now never sent to a client and every completion of its prompt gets the same reward,
    while the other types are scored as before."""
    import copy

    from mor_server.alignment.answers import AnswerSchema

    class Recording(InProcessBackend):
        def __init__(self, scorers):
            super().__init__(scorers)
            self.sent = []

        def mixed_scores(self, items, weights):
            self.sent.extend(it.question for it in items)
            return super().mixed_scores(items, weights)

    schema = AnswerSchema.fit([(e.question, e.answer) for e in examples])
    colour = [e for e in examples if e.question_type == "color"][:2]
    shape = [e for e in examples if e.question_type == "shape"][:1]
    backend = Recording({"a": LabelScorer(examples), "b": LabelScorer(examples)})
    router = copy.deepcopy(router)
    router.calibration = {"alpha": 5.0}
    router.abstain = [tuple(sorted(schema.valid_answers(colour[0].question)))]
    mor = MoRReward(backend, router, FeatureExtractor(), valid=schema.is_valid, shaping="answer_softmax",
                    anchors=schema.valid_answers)
    exs = colour + shape
    other = {"color": "blue", "shape": "circle"}
    answers = [a for e in exs for a in (e.answer, other[e.question_type] if e.answer != other[e.question_type]
                                        else "red" if e.question_type == "color" else "square", "maybe")]
    got = mor(completions=answers, **trl_kwargs(exs, 3))
    assert not any(q in backend.sent for q in (e.question for e in colour)), backend.sent
    assert backend.sent == [shape[0].question]
    n_colour = len(schema.valid_answers(colour[0].question))
    for i in range(2):  # both well-formed colour completions: 1/candidates, the right one no better than the wrong
        assert got[3 * i] == got[3 * i + 1] == pytest.approx(1.0 / n_colour) and got[3 * i + 2] is None
    assert got[6] > 0.5 > got[7]  # the shape prompt still ranks its right answer first
    assert mor.abstained == 2 and mor.rounds_ok == 1
    # a batch of abstained prompts only: no round at all
    backend.sent.clear()
    again = mor(completions=answers[:6], **trl_kwargs(colour, 3))
    assert backend.sent == [] and again[0] == again[1] and mor.rounds_ok == 1 and mor.abstained == 4
    # without a way to recognise the abstained questions the reward refuses to start
    with pytest.raises(ValueError, match="answer_sets"):
        MoRReward(backend, router, FeatureExtractor())


def test_prompts_of_a_type_whose_only_expert_went_offline_are_sent_to_no_client(examples):
    """Calibrated with its colour expert, the federation then loses it. Renormalised over the live clients, colour
    questions went to the shape and yes/no clients, whose opinions of colour answers are noise, and GRPO learned from
    that noise (the failure abstention exists to prevent). The reward now asks the router which types it trusts
    with the clients live at this round: colour is sent to no client, shape still is, and when the expert is back
    colour is scored again."""
    from mor_server.alignment.calibration import answer_schema, calibrate_router
    from mor_server.alignment.inprocess import LabelExpertScorer

    class Recording(InProcessBackend):
        def __init__(self, scorers):
            super().__init__(scorers)
            self.sent, self.offline, self.fail = [], set(), False

        def client_ids(self):
            return [c for c in super().client_ids() if c not in self.offline]

        def mixed_scores(self, items, weights):
            self.sent.extend(it.question for it in items)
            if self.fail:
                raise RoundFailed("injected failure")
            return super().mixed_scores(items, weights)

    public = examples[:300]
    schema = answer_schema(public)
    backend = Recording({f"expert_{d}": LabelExpertScorer(public, [d]) for d in ("color", "shape", "yesno")})
    router = calibrate_router(backend, public, FeatureExtractor(parts=["type"], schema=schema), steps=200, seed=0,
                              schema=schema)
    assert router.abstain == []
    metrics = GRPOMetrics(CollectorRegistry())
    mor = MoRReward(backend, router, FeatureExtractor(parts=["type"], schema=schema), shaping="answer_softmax",
                    anchors=schema.valid_answers, metrics=metrics)
    colour = [e for e in public if e.question_type == "color"][:1]
    shape = [e for e in public if e.question_type == "shape"][:1]
    exs = colour + shape
    completions = [colour[0].answer, "blue" if colour[0].answer != "blue" else "red",
                   shape[0].answer, "circle" if shape[0].answer != "circle" else "triangle"]
    backend.offline = {"expert_color"}
    got = mor(completions=completions, **trl_kwargs(exs, 2))
    assert backend.sent == [shape[0].question] and mor.abstained == 1
    assert got[0] == got[1] and got[2] > got[3]
    assert metrics.value("mor_reward_abstained_prompts_total") == 1  # what the MorRewardTypeAbstained alert reads
    # a failed round: the scored prompt's rewards are missing (None), the abstained one keeps its constant
    backend.fail = True
    failed = mor(completions=completions, **trl_kwargs(exs, 2))
    assert failed[:2] == got[:2] and failed[2:] == [None, None] and mor.rounds_failed == 1
    backend.fail = False
    # every client offline is an outage, not an abstention: the round fails (None), as the alerts expect
    backend.offline = {"expert_color", "expert_shape", "expert_yesno"}
    out = mor(completions=completions, **trl_kwargs(exs, 2))
    assert out == [None] * 4 and mor.rounds_failed == 2 and mor.abstained == 2  # (1 + the failed round's)
    backend.offline = {"expert_color"}
    backend.offline, backend.sent = set(), []
    got = mor(completions=completions, **trl_kwargs(exs, 2))
    assert backend.sent == [colour[0].question, shape[0].question] and got[0] > got[1] and mor.abstained == 2


def test_freeze_leaves_the_named_parts_as_they_were_and_trains_the_rest(examples, router, policy_dir, tmp_path):
    # GRPORunConfig.freeze="embeddings+vision": after GRPO steps the token embeddings (tied to the output head) and
    # the vision tower are bit-identical to the warm start, while the language layers moved
    import torch

    from mor_server.alignment.policy import load_policy

    def ranked(completions, **kw):  # distinct rewards in every group: every step has a non-zero advantage
        return [float(i % 2) for i in range(len(completions))]

    res = run_grpo(policy_dir, make_prompt_dataset(examples[:16]), [ranked], [1.0],
                   small_cfg(tmp_path / "frozen", 2, save_steps=0, freeze="embeddings+vision", learning_rate=1e-2))
    before, after = load_policy(policy_dir)[0].state_dict(), res["model"].state_dict()
    emb = [k for k in before if "embed_tokens" in k or "lm_head" in k]
    vision = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k]
    layers = [k for k in before if ".layers." in k and "vision_tower" not in k]
    assert emb and vision and layers
    assert all(torch.equal(before[k], after[k].cpu()) for k in emb + vision)
    assert any(not torch.equal(before[k], after[k].cpu()) for k in layers)
    with pytest.raises(ValueError, match="GRPORunConfig.freeze: unknown part 'head'"):
        GRPORunConfig(freeze="embeddings,head").validate()


def test_lr_schedule_and_warmup_reach_trl():
    # GRPORunConfig's schedule settings become TRL's: constant (the default, as every figure was measured),
    # constant after a warm-up, or cosine; anything else is one line naming the field
    trl = [GRPORunConfig(**kw).to_trl(None) for kw in ({}, {"warmup_steps": 10}, {"lr_schedule": "cosine"})]
    assert [(str(t.lr_scheduler_type).rsplit(".", 1)[-1].lower(), t.warmup_steps) for t in trl] == \
        [("constant", 0), ("constant_with_warmup", 10), ("cosine", 0)]
    with pytest.raises(ValueError, match="GRPORunConfig.lr_schedule must be constant or cosine, got 'linear'"):
        GRPORunConfig(lr_schedule="linear").validate()
    with pytest.raises(ValueError, match="GRPORunConfig.warmup_steps must be >= 0"):
        GRPORunConfig(warmup_steps=-1).validate()
