"""Scenario C of issue #12: a fourth client holds another task family (the procedural shapes), and the server's
policy must be able to read, answer and be evaluated on it."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from mor_client.data import make_federation_split
from mor_client.data.partition import FederationSplit
from mor_server.alignment.pipeline import heldout_test
from mor_server.alignment.policy import build_tokenizer, easyvqa_vocabulary, policy_vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _shapes_split(seed: int = 0) -> FederationSplit:
    return make_federation_split(seed=seed, n_clients=4, include_shapes_client=True, shapes_test_size=40,
                                 pairs_per_client=200)


def test_held_out_shapes_items_are_new_images_and_come_first_in_the_test():
    s = _shapes_split()
    assert len(s.server_heldout) == 40 and {e.domain for e in s.server_heldout} == {"shapes"}
    seen = {e.image_id for e in s.server_public + s.server_unlabeled}
    assert not {e.image_id for e in s.server_heldout} & seen
    client = {p.example.image_id for c in s.clients.values() for p in c.train + c.heldout}
    assert not {e.image_id for e in s.server_heldout} & client
    test = heldout_test(s)
    # the first eval_size items hold every procedural item, and both of its question types
    assert Counter(e.question_type for e in test[:40]) == Counter(e.question_type for e in s.server_heldout)
    assert {e.question_type for e in test[:40]} == {"count", "relation"}
    assert [e.example_id for e in _shapes_split().server_heldout] == [e.example_id for e in s.server_heldout]
    # a split without the family evaluates on easy-vqa alone, as before
    plain = make_federation_split(seed=0, n_clients=3, pairs_per_client=50)
    assert plain.server_heldout == [] and {e.domain for e in heldout_test(plain)} != {"shapes"}


def test_policy_vocabulary_covers_another_family_and_keeps_easy_vqa_token_ids():
    s = _shapes_split()
    base = easyvqa_vocabulary()
    plain = make_federation_split(seed=0, n_clients=3, pairs_per_client=50)
    assert policy_vocabulary(plain.server_public) == base  # the demo's policy is unchanged
    words = policy_vocabulary(s.server_public)
    assert words[: len(base)] == base and {"how", "many", "left", "right", "four"} <= set(words)
    tok = build_tokenizer(words)
    for e in s.server_heldout:  # questions never seen by the warm start read without <unk>
        assert tok.unk_token_id not in tok(e.question)["input_ids"], e.question
    assert build_tokenizer(base)("is there a red circle ?")["input_ids"] == tok("is there a red circle ?")["input_ids"]


def test_baselines_adversary_holds_inverted_pairs_of_every_type():
    from bench_baselines import adversary_examples, client_examples

    s = make_federation_split(seed=0, n_clients=3, pairs_per_client=120)
    adv = adversary_examples(s, 0, 90)
    assert len(adv) == 90
    by_item = {(id(p.example.image), p.example.question): p for c in s.clients.values() for p in c.train}
    for a in adv:  # each is an honest pair turned round: the wrong answer is the target
        p = by_item[(id(a.image), a.question)]
        assert (a.answer, a.rejected) == (p.rejected, p.chosen) and a.answer != p.example.answer
    kinds = Counter()
    for name, c in s.clients.items():
        qs = {p.example.question for p in c.train}
        kinds[name] = sum(a.question in qs for a in adv)
    assert all(v >= 20 for v in kinds.values())  # drawn from every honest client
    assert [a.question for a in adversary_examples(s, 0, 90)] == [a.question for a in adv]
    assert set(client_examples("adversary", s, 0, 90)) == {"client0", "client1", "client2", "adversary"}
    assert set(client_examples("honest", s, 0, 90)) == {"client0", "client1", "client2"}


def test_shapes_vocabulary_covers_every_generated_item():
    from mor_client.data import make_shapes_examples
    from mor_client.data.shapes import shapes_vocabulary
    from mor_server.alignment.policy import task_words

    ex = make_shapes_examples(300, seed=11)
    assert set(task_words([e.question for e in ex] + [e.answer for e in ex])) <= set(shapes_vocabulary())
