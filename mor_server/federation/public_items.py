"""Public scoring items for `mor server serve --rounds`: easy-vqa test images and questions (public data), each
with the candidate answers of its question's type (colours, shapes, or yes/no)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from mor.types import ScoringItem

SHAPES = ("circle", "rectangle", "triangle")
YESNO = ("yes", "no")


@lru_cache(maxsize=1)
def _easyvqa_test():
    from easy_vqa import get_answers, get_test_image_paths, get_test_questions

    qs, answers, image_ids = get_test_questions()
    return qs, answers, image_ids, get_test_image_paths(), tuple(get_answers())


def public_scoring_items(n: int, offset: int = 0) -> list[ScoringItem]:
    if n < 1:
        raise ValueError(f"--items must be at least 1, got {n}")
    qs, answers, image_ids, paths, all_answers = _easyvqa_test()
    colors = tuple(a for a in all_answers if a not in SHAPES + YESNO)
    out = []
    for i in range(offset, offset + n):
        j = i % len(qs)
        a = answers[j]
        cands = YESNO if a in YESNO else SHAPES if a in SHAPES else colors
        out.append(ScoringItem(f"test-{j}", Path(paths[image_ids[j]]).read_bytes(), qs[j], cands))
    return out
