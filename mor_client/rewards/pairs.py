"""One row = one preference pair: the Bradley-Terry objective every training phase shares.

:class:`PairModel` scores a pair's two answers in the same row (``r(chosen) - r(rejected)``), so one pair is one
row of a (Poisson-sampled) data set and, under DP-SGD, one clipped contribution; :func:`bradley_terry_step` is the
one optimisation step on such rows (public pre-training, synthetic pre-training and the private phase).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .features import Vocab, encode_pairs


class PairModel(nn.Module):
    """Wraps a reward model so that one row = one pair: output = r(chosen) - r(rejected), shape [B]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, question, question_mask, answers, answers_mask):
        s = self.model(image, question, question_mask, answers, answers_mask)
        return s[:, 0] - s[:, 1]


def pair_tensors(vocab: Vocab, pairs, image_size: int) -> TensorDataset:
    """The encoded pairs as a TensorDataset in :class:`PairModel`'s argument order."""
    b = encode_pairs(vocab, pairs, image_size)
    return TensorDataset(b["image"], b["question"], b["question_mask"], b["answers"], b["answers_mask"])


def bradley_terry_step(pair_model: nn.Module, batch, loss_fn, opt, device, *, before_step=None) -> tuple[float, int]:
    """One Bradley-Terry step on a batch of pair rows: loss -log sigmoid(r(chosen) - r(rejected)) (``loss_fn`` is
    ``BCEWithLogitsLoss`` against 1, or Opacus' wrapping of it under ghost clipping), backward, ``before_step()`` if
    given (e.g. summing per-annotator gradients), optimizer step. Returns (summed loss over the rows, rows)."""
    batch = [t.to(device) for t in batch]
    out = pair_model(*batch)
    loss = loss_fn(out, torch.ones_like(out))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if before_step is not None:
        before_step()
    opt.step()
    return float(loss.item()) * out.shape[0], out.shape[0]
