"""Synthetic, **public** easy-vqa-style examples for non-private pre-training of reward models.

Every image and label here is drawn by this module's own Pillow renderer from a seed: no easy-vqa image,
question or answer (the clients' private data, nor the server's) is read or copied. What is shared with
easy-vqa is only its publicly documented *format*: a 64x64 image with a near-white background and one filled
shape (circle, rectangle or triangle) in one of eight named colours (X11/CSS values: "green" is (0, 255, 0),
"teal" (0, 128, 128), ...), and templated questions of three types:

* ``color``: "what color is the circle?" / "what is the color of the shape?" -> a colour
* ``shape``: "what shape is in the image?" / "what is the red shape?" -> circle | rectangle | triangle
* ``yesno``: "is there a red shape?", "does the image not contain a triangle?", ... -> yes | no
  (about any of the 8 colours or 3 shapes, affirmative or negated)

Because it costs no privacy, a client may pre-train its whole model on as many of these as it likes before
the DP-SGD phase on its private pairs (see ``TrainConfig.synthetic_images`` in :mod:`mor_client.rewards.config`;
run by :mod:`mor_client.rewards.pretrain`). Deterministic: the same ``(seed, index)`` gives byte-identical PNGs
and the same question; disjoint index ranges (``start``) give disjoint images.
"""

from __future__ import annotations

import io
import random
from typing import Sequence

from .easyvqa import COLORS, SHAPE_NAMES, VQAExample

#: X11/CSS values of easy-vqa's eight colour names.
SYNTHETIC_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
    "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}
SYNTHETIC_TYPES: tuple[str, ...] = ("color", "shape", "yesno")
SIZE = 64
_SCALE = 2  # drawn at 2x and downsampled: anti-aliased edges

_COLOR_Q = ("what color is the {shape}?", "what is the color of the {shape}?", "what color is the shape?",
            "what is the color of the shape?")
_SHAPE_Q = ("what shape is in the image?", "what shape is present?", "what shape does the image contain?",
            "what is the {color} shape?")
_YES_Q = ("is there a {x}?", "is there a {x} in the image?", "does the image contain a {x}?", "is a {x} present?")
_NOT_Q = ("is there not a {x}?", "is there not a {x} in the image?", "does the image not contain a {x}?",
          "is no {x} present?")


def _render(rng: random.Random, shape: str, color: str) -> bytes:
    from PIL import Image, ImageDraw

    s = SIZE * _SCALE
    img = Image.new("RGB", (s, s), tuple(rng.randint(230, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    fill = SYNTHETIC_RGB[color]
    lo, hi = s // 8, s // 2
    if shape == "rectangle":
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        x, y = rng.randint(0, s - w - 1), rng.randint(0, s - h - 1)
        d.rectangle([x, y, x + w, y + h], fill=fill)
    elif shape == "circle":
        r = rng.randint(lo, hi)
        x, y = rng.randint(0, s - r - 1), rng.randint(0, s - r - 1)
        d.ellipse([x, y, x + r, y + r], fill=fill)
    else:  # equilateral triangle, base at the bottom
        a = rng.randint(lo, hi)
        x, y = rng.randint(0, s - a - 1), rng.randint(int(0.87 * a), s - 1)
        d.polygon([(x, y), (x + a, y), (x + a / 2, y - 0.866 * a)], fill=fill)
    img = img.resize((SIZE, SIZE), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def _balanced_asked(rng: random.Random, shape: str, color: str) -> str:
    """A colour (8 in 11) or shape to ask about, the one in the image half of the time."""
    about_color = rng.random() < len(COLORS) / (len(COLORS) + len(SHAPE_NAMES))
    truth, pool = (color, COLORS) if about_color else (shape, SHAPE_NAMES)
    return truth if rng.random() < 0.5 else rng.choice([p for p in pool if p != truth])


def _question(rng: random.Random, qtype: str, shape: str, color: str, *, balanced: bool = False) -> tuple[str, str]:
    if qtype == "color":
        return rng.choice(_COLOR_Q).format(shape=shape), color
    if qtype == "shape":
        return rng.choice(_SHAPE_Q).format(color=color), shape
    if balanced:  # the asked value is in the image half of the time: the wording alone says nothing
        x = _balanced_asked(rng, shape, color)
    else:
        # like easy-vqa's format: the asked value is any of the 8 colours or 3 shapes (so "is there a red
        # shape?" is mostly "no"), half of the questions negated
        x = rng.choice(COLORS + SHAPE_NAMES)
    present = x in (color, shape)
    negated = rng.random() < 0.5
    q = rng.choice(_NOT_Q if negated else _YES_Q).format(x=f"{x} shape" if x in COLORS else x)
    return q, "yes" if present != negated else "no"


def make_synthetic_examples(n_images: int, *, seed: int, question_types: tuple[str, ...] = SYNTHETIC_TYPES,
                            questions_per_image: int = 1, start: int = 0,
                            balanced_yesno: bool = False) -> list[VQAExample]:
    """``n_images`` freshly drawn images with ``questions_per_image`` questions each (question types cycle
    over ``question_types``). ``domain`` is ``"synthetic"``; ids are ``synthetic-{seed}-{index}[-{j}]``.
    Public by construction: nothing here comes from easy-vqa's data files.

    ``balanced_yesno``: a yes/no question asks about a colour or shape that is in the image half of the time
    (negated or not, also half the time), so every question string is answered "yes" as often as "no" and only
    the image tells. The default follows easy-vqa's format, where the wording alone predicts most answers
    ("is there a red shape?" is "no" for 7 images in 8)."""
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}")
    bad = [t for t in question_types if t not in SYNTHETIC_TYPES]
    if bad or not question_types:
        raise ValueError(f"question_types must be a non-empty subset of {SYNTHETIC_TYPES}, got {question_types}")
    out = []
    for i in range(start, start + n_images):
        rng = _rng(seed, i)
        shape, color = rng.choice(SHAPE_NAMES), rng.choice(COLORS)
        png = _render(rng, shape, color)
        for j in range(questions_per_image):
            qt = question_types[(i * questions_per_image + j) % len(question_types)]
            q, a = _question(rng, qt, shape, color, balanced=balanced_yesno)
            out.append(VQAExample(example_id=f"synthetic-{seed}-{i}-{j}", image=png, question=q, answer=a,
                                  question_type=qt, domain="synthetic", image_id=f"synthetic-{seed}-{i}"))
    return out


def _rng(seed: int, i: int) -> random.Random:
    return random.Random(f"mor-synthetic:{seed}:{i}")


def synthetic_attributes(seed: int, index: int) -> tuple[str, str]:
    """(shape, colour) drawn in synthetic image ``index`` of ``seed`` (its ``image_id`` is
    ``synthetic-{seed}-{index}``): public labels for visual pre-training, without rendering again."""
    rng = _rng(seed, index)
    shape = rng.choice(SHAPE_NAMES)
    return shape, rng.choice(COLORS)


def is_negated(question: str) -> bool:
    """Whether a yes/no question of this format is negated ("is there not a ...", "is no ... present?")."""
    q = question.lower()
    return " not " in f" {q} " or q.startswith("is no ")


def negation_targets(examples: Sequence[VQAExample]) -> list[float | None]:
    """Per example, 1.0 / 0.0 for a negated / affirmative yes/no question and None for other question types: the
    readout target of the ``negation`` curriculum phase. Public and prior-free: on prior-balanced questions negation
    says nothing about the answer, so training it teaches the policy to carry the word "not" to where it answers,
    not which answer goes with it."""
    return [float(is_negated(e.question)) if e.question_type == "yesno" else None for e in examples]


def synthetic_presence(example: VQAExample) -> bool | None:
    """For a yes/no example: whether the asked colour or shape is in the image (the answer with the
    negation undone); None for other question types."""
    if example.question_type != "yesno":
        return None
    return (example.answer == "yes") != is_negated(example.question)


def presence_question(seed: int, index: int) -> tuple[str, bool]:
    """A balanced grounding question about synthetic image ``index`` of ``seed``: "is there a {colour}
    shape?" / "is there a {shape}?" (affirmative templates), naming what is in the image half of the time.
    Returns (question, present). Used as an auxiliary public label in visual pre-training."""
    shape, color = synthetic_attributes(seed, index)
    rng = random.Random(f"mor-synthetic-presence:{seed}:{index}")
    x = _balanced_asked(rng, shape, color)
    return rng.choice(_YES_Q).format(x=f"{x} shape" if x in COLORS else x), x in (shape, color)


#: The yes/no curriculum that made the compact policy family compare the colour or shape a question names with the
#: image's (docs/alignment.md, "Why yes/no stops at the wording prior"): affirmative prior-balanced presence questions
#: about one word, then two, four, any colour or shape, then a fifth of the questions negated.
YESNO_CURRICULUM = "words:red=400,words:red+blue=400,words:red+blue+green+black=600,affirmative=1500,mixed:0.2=1500"


def _negated_fraction(phase: str) -> float:
    try:
        frac = float(phase.split(":", 1)[1])
    except ValueError:
        frac = -1.0
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"curriculum phase {phase!r}: the negated fraction of mixed:<f> must be in [0, 1)")
    return frac


def _phase_words(phase: str) -> list[str]:
    words = [w for w in phase.split(":", 1)[1].split("+") if w]
    unknown = [w for w in words if w not in COLORS + SHAPE_NAMES]
    if not words or unknown:
        raise ValueError(f"curriculum phase {phase!r}: words:<a>+<b> names colours or shapes of "
                         f"{', '.join(COLORS + SHAPE_NAMES)}" + (f" (not {', '.join(unknown)})" if unknown else ""))
    return words


def _check_phase(phase: str) -> None:
    """A ValueError naming the fix unless ``phase`` is a curriculum phase :func:`curriculum_phase_examples` draws."""
    if phase.startswith("mixed:"):
        _negated_fraction(phase)
    elif phase.startswith("words:"):
        _phase_words(phase)
    elif phase not in ("affirmative", "balanced", "colorshape", "vqa", "negation"):
        raise ValueError(f"unknown curriculum phase {phase!r}: use words:<a>+<b>, affirmative, mixed:<f>, balanced, "
                         "colorshape, vqa or negation")


def curriculum_phase_examples(phase: str, data_seed: int, *, pool: int | None = None) -> list[VQAExample]:
    """The public synthetic examples of one yes/no curriculum phase (every yes/no question prior-balanced:
    ``balanced_yesno=True``), drawn from ``data_seed``; ``pool``: images drawn before the phase's filter (default the
    measured sizes: 60,000 for ``words:``, 24,000 for ``affirmative`` and ``mixed:``, 6,000 for ``vqa``, 12,000 for
    the others):

    * ``words:red+blue``: affirmative presence questions that name only these colours or shapes;
    * ``affirmative``: affirmative presence questions about any colour or shape;
    * ``mixed:0.2``: presence questions of which this fraction is negated, the rest affirmative;
    * ``balanced``: half of the questions negated;
    * ``colorshape``: colour and shape questions;
    * ``vqa``: colour, shape and yes/no questions in turn, one per image (the supervised mix of
      ``benchmarks/results/supervised_ceiling.json``'s prior-balanced row: colour and shape are learned, yes/no is
      answered in kind but at chance, since no question string predicts its answer);
    * ``negation``: the ``vqa`` mix again, trained with a readout of :func:`negation_targets` (whether each yes/no
      question is negated) from the state that predicts the answer (``warmstart.yesno_curriculum``)."""
    _check_phase(phase)
    if phase in ("vqa", "negation"):
        return make_synthetic_examples(pool or 6000, seed=data_seed, balanced_yesno=True)
    if phase == "colorshape":
        return make_synthetic_examples(pool or 12000, seed=data_seed, question_types=("color", "shape"))
    if phase == "balanced":
        return make_synthetic_examples(pool or 12000, seed=data_seed, question_types=("yesno",), balanced_yesno=True)
    if phase.startswith("mixed:"):
        frac = _negated_fraction(phase)
        drawn = make_synthetic_examples(pool or 24000, seed=data_seed, question_types=("yesno",), balanced_yesno=True)
        aff = [e for e in drawn if not is_negated(e.question)]
        neg = [e for e in drawn if is_negated(e.question)]
        mixed = aff + neg[: int(len(aff) * frac / (1 - frac))]
        random.Random(data_seed).shuffle(mixed)
        return mixed
    drawn = make_synthetic_examples(pool or (24000 if phase == "affirmative" else 60000), seed=data_seed,
                                    question_types=("yesno",), balanced_yesno=True)
    affirmative = [e for e in drawn if not is_negated(e.question)]
    if phase == "affirmative":
        return affirmative
    words = _phase_words(phase)
    return [e for e in affirmative if any(f" {w} " in f" {e.question.rstrip('?')} " for w in words)]


def parse_curriculum(spec: str, *, default_lr: float, extra_phases: tuple[str, ...] = ()
                     ) -> list[tuple[str, int, float]]:
    """``"name=steps[@lr],..."`` -> ``[(phase, steps, lr), ...]``; a ValueError names the bad part and the fix.
    ``extra_phases``: names the caller trains on data of its own, accepted as they are."""
    phases = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, rest = part.partition("=")
        steps, _, lr = rest.partition("@")
        if not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"curriculum phase {part!r} must be name=steps[@lr] with steps >= 1")
        try:
            lr_v = float(lr) if lr else default_lr
        except ValueError:
            raise ValueError(f"curriculum phase {part!r}: the learning rate after @ must be a number") from None
        if name not in extra_phases:
            _check_phase(name)
        phases.append((name, int(steps), lr_v))
    return phases
