"""AnswerSchema: answer types learned from the public split, and the typed format rule built on it."""

import pytest

from mor_server.alignment.answers import AnswerSchema
from mor_server.alignment.rewards import FormatReward

PUBLIC = [
    ("what color is the shape?", "red"), ("what color is the shape?", "blue"),
    ("what is the color of the circle?", "green"),
    ("what shape is present?", "circle"), ("what shape is present?", "triangle"),
    ("is there a red circle?", "yes"), ("is there a blue triangle?", "no"),
]
VOCAB = ["red", "blue", "green", "black", "circle", "triangle", "rectangle", "yes", "no"]


@pytest.fixture
def schema():
    # "black" and "rectangle" are never an answer in the public split, but unlabeled questions use them in the
    # slots where colours / shapes go, which is how they get their type
    return AnswerSchema.fit(PUBLIC, questions=["is there a black rectangle?", "is there a green circle?"],
                            vocabulary=VOCAB)


def test_types_are_learned_from_answers_and_question_slots(schema):
    assert set(map(frozenset, schema.types())) == {
        frozenset({"red", "blue", "green", "black"}), frozenset({"circle", "triangle", "rectangle"}),
        frozenset({"yes", "no"})}
    assert schema.valid_answers("is there a green triangle?") == {"yes", "no"}
    assert schema.valid_answers("what color is the shape?") == {"red", "blue", "green", "black"}
    # an unseen wording is matched to the most similar template
    assert schema.valid_answers("what color is the triangle shape?") == {"red", "blue", "green", "black"}
    # nothing similar: every answer stays allowed (the rule cannot know better)
    assert schema.valid_answers("how many?") == set(VOCAB)


def test_is_valid_is_one_word_of_the_right_type(schema):
    q = "what color is the shape?"
    assert schema.is_valid(q, "black") and schema.is_valid(q, " Red. ")
    assert not schema.is_valid(q, "yes")            # wrong type: a yes/no reward model never ranked it
    assert not schema.is_valid(q, "red circle")     # two words
    assert not schema.is_valid(q, "")               # empty
    assert not schema.is_valid(q, "purple")         # not an answer of the task


def test_round_trip_and_errors(schema):
    again = AnswerSchema.from_dict(schema.to_dict())
    assert again.to_dict() == schema.to_dict()
    assert again.valid_answers("is a red circle present?") == schema.valid_answers("is a red circle present?")
    with pytest.raises(ValueError, match="public split"):
        AnswerSchema.fit([], vocabulary=VOCAB)
    with pytest.raises(ValueError, match="vocabulary"):
        AnswerSchema.from_dict({"types": []})


def test_typed_format_reward(schema):
    fmt = FormatReward(schema)
    qs = ["what color is the shape?", "what color is the shape?", "is there a red circle?", "is there a red circle?"]
    assert fmt(completions=["red", "no", "no", [{"role": "assistant", "content": "blue"}]], question=qs) == \
        [1.0, 0.0, 1.0, 0.0]
    # an untyped answer list accepts any answer for any question
    assert FormatReward(VOCAB)(completions=["red", "no"], question=qs[:2]) == [1.0, 1.0]
