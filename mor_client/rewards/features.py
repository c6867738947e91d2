"""Turning (image bytes, question, answers) into tensors: a word-level vocabulary and image decoding.

Pure functions over bytes/strings; no model code. The vocabulary is saved next to each trained model, so a
model folder scores on its own.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch

PAD, UNK, SEP = "<pad>", "<unk>", "<sep>"
IMAGE_SIZE = 32
MAX_QUESTION_TOKENS = 16
MAX_ANSWER_TOKENS = 4
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped)."""
    return _WORD.findall(text.lower())


class Vocab:
    """A fixed word-level vocabulary; unknown words map to ``<unk>``."""

    def __init__(self, tokens: Sequence[str]):
        if list(tokens[:3]) != [PAD, UNK, SEP]:
            raise ValueError("a vocabulary must start with <pad>, <unk>, <sep>")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, max_len: int) -> tuple[list[int], list[int]]:
        ids = [self.index.get(w, 1) for w in words(text)][:max_len] or [1]
        return ids + [0] * (max_len - len(ids)), [1] * len(ids) + [0] * (max_len - len(ids))

    @classmethod
    def build(cls, texts: Iterable[str]) -> "Vocab":
        return cls([PAD, UNK, SEP] + sorted({w for t in texts for w in words(t)}))


@lru_cache(maxsize=1)
def default_vocab() -> Vocab:
    """Every word of easy-vqa's public questions and answers plus the procedural family's words."""
    from mor_client.data.easyvqa import ANSWERS, COUNT_WORDS, RELATIONS, load_easyvqa

    texts = [e.question for s in ("train", "test") for e in load_easyvqa(s)]
    texts += list(ANSWERS) + list(COUNT_WORDS) + list(RELATIONS)
    texts += ["how many circles squares triangles are there in the image is left or right of",
              "red green blue black yellow gray"]
    return Vocab.build(texts)


_IMG_CACHE: dict[bytes, np.ndarray] = {}


def decode_image(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """PNG/JPEG bytes -> float32 array [3, size, size] in [-0.5, 0.5] (cached per distinct image)."""
    key = data
    arr = _IMG_CACHE.get(key)
    if arr is None or arr.shape[-1] != size:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"image bytes could not be decoded as PNG/JPEG: {e}") from None
        if img.size != (size, size):
            img = img.resize((size, size), Image.BOX)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - 0.5).transpose(2, 0, 1).copy()
        if len(_IMG_CACHE) < 50_000:
            _IMG_CACHE[key] = arr
    return arr


def encode_batch(vocab: Vocab, images: Sequence[bytes], questions: Sequence[str],
                 answers: Sequence[Sequence[str]], image_size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """Tensors for a batch where every item has the same number K of answers.

    Returns image [B,3,S,S] float, question [B,Lq] long, question_mask [B,Lq], answers [B,K,La] long,
    answers_mask [B,K,La].
    """
    if not (len(images) == len(questions) == len(answers)):
        raise ValueError("images, questions and answers must have the same length")
    k = {len(a) for a in answers}
    if len(k) > 1:
        raise ValueError("encode_batch needs the same number of answers per item; group items by K first")
    img = torch.from_numpy(np.stack([decode_image(b, image_size) for b in images])) if images else \
        torch.zeros(0, 3, image_size, image_size)
    q = [vocab.encode(t, MAX_QUESTION_TOKENS) for t in questions]
    a = [[vocab.encode(x, MAX_ANSWER_TOKENS) for x in row] for row in answers]
    kk = k.pop() if k else 1
    return {
        "image": img,
        "question": torch.tensor([x[0] for x in q], dtype=torch.long).reshape(-1, MAX_QUESTION_TOKENS),
        "question_mask": torch.tensor([x[1] for x in q], dtype=torch.float32).reshape(-1, MAX_QUESTION_TOKENS),
        "answers": torch.tensor([[y[0] for y in row] for row in a], dtype=torch.long).reshape(-1, kk, MAX_ANSWER_TOKENS),
        "answers_mask": torch.tensor([[y[1] for y in row] for row in a], dtype=torch.float32).reshape(-1, kk, MAX_ANSWER_TOKENS),
    }


def encode_pairs(vocab: Vocab, pairs, image_size: int = IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """One row per preference pair: answers[:, 0] is the chosen answer, answers[:, 1] the rejected one."""
    return encode_batch(vocab, [p.example.image for p in pairs], [p.example.question for p in pairs],
                        [(p.chosen, p.rejected) for p in pairs], image_size)
