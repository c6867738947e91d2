"""Preference pairs (image, question, chosen answer, rejected answer) with optional annotator noise."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .easyvqa import VQAExample, candidate_answers


@dataclass(frozen=True)
class PreferencePair:
    """One preference judgement. ``chosen`` is what the annotator preferred; when ``flipped`` is True the
    annotator got it wrong (``chosen`` is then the wrong answer and ``rejected`` the right one)."""

    example: VQAExample
    chosen: str
    rejected: str
    annotator: str
    flipped: bool

    @property
    def pair_id(self) -> str:
        return f"{self.example.example_id}|{self.rejected if not self.flipped else self.chosen}"


def make_pairs(examples: Sequence[VQAExample], *, seed: int, flip_fraction: float = 0.0, n_annotators: int = 8,
               rejected_per_example: int = 1) -> list[PreferencePair]:
    """Preference pairs from labelled examples.

    The chosen answer is the ground truth; the rejected one is a plausible wrong answer of the same type
    (a colour for a colour question, "no" for a "yes" question). ``rejected_per_example`` > 1 draws that
    many distinct wrong answers per example (capped by the answers available). Exactly
    ``round(flip_fraction * len(pairs))`` pairs, chosen at random, have chosen/rejected swapped
    (annotator noise). Each pair gets one of ``n_annotators`` annotators. Deterministic from ``seed``.
    """
    if not 0.0 <= flip_fraction <= 1.0:
        raise ValueError(f"flip_fraction must be in [0, 1], got {flip_fraction}")
    if n_annotators < 1:
        raise ValueError(f"n_annotators must be >= 1, got {n_annotators}")
    if rejected_per_example < 1:
        raise ValueError(f"rejected_per_example must be >= 1, got {rejected_per_example}")
    rng = random.Random(seed)
    raw: list[tuple[VQAExample, str, str]] = []
    for ex in examples:
        wrong = [a for a in candidate_answers(ex.question_type) if a != ex.answer]
        for rej in rng.sample(wrong, min(rejected_per_example, len(wrong))):
            raw.append((ex, ex.answer, rej))
    n_flip = round(flip_fraction * len(raw))
    flip = set(rng.sample(range(len(raw)), n_flip))
    out = []
    for i, (ex, right, wrong) in enumerate(raw):
        ann = f"annotator-{rng.randrange(n_annotators)}"
        if i in flip:
            out.append(PreferencePair(ex, chosen=wrong, rejected=right, annotator=ann, flipped=True))
        else:
            out.append(PreferencePair(ex, chosen=right, rejected=wrong, annotator=ann, flipped=False))
    return out
