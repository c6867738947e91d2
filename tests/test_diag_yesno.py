"""The yes/no split the docs' "Why yes/no stops at the wording prior" rests on (benchmarks/diag_policy_vision.py):
a policy that answers from the wording alone scores 100% where the wording gives the answer and 0% where it does
not, one that reads the image scores on both, and the split is measured on easy-vqa's own test questions."""

from __future__ import annotations


def test_wording_only_answers_are_told_apart_from_looking(monkeypatch, benchmark_script):
    from mor_client.data import make_federation_split
    from mor_client.data.synthetic import is_negated
    from mor_server.alignment import policy
    from mor_server.alignment.pipeline import heldout_test

    diag = benchmark_script("diag_policy_vision")
    test = heldout_test(make_federation_split(seed=0, n_clients=3))[:600]
    yn = [e for e in test if e.question_type == "yesno"]
    assert any(is_negated(e.question) for e in yn) and not all(is_negated(e.question) for e in yn)
    by_wording = lambda m, p, items, **kw: ["yes" if is_negated(e.question) else "no" for e in items]  # noqa: E731
    monkeypatch.setattr(policy, "generate_answers", by_wording)
    split = diag.yesno_by_prior(None, None, test)
    assert split["wording_right"]["accuracy"] == 1.0 and split["wording_wrong"]["accuracy"] == 0.0
    assert split["wording_right"]["n"] + split["wording_wrong"]["n"] == len(yn)
    assert split["wording_wrong"]["n"] > 0.05 * len(yn)  # enough items where only the image tells
    monkeypatch.setattr(policy, "generate_answers", lambda m, p, items, **kw: [e.answer for e in items])
    split = diag.yesno_by_prior(None, None, test)
    assert split["wording_right"]["accuracy"] == split["wording_wrong"]["accuracy"] == 1.0
    always_yes = lambda m, p, items, **kw: ["yes"] * len(items)  # noqa: E731
    monkeypatch.setattr(policy, "generate_answers", always_yes)
    split = diag.yesno_by_prior(None, None, test)
    assert 0.0 < split["wording_right"]["accuracy"] < 1.0


def test_reference_probe_counts_the_grpo_groups_that_hold_both_answers(benchmark_script):
    """diag_reference_yesno's figures: a reference at 50/50 has contrast in nearly every group of 8 whatever the
    temperature; a confident one has almost none at temperature 1, and a higher temperature flattens it."""
    import math

    diag = benchmark_script("diag_reference_yesno")
    even = diag.group_contrast([0.5, 0.5], 1.5)
    assert math.isclose(even["mean_p_no"], 0.5) and math.isclose(even["groups_with_both"], 1 - 2 * 0.5 ** 8)
    sure = diag.group_contrast([0.999], 1.0)
    assert sure["mean_minority"] < 0.002 and sure["groups_with_both"] < 0.01
    hot = diag.group_contrast([0.99], 2.0)
    assert math.isclose(hot["mean_p_no"], math.sqrt(99) / (1 + math.sqrt(99)), rel_tol=1e-9)
    assert hot["groups_with_both"] > diag.group_contrast([0.99], 1.0)["groups_with_both"]
    assert diag.group_contrast([], 1.0)["groups_with_both"] is None
