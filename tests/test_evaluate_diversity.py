"""Evaluation that a constant answer cannot fool: per-domain majority-answer rate, distinct answers, entropy and
a collapse flag, next to the accuracy."""

import logging
from types import SimpleNamespace

import pytest

from mor_server.alignment.evaluate import accuracy, answer_diversity, format_accuracy_table

COLOURS = ["red", "green", "blue", "brown", "gray", "black", "teal", "yellow"]


def _examples():
    ex = []
    for i in range(40):  # colour: "brown" is the commonest gold answer (10 of 40)
        ex.append(SimpleNamespace(question="what color is the shape?", answer="brown" if i < 10 else COLOURS[i % 8],
                                  question_type="color", image=None))
    for i in range(20):
        ex.append(SimpleNamespace(question="is there a circle?", answer="yes" if i % 2 else "no",
                                  question_type="yesno", image=None))
    return ex


def test_a_constant_colour_answer_is_flagged_and_scores_the_majority_rate(caplog):
    ex = _examples()
    answers = ["brown" if e.question_type == "color" else e.answer for e in ex]  # yes/no perfect, colour constant
    with caplog.at_level(logging.WARNING, logger="mor_server.alignment.evaluate"):
        acc = accuracy(None, None, ex, answers=answers)
    col = acc["diversity"]["color"]
    gold_brown = sum(e.answer == "brown" for e in ex if e.question_type == "color")
    assert acc["by_domain"]["color"] == pytest.approx(gold_brown / 40)
    assert col["majority_rate"] == pytest.approx(gold_brown / 40)  # accuracy equals the constant policy's bar
    assert col["distinct_answers"] == 1 and col["entropy_bits"] == 0.0 and col["top_answer"] == "brown"
    assert col["collapsed"] is True and acc["collapsed"] == ["color"]
    assert acc["diversity"]["yesno"]["collapsed"] is False  # both answers used, each where it is right
    assert "collapsed in color" in caplog.text and "'brown'" in caplog.text
    assert "COLLAPSED" in format_accuracy_table(acc)


def test_a_constant_yes_no_answer_is_flagged_too():
    """Two gold answers are no excuse: a policy answering "yes" to every yes/no question has collapsed (issue #17's
    aligned policies did exactly that on some seeds). A type whose gold answer is nearly constant is not flagged."""
    ex = _examples()
    answers = ["yes" if e.question_type == "yesno" else e.answer for e in ex]
    acc = accuracy(None, None, ex, answers=answers)
    assert acc["diversity"]["yesno"]["collapsed"] is True and acc["collapsed"] == ["yesno"]
    assert acc["by_domain"]["yesno"] == pytest.approx(acc["diversity"]["yesno"]["majority_rate"])
    skewed = [SimpleNamespace(question="is there a circle?", answer="yes" if i else "no", question_type="yesno",
                              image=None) for i in range(20)]  # gold 95% "yes": answering "yes" is no collapse
    assert accuracy(None, None, skewed, answers=["yes"] * 20)["collapsed"] == []


def test_a_policy_that_sees_is_not_flagged():
    ex = _examples()
    acc = accuracy(None, None, ex, answers=[e.answer for e in ex])
    assert acc["overall"] == 1.0 and acc["collapsed"] == []
    d = acc["diversity"]["color"]
    assert d["distinct_answers"] == d["gold_distinct"] == 8
    assert d["entropy_bits"] == pytest.approx(d["gold_entropy_bits"]) and d["entropy_bits"] > 2.5
    assert "COLLAPSED" not in format_accuracy_table(acc)


def test_answer_diversity_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal length"):
        answer_diversity(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="2 answers for 1 examples"):
        accuracy(None, None, _examples()[:1], answers=["a", "b"])
