"""A procedural VQA family drawn with Pillow ("another domain" for one client).

Two question types, one-word answers:

* ``count``: "how many circles are there?" -> "one" .. "four" (1-4 shapes of the asked kind plus 0-2 others).
* ``relation``: "is the red circle left or right of the blue triangle?" -> "left" | "right".

Everything is deterministic from the seed: the same ``(seed, n)`` gives byte-identical PNGs.
"""

from __future__ import annotations

import io
import random

from .easyvqa import COUNT_WORDS, RELATIONS, VQAExample

SHAPES_ANSWERS: tuple[str, ...] = COUNT_WORDS + RELATIONS
_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "black": (20, 20, 20),
        "yellow": (230, 200, 30), "gray": (128, 128, 128)}
_KINDS = ("circle", "square", "triangle")
SIZE = 64


def _draw(draw, kind: str, cx: int, cy: int, r: int, color) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def _place(rng: random.Random, n: int, r: int) -> list[tuple[int, int]]:
    """n non-overlapping centres on a coarse grid (cells of 2r+2 pixels)."""
    cell = 2 * r + 2
    cells = [(x, y) for x in range(SIZE // cell) for y in range(SIZE // cell)]
    rng.shuffle(cells)
    return [(x * cell + cell // 2, y * cell + cell // 2) for x, y in cells[:n]]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _count_example(rng: random.Random, seed: int, i: int) -> VQAExample:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    target = rng.choice(_KINDS)
    k = rng.randint(1, 4)
    others = [rng.choice([s for s in _KINDS if s != target]) for _ in range(rng.randint(0, 2))]
    kinds = [target] * k + others
    for kind, (cx, cy) in zip(kinds, _place(rng, len(kinds), 6)):
        _draw(d, kind, cx, cy, 6, _RGB[rng.choice(list(_RGB))])
    plural = {"circle": "circles", "square": "squares", "triangle": "triangles"}[target]
    q = rng.choice([f"how many {plural} are there?", f"how many {plural} are in the image?"])
    return VQAExample(example_id=f"shapes-{seed}-{i}", image=_png(img), question=q, answer=COUNT_WORDS[k - 1],
                      question_type="count", domain="shapes", image_id=f"shapes-{seed}-{i}")


def _relation_example(rng: random.Random, seed: int, i: int) -> VQAExample:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    a_kind, b_kind = rng.sample(_KINDS, 2)
    a_col, b_col = rng.sample(list(_RGB), 2)
    r = 8
    while True:
        ax, bx = rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2)
        if abs(ax - bx) > 2 * r + 2:
            break
    _draw(d, a_kind, ax, rng.randint(r + 1, SIZE - r - 2), r, _RGB[a_col])
    _draw(d, b_kind, bx, rng.randint(r + 1, SIZE - r - 2), r, _RGB[b_col])
    q = f"is the {a_col} {a_kind} left or right of the {b_col} {b_kind}?"
    return VQAExample(example_id=f"shapes-{seed}-{i}", image=_png(img), question=q,
                      answer=RELATIONS[0] if ax < bx else RELATIONS[1], question_type="relation",
                      domain="shapes", image_id=f"shapes-{seed}-{i}")


def shapes_vocabulary() -> list[str]:
    """Every word the family's questions and answers can use (its templates, kinds, colours and answers), sorted: what a
    policy needs to read and answer it whichever items a public split happens to hold."""
    plural = ("circles", "squares", "triangles")
    words = {"how", "many", "are", "there", "in", "the", "image", "is", "left", "or", "right", "of", "?",
             *plural, *_KINDS, *_RGB, *SHAPES_ANSWERS}
    return sorted(words)


def make_shapes_examples(n: int, *, seed: int, question_types: tuple[str, ...] = ("count", "relation"),
                         start: int = 0) -> list[VQAExample]:
    """``n`` procedural examples (one image each), cycling over ``question_types``; deterministic from
    ``(seed, index)``, so disjoint index ranges (``start``) give disjoint images."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bad = [t for t in question_types if t not in ("count", "relation")]
    if bad or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of ('count', 'relation'), got {question_types}")
    out = []
    for i in range(start, start + n):
        rng = random.Random(f"{seed}:{i}")
        qt = question_types[i % len(question_types)]
        out.append(_count_example(rng, seed, i) if qt == "count" else _relation_example(rng, seed, i))
    return out
