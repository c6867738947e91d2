"""easy-vqa loader, procedural shapes, preference pairs and federation splits."""

import io

import pytest
from PIL import Image

from mor_client.data import (ANSWERS, answer_type, load_easyvqa, make_federation_split, make_pairs,
                             make_shapes_examples)
from mor_client.data.easyvqa import candidate_answers


def test_easyvqa_loader_real_data():
    train, test = load_easyvqa("train"), load_easyvqa("test")
    assert len(train) == 38575 and len(test) == 9673
    assert len(ANSWERS) == 13 and {e.answer for e in train} == set(ANSWERS)
    e = train[1]
    assert e.question == "what color is the shape?" and e.answer == "blue" and e.question_type == "color"
    assert Image.open(io.BytesIO(e.image)).size == (64, 64)
    assert len({x.example_id for x in train}) == len(train)
    assert load_easyvqa("train")[0] is train[0]  # cached in-process
    with pytest.raises(ValueError, match="split"):
        load_easyvqa("validation")
    with pytest.raises(ValueError, match="known answer"):
        answer_type("purple")


def test_pairs_same_type_noise_and_determinism():
    exs = load_easyvqa("test")[:400]
    pairs = make_pairs(exs, seed=3, flip_fraction=0.25, n_annotators=5)
    assert len(pairs) == 400 and sum(p.flipped for p in pairs) == 100
    for p in pairs:
        right = p.rejected if p.flipped else p.chosen
        wrong = p.chosen if p.flipped else p.rejected
        assert right == p.example.answer and wrong != right
        assert answer_type(wrong) == p.example.question_type
    assert {p.annotator for p in pairs} <= {f"annotator-{i}" for i in range(5)}
    assert pairs == make_pairs(exs, seed=3, flip_fraction=0.25, n_annotators=5)
    assert pairs != make_pairs(exs, seed=4, flip_fraction=0.25, n_annotators=5)
    many = make_pairs(exs[:10], seed=0, rejected_per_example=20)
    assert len(many) == sum(len(candidate_answers(e.question_type)) - 1 for e in exs[:10])
    with pytest.raises(ValueError, match="flip_fraction"):
        make_pairs(exs, seed=0, flip_fraction=1.5)


def test_shapes_family_deterministic_and_answerable():
    a = make_shapes_examples(20, seed=7)
    assert a == make_shapes_examples(20, seed=7)
    assert a[0].image != make_shapes_examples(1, seed=8)[0].image
    assert {e.question_type for e in a} == {"count", "relation"}
    for e in a:
        assert answer_type(e.answer) == e.question_type and e.domain == "shapes"
        img = Image.open(io.BytesIO(e.image)).convert("RGB")
        if e.question_type == "relation":  # the answer agrees with the pixels: first-named shape's colour
            words = e.question.split()
            from mor_client.data.shapes import _RGB
            xs = {}
            for name in (words[2], words[-2]):
                col = _RGB[name]
                px = [x for x in range(64) for y in range(64) if img.getpixel((x, y)) == col]
                xs[name] = sum(px) / len(px)
            assert (xs[words[2]] < xs[words[-2]]) == (e.answer == "left")


def test_federation_split_heterogeneous_disjoint_deterministic():
    s = make_federation_split(seed=0, pairs_per_client=[2000, 1500, 1000])
    assert [len(c.train) for c in s.clients.values()] == [2000, 1500, 1000]
    types = [{p.example.question_type for p in c.train} for c in s.clients.values()]
    assert types == [{"color"}, {"shape"}, {"yesno"}]
    server_imgs = {e.image_id for e in s.server_public + s.server_unlabeled}
    server_ids = {e.example_id for e in s.server_public + s.server_unlabeled}
    assert not {e.image_id for e in s.server_public} & {e.image_id for e in s.server_unlabeled}
    for c in s.clients.values():
        tr_imgs = {p.example.image_id for p in c.train}
        ho_imgs = {p.example.image_id for p in c.heldout}
        assert c.heldout and not tr_imgs & ho_imgs
        assert not (tr_imgs | ho_imgs) & server_imgs
        assert not {p.example.example_id for p in c.train + c.heldout} & server_ids
    s2 = make_federation_split(seed=0, pairs_per_client=[2000, 1500, 1000])
    assert [p.example.example_id for p in s2.clients["client1"].train] == \
        [p.example.example_id for p in s.clients["client1"].train]
    d = make_federation_split(seed=1, scheme="dirichlet", dirichlet_alpha=0.3, n_clients=4)
    sizes = sorted(len(c.train) for c in d.clients.values())
    assert sizes[-1] > 2 * sizes[0]  # unequal
    sh = make_federation_split(seed=0, include_shapes_client=True, pairs_per_client=[None, None, 500])
    assert {p.example.domain for p in sh.clients["client2"].train} == {"shapes"}
    assert any(e.domain == "shapes" for e in sh.server_public)
    with pytest.raises(ValueError, match="scheme"):
        make_federation_split(seed=0, scheme="random")
    with pytest.raises(ValueError, match="pairs_per_client"):
        make_federation_split(seed=0, pairs_per_client=[1, 2])


def test_synthetic_prompt_images_extend_the_prompt_pool_and_change_nothing_else():
    """More public images to align on: rendered by the server, answerable, disjoint from easy-vqa's images, and the
    clients' data, the server's labelled split and the held-out test stay exactly as without them."""
    from mor_server.alignment.pipeline import heldout_test

    base = make_federation_split(seed=3, n_clients=3)
    more = make_federation_split(seed=3, n_clients=3, synthetic_prompt_images=40)
    extra = more.server_unlabeled[len(base.server_unlabeled):]
    assert more.server_unlabeled[:len(base.server_unlabeled)] == base.server_unlabeled
    assert len(extra) == 120 and {e.domain for e in extra} == {"synthetic"}
    assert {e.question_type for e in extra} == {"color", "shape", "yesno"}
    assert all(e.answer in candidate_answers(e.question_type) for e in extra)
    assert len({e.image_id for e in extra}) == 40 and len({e.image for e in extra}) == 40
    assert not {e.image for e in extra} & {e.image for e in base.server_unlabeled + base.server_public}
    assert more.server_public == base.server_public
    assert {k: (c.train, c.heldout) for k, c in more.clients.items()} == \
        {k: (c.train, c.heldout) for k, c in base.clients.items()}
    assert [e.example_id for e in heldout_test(more)] == [e.example_id for e in heldout_test(base)]
    with pytest.raises(ValueError, match="synthetic_prompt_images"):
        make_federation_split(seed=3, synthetic_prompt_images=-1)
