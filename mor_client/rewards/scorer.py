"""``RewardModelScorer``: a trained reward-model folder as a :class:`mor.types.Scorer`."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from mor.types import ScoringItem

from .features import encode_batch
from .store import from_pretrained, save_pretrained


class RewardModelScorer:
    """Scores (image, question, candidates) items with a trained reward model (batched, no_grad,
    deterministic). ``result[i][j]`` is the reward of ``items[i].candidates[j]``."""

    def __init__(self, model: torch.nn.Module, vocab, card: dict, *, device: str = "cpu", batch_size: int = 256):
        self.model = model.to(device).eval()
        self.vocab = vocab
        self.card = dict(card)
        self.device = device
        self.batch_size = batch_size
        self.image_size = int(self.card.get("model_config", {}).get("image_size", 32))

    @classmethod
    def from_pretrained(cls, path, *, device: str = "cpu", batch_size: int = 256) -> "RewardModelScorer":
        """Load a local folder written by ``mor client train`` (or :func:`~mor_client.rewards.store.save_pretrained`);
        the weights' digest is checked and nothing is downloaded."""
        model, vocab, card = from_pretrained(path, device=device)
        return cls(model, vocab, card, device=device, batch_size=batch_size)

    #: the first name of :meth:`from_pretrained`
    from_dir = from_pretrained

    def save_pretrained(self, path) -> dict:
        """Write this scorer's model, vocabulary and card as a model folder; returns the card written."""
        return save_pretrained(path, self.model, self.vocab, self.card)

    @torch.no_grad()
    def score(self, items: Sequence[ScoringItem]) -> list[list[float]]:
        out: list[list[float] | None] = [None] * len(items)
        by_k: dict[int, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            if not it.candidates:
                raise ValueError(f"item {it.item_id!r} has no candidates; give at least one answer to score")
            by_k[len(it.candidates)].append(i)
        for idx in by_k.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = [items[i] for i in idx[s:s + self.batch_size]]
                b = encode_batch(self.vocab, [c.image for c in chunk], [c.question for c in chunk],
                                 [c.candidates for c in chunk], self.image_size)
                scores = self.model(*(b[k].to(self.device) for k in
                                      ("image", "question", "question_mask", "answers", "answers_mask")))
                for j, i in enumerate(idx[s:s + self.batch_size]):
                    out[i] = [float(x) for x in scores[j].cpu()]
        return out  # type: ignore[return-value]
