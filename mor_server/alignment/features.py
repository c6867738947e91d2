"""Router input features (pure, deterministic, no model needed).

The router must be cheap, stable while the policy trains, and computable by the server from public inputs
only, so features are fixed functions of the input rather than activations of the (moving) policy. Three parts,
chosen with ``parts``:

- ``type``: the question's answer type, one-hot over the answer schema's types (the sets of answers the format
  rule learned from the server's public split, e.g. the colours, the shapes, yes/no) plus one slot for a question
  of none of them; needs ``schema`` (:class:`mor_server.alignment.answers.AnswerSchema`);
- ``image``: the RGB image average-pooled to a ``grid x grid`` map (colours and coarse layout), plus the
  per-channel mean and standard deviation;
- ``question``: a signed hashed bag of words and word bigrams (``hash_dim`` buckets), L2-normalised.

Which parts the pipeline uses is ``AlignmentConfig.router_features`` (default ``("type",)``: with the ~240 items
the router is fitted on, the image and word features let it overfit and leave weight on clients that know nothing
about a question; docs/alignment.md, "The router's features"). The parts and the schema are in :meth:`config`,
which the router saves, so :meth:`from_config` rebuilds the same extractor for a saved router.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Sequence

import numpy as np

_WORD_RE = re.compile(r"[a-z0-9]+")


def _stable_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")


PARTS = ("type", "image", "question")  # the order of the vector (image before question, as routers saved before the
# parts existed were calibrated on)


class FeatureExtractor:
    """Maps (image, question) to a fixed-length float32 vector. ``dim`` gives its length.

    parts: which of ``type``, ``image``, ``question`` (see the module doc), concatenated in that order.
    schema: the answer schema (an ``AnswerSchema``); required when ``parts`` has ``type``."""

    def __init__(self, grid: int = 4, hash_dim: int = 64, *, parts: Sequence[str] = ("image", "question"),
                 schema=None):
        if grid < 1 or hash_dim < 1:
            raise ValueError("FeatureExtractor: grid and hash_dim must be >= 1")
        parts = tuple(parts)
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts or len(set(parts)) != len(parts):
            raise ValueError(f"FeatureExtractor: parts must be distinct names among {', '.join(PARTS)}, got "
                             f"{list(parts)}")
        if "type" in parts and schema is None:
            raise ValueError("FeatureExtractor: the 'type' part needs the answer schema (schema=AnswerSchema)")
        self.grid = grid
        self.hash_dim = hash_dim
        self.parts = tuple(p for p in PARTS if p in parts)  # a fixed order, whatever order they were given in
        self.schema = schema if "type" in parts else None
        self.types = self.schema.types() if self.schema is not None else []

    @property
    def dim(self) -> int:
        sizes = {"type": len(self.types) + 1, "question": self.hash_dim, "image": self.grid * self.grid * 3 + 6}
        return sum(sizes[p] for p in self.parts)

    def config(self) -> dict:
        out = {"grid": self.grid, "hash_dim": self.hash_dim, "parts": list(self.parts)}
        if self.schema is not None:
            out["schema"] = self.schema.to_dict()
        return out

    @classmethod
    def from_config(cls, config: dict | None) -> "FeatureExtractor":
        """The extractor a router was calibrated with (``router.feature_config``; a router saved before the parts
        existed used image + question)."""
        config = dict(config or {})
        schema = None
        if "schema" in config:
            from .answers import AnswerSchema

            schema = AnswerSchema.from_dict(config["schema"])
        return cls(config.get("grid", 4), config.get("hash_dim", 64),
                   parts=config.get("parts", ("image", "question")), schema=schema)

    def type_features(self, question: str) -> np.ndarray:
        """One-hot of the question's answer type among the schema's types; the last slot: none of them."""
        vec = np.zeros(len(self.types) + 1, dtype=np.float32)
        valid = self.schema.valid_answers(question)
        vec[self.types.index(valid) if valid in self.types else len(self.types)] = 1.0
        return vec

    def image_features(self, image) -> np.ndarray:
        """Average-pooled RGB grid + channel mean/std, in [0, 1]. ``image``: PNG/JPEG bytes or PIL image."""
        from PIL import Image

        img = Image.open(io.BytesIO(image)).convert("RGB") if isinstance(image, (bytes, bytearray)) \
            else image.convert("RGB")
        arr = np.asarray(img, dtype=np.float32) / 255.0
        pooled = np.asarray(img.resize((self.grid, self.grid), Image.BOX), dtype=np.float32) / 255.0
        return np.concatenate([pooled.reshape(-1), arr.mean(axis=(0, 1)), arr.std(axis=(0, 1))])

    def question_features(self, question: str) -> np.ndarray:
        """Signed hashed bag of words + bigrams, L2-normalised."""
        words = _WORD_RE.findall(question.lower())
        vec = np.zeros(self.hash_dim, dtype=np.float32)
        for tok in words + [a + "_" + b for a, b in zip(words, words[1:])]:
            h = _stable_hash(tok)
            vec[h % self.hash_dim] += 1.0 if (h >> 32) & 1 else -1.0
        n = np.linalg.norm(vec)
        return vec / n if n > 0 else vec

    def __call__(self, image, question: str) -> np.ndarray:
        out = []
        for p in self.parts:
            out.append(self.type_features(question) if p == "type" else
                       self.question_features(question) if p == "question" else self.image_features(image))
        return np.concatenate(out).astype(np.float32)

    def batch(self, images: Sequence, questions: Sequence[str]) -> np.ndarray:
        """Features of a batch, shape (n, dim)."""
        if len(images) != len(questions):
            raise ValueError(f"FeatureExtractor.batch: {len(images)} images but {len(questions)} questions")
        if not len(images):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self(im, q) for im, q in zip(images, questions)])
