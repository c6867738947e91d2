"""Loader for the public ``easy-vqa`` data set (64x64 PNG images of one coloured shape, templated
questions, 13 one-word answers). Image bytes are kept as PNG and decoded lazily by the models."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

COLORS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPE_NAMES: tuple[str, ...] = ("circle", "rectangle", "triangle")
YESNO: tuple[str, ...] = ("yes", "no")
#: easy-vqa's 13 answers (the order of the package's answers.txt).
ANSWERS: tuple[str, ...] = ("circle", "green", "red", "gray", "yes", "teal", "black", "rectangle",
                            "yellow", "triangle", "brown", "blue", "no")
#: answers of the procedural "shapes" family (see :mod:`mor_client.data.shapes`).
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left", "right")

_TYPE_ANSWERS = {"color": COLORS, "shape": SHAPE_NAMES, "yesno": YESNO, "count": COUNT_WORDS,
                 "relation": RELATIONS}
_ANSWER_TYPE = {a: t for t, answers in _TYPE_ANSWERS.items() for a in answers}


@dataclass(frozen=True)
class VQAExample:
    """One (image, question, answer) example. ``image`` holds PNG bytes."""

    example_id: str
    image: bytes
    question: str
    answer: str
    question_type: str
    domain: str
    image_id: str

    def pil_image(self):
        """Decode the PNG bytes with Pillow (RGB)."""
        import io

        from PIL import Image

        return Image.open(io.BytesIO(self.image)).convert("RGB")


def answer_type(answer: str) -> str:
    """The answer type of a one-word answer: "color" | "shape" | "yesno" | "count" | "relation"."""
    try:
        return _ANSWER_TYPE[answer.strip().lower()]
    except KeyError:
        raise ValueError(f"answer {answer!r} is not a known answer; known: {sorted(_ANSWER_TYPE)}") from None


def candidate_answers(question_type: str) -> tuple[str, ...]:
    """All answers of a question type (the pool plausible wrong answers are drawn from)."""
    try:
        return _TYPE_ANSWERS[question_type]
    except KeyError:
        raise ValueError(f"question_type {question_type!r} unknown; use one of {sorted(_TYPE_ANSWERS)}") from None


def _data_dir() -> str:
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise ImportError("the easy-vqa package is required: pip install easy-vqa") from e
    return os.path.join(os.path.dirname(easy_vqa.__file__), "data")


@lru_cache(maxsize=2)
def _load(split: str) -> tuple[VQAExample, ...]:
    base = os.path.join(_data_dir(), split)
    with open(os.path.join(base, "questions.json")) as f:
        rows = json.load(f)
    images: dict[int, bytes] = {}
    out = []
    for i, (question, answer, image_num) in enumerate(rows):
        if image_num not in images:
            with open(os.path.join(base, "images", f"{image_num}.png"), "rb") as f:
                images[image_num] = f.read()
        out.append(VQAExample(example_id=f"{split}-{i}", image=images[image_num], question=question,
                              answer=answer, question_type=answer_type(answer), domain="easyvqa",
                              image_id=f"{split}-{image_num}"))
    return tuple(out)


def load_easyvqa(split: str) -> list[VQAExample]:
    """All examples of easy-vqa's ``"train"`` (38,575) or ``"test"`` (9,673) split, cached in-process."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return list(_load(split))
