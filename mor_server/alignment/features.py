"""Router input features: pooled image features + a question embedding (pure, deterministic, no model needed).

The router must be cheap, stable while the policy trains, and computable by the server from public inputs
only, so features are fixed functions of the input rather than activations of the (moving) policy:

- image: the RGB image average-pooled to a ``grid x grid`` map (colours and coarse layout), plus the
  per-channel mean and standard deviation;
- question: a signed hashed bag of words and word bigrams (``hash_dim`` buckets), L2-normalised.
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


class FeatureExtractor:
    """Maps (image, question) to a fixed-length float32 vector. ``dim`` gives its length."""

    def __init__(self, grid: int = 4, hash_dim: int = 64):
        if grid < 1 or hash_dim < 1:
            raise ValueError("FeatureExtractor: grid and hash_dim must be >= 1")
        self.grid = grid
        self.hash_dim = hash_dim

    @property
    def dim(self) -> int:
        return self.grid * self.grid * 3 + 6 + self.hash_dim

    def config(self) -> dict:
        return {"grid": self.grid, "hash_dim": self.hash_dim}

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
        return np.concatenate([self.image_features(image), self.question_features(question)]).astype(np.float32)

    def batch(self, images: Sequence, questions: Sequence[str]) -> np.ndarray:
        """Features of a batch, shape (n, dim)."""
        if len(images) != len(questions):
            raise ValueError(f"FeatureExtractor.batch: {len(images)} images but {len(questions)} questions")
        if not len(images):
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self(im, q) for im, q in zip(images, questions)])
