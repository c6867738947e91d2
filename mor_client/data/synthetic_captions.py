"""Synthetic **captioned** images: public vision-language pre-training data for the built-in policy (issue #17).

Stage 1 of the policy's two-stage public warm start (:class:`mor_server.alignment.warmstart.PretrainConfig`), like real VLM
training: before the policy sees a single VQA example it learns, from images drawn by this project's own renderer
(:mod:`mor_client.data.synthetic`, public by construction), to *describe* an image in words -- "a red circle",
"the circle is red", "there is a red circle". That teaches it to see and gives it the colour and shape vocabulary
grounded in pixels, but not the question -> answer mapping of VQA: the prompt is always the same
(:data:`CAPTION_PROMPT`), never a question, and a caption is never a one-word answer.

Every word of a prompt or caption is in easy-vqa's vocabulary (the built-in policy's word-level tokenizer), so no
token is unknown. Deterministic: the same ``(seed, index)`` gives the same PNG (the synthetic renderer's) and the
same caption; the caption template is drawn from its own stream, so the image is the synthetic module's image
``index`` of ``seed`` byte for byte.
"""

from __future__ import annotations

import random

from .easyvqa import VQAExample
from .synthetic import make_synthetic_examples, synthetic_attributes

#: The one caption prompt (the text after the image); deliberately not a question.
CAPTION_PROMPT = "the image"
#: Caption templates: bare attribute lists and short sentences, colour first or shape first (so the first word of a
#: caption is a colour, a shape or an article, and neither attribute always comes first).
CAPTION_TEMPLATES: tuple[str, ...] = ("{color} {shape}", "{shape} is {color}", "a {color} {shape}",
                                      "the {shape} is {color}")


#: ``prompts="varied"``: the prompt decides what the caption names (the whole image, its colour or its shape), so the
#: language model must read the text after the image; with the one fixed prompt it learns to ignore it.
VARIED_PROMPTS: tuple[tuple[str, str], ...] = (("the image", "{both}"), ("the color", "{color}"),
                                               ("the shape", "{shape}"))


def caption(seed: int, index: int) -> str:
    """The caption of synthetic image ``index`` of ``seed``."""
    shape, color = synthetic_attributes(seed, index)
    rng = random.Random(f"mor-synthetic-caption:{seed}:{index}")
    return rng.choice(CAPTION_TEMPLATES).format(color=color, shape=shape)


def prompted_caption(seed: int, index: int) -> tuple[str, str]:
    """``(prompt, caption)`` of synthetic image ``index`` of ``seed`` under :data:`VARIED_PROMPTS`."""
    shape, color = synthetic_attributes(seed, index)
    rng = random.Random(f"mor-synthetic-prompt:{seed}:{index}")
    prompt, form = rng.choice(VARIED_PROMPTS)
    return prompt, form.format(color=color, shape=shape, both=caption(seed, index))


def make_caption_examples(n_images: int, *, seed: int, start: int = 0, prompts: str = "fixed") -> list[VQAExample]:
    """``n_images`` synthetic images, each with :data:`CAPTION_PROMPT` as ``question`` and its caption as
    ``answer`` (``question_type`` "caption", ``domain`` "synthetic"), ready for
    :func:`mor_server.alignment.warmstart.sft_warm_start`. ``prompts="varied"``: each image's prompt and caption
    from :func:`prompted_caption` instead."""
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if prompts not in ("fixed", "varied"):
        raise ValueError(f"prompts must be 'fixed' or 'varied', got {prompts!r}")
    images = make_synthetic_examples(n_images, seed=seed, question_types=("color",), start=start)
    pairs = [prompted_caption(seed, start + k) if prompts == "varied" else (CAPTION_PROMPT, caption(seed, start + k))
             for k in range(len(images))]
    return [VQAExample(example_id=f"caption-{seed}-{start + k}", image=e.image, question=q, answer=a,
                       question_type="caption", domain="synthetic", image_id=e.image_id)
            for k, (e, (q, a)) in enumerate(zip(images, pairs))]


def matching_text(seed: int, index: int, draw: int = 0) -> tuple[str, bool]:
    """An image-text matching pair for synthetic image ``index`` of ``seed`` (BLIP-style ITM pre-training): a short
    phrase -- "{colour} shape", "{shape}" or "{colour} {shape}" -- and whether it describes the image (half of the
    draws; a mismatch changes one attribute). ``draw`` picks another pair for the same image. The phrase is no
    question and the label is read by a throwaway head, never by the language model's answer words."""
    from .easyvqa import COLORS, SHAPE_NAMES

    shape, color = synthetic_attributes(seed, index)
    rng = random.Random(f"mor-synthetic-match:{seed}:{index}:{draw}")
    kind = rng.choice(("color", "shape", "both"))
    matched = rng.random() < 0.5
    c, s = color, shape
    if not matched:
        if kind == "color" or (kind == "both" and rng.random() < 0.5):
            c = rng.choice([x for x in COLORS if x != color])
        else:
            s = rng.choice([x for x in SHAPE_NAMES if x != shape])
    text = {"color": f"{c} shape", "shape": s, "both": f"{c} {s}"}[kind]
    return text, matched
