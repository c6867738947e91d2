"""Bradley-Terry reward-model training under Opacus DP-SGD (or non-privately, epsilon = inf): the private phase.

Privacy unit: one preference pair (default). The chosen and the rejected answer of a pair are scored in the
*same* Opacus row (the model encodes image and question once and scores both answers, output ``[B, 2]``), so one
pair is one row of the Poisson-sampled data set and its clipped contribution is bounded by ``max_grad_norm``:
the accountant's (noise_multiplier, sample_rate = expected_batch / n_pairs, steps) describe exactly the
pair-level guarantee.

Privacy unit ``annotator`` (``TrainConfig.unit``): every pair an annotator labelled is protected together. The
Poisson sampling draws annotators (sample_rate = expected annotators per batch / n_annotators); each drawn
annotator brings all of their pairs; Opacus' per-row gradients are summed per annotator
(:func:`group_grad_samples`) before Opacus clips them, so the clipping, the noise and the accountant's
(noise_multiplier, sample_rate, steps) all refer to one annotator, however many pairs they labelled.

An empty Poisson batch is still a DP-SGD step (noise only), so the accountant's step count is the planned one.
Public pre-training (the server's public split, any public data) costs no privacy (:mod:`.pretrain`); the
settings are :class:`~.config.TrainConfig`, the Bradley-Terry step is :mod:`.pairs`'.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import TrainConfig, progress_bar
from .features import Vocab, default_vocab, encode_pairs
from .models import build_model, make_dp_compatible
from .pairs import PairModel, bradley_terry_step, pair_tensors
from .pretrain import public_pretrain


@dataclass
class TrainResult:
    model: nn.Module
    vocab: Vocab
    card: dict
    history: list[dict]


class UnitDataset(torch.utils.data.Dataset):
    """One item per privacy unit (e.g. an annotator): the rows of ``data`` that belong to it."""

    def __init__(self, data: TensorDataset, groups: Sequence[Sequence[int]]):
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("UnitDataset: every unit needs at least one row")
        self.tensors = data.tensors
        self.groups = [torch.as_tensor(list(g), dtype=torch.long) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):
        return tuple(t[self.groups[i]] for t in self.tensors)


def collate_units(items):
    """Concatenate the drawn units' rows; the last tensor says which unit (0..len(items)-1) each row is from."""
    fields = [torch.cat(f) for f in zip(*items)]
    unit = torch.cat([torch.full((len(it[0]),), k, dtype=torch.long) for k, it in enumerate(items)])
    return (*fields, unit)


def units_of(pairs: Sequence, unit: str) -> list[list[int]]:
    """Row indices of each privacy unit: one row per pair, or all pairs of one annotator (sorted by name)."""
    if unit == "pair":
        return [[i] for i in range(len(pairs))]
    by: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by.setdefault(str(p.annotator), []).append(i)
    return [by[k] for k in sorted(by)]


def group_grad_samples(params, unit_of_row: torch.Tensor, n_units: int) -> None:
    """Sum Opacus' per-row gradients (``p.grad_sample``, ``[rows, ...]``) into per-unit gradients
    (``[n_units, ...]``) in place, so that Opacus' optimizer clips and noises one unit's whole contribution."""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, list):
            gs = torch.cat(gs)
        out = gs.new_zeros((n_units, *gs.shape[1:]))
        out.index_add_(0, unit_of_row.to(gs.device), gs)
        p.grad_sample = out


@torch.no_grad()
def pairwise_accuracy(model: nn.Module, vocab: Vocab, pairs: Sequence, *, device: str = "cpu",
                      batch_size: int = 1024, image_size: int = 32) -> float:
    """Fraction of pairs where the model scores ``chosen`` above ``rejected`` (ties count half)."""
    if not pairs:
        raise ValueError("pairwise_accuracy needs at least one pair")
    model.eval()
    hits = 0.0
    for i in range(0, len(pairs), batch_size):
        b = encode_pairs(vocab, pairs[i:i + batch_size], image_size)
        s = model(*(b[k].to(device) for k in ("image", "question", "question_mask", "answers", "answers_mask")))
        d = s[:, 0] - s[:, 1]
        hits += float((d > 0).sum()) + 0.5 * float((d == 0).sum())
    return hits / len(pairs)


def _noise_only_step(opt, params, grad_sample_mode: str) -> None:
    """A DP-SGD step on an empty Poisson batch: zero clipped gradients plus the mechanism's noise."""
    opt.zero_grad(set_to_none=True)
    for p in params:
        if grad_sample_mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    opt.step()


def default_delta(n: int) -> float:
    """delta below 1/n: min(1e-5, 1 / (10 n))."""
    return min(1e-5, 1.0 / (10 * max(n, 1)))


def train_reward_model(train_pairs: Sequence, heldout_pairs: Sequence, config: TrainConfig, *,
                       public_pairs: Sequence = (), domain: str = "", vocab: Vocab | None = None,
                       model: nn.Module | None = None) -> TrainResult:
    """Train a reward model on private preference pairs (DP-SGD when ``config.epsilon`` is finite).

    ``public_pairs``: pairs built from public data (e.g. the server's public split), used for non-private
    pre-training when ``config.pretrain_epochs`` > 0. ``model``: your own module (same forward signature as
    :class:`~mor_client.rewards.models.RewardModule`); otherwise ``config.arch`` is built. Returns the model,
    the vocabulary and the model card (see :mod:`mor_client.rewards.store`).
    """
    cfg = config
    cfg.validate()
    if cfg.max_pairs is not None:
        train_pairs = train_pairs[:cfg.max_pairs]  # a data-independent prefix: the accounting uses n = the cap
    if len(train_pairs) < 2:
        raise ValueError(f"need at least 2 training pairs, got {len(train_pairs)}")
    if not heldout_pairs:
        raise ValueError("heldout_pairs is empty: a held-out split is needed for the card's accuracy")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available; use --device cpu")
    device = torch.device(cfg.device)
    vocab = vocab or default_vocab()
    torch.manual_seed(cfg.seed)
    if model is None:
        model = build_model(cfg.arch, len(vocab), **cfg.model_config)
    if callable(getattr(model, "bind_vocab", None)):  # e.g. a pretrained backbone's own tokenisation
        model.bind_vocab(vocab)
    arch = getattr(model, "arch", cfg.arch)
    image_size = int(getattr(model, "config", {}).get("image_size", 32))
    model = make_dp_compatible(model, fix=True)
    model.to(device)
    history: list[dict] = []
    t0 = time.perf_counter()

    pre = public_pretrain(model, cfg, public_pairs=public_pairs, train_pairs=train_pairs, vocab=vocab)
    history += pre["history"]
    synthetic_pairs, synthetic_types = pre["synthetic_pairs"], pre["synthetic_types"]
    if synthetic_pairs or pre["public_pairs"]:
        history.append({"phase": "public-only", "heldout_pairwise_accuracy": pairwise_accuracy(
            model, vocab, heldout_pairs, device=str(device), image_size=image_size)})
        model.train()
    t_private = time.perf_counter()

    # private phase: only model.private_parameters() train
    private = getattr(model, "private_parameters", model.parameters)()
    ids = {id(p) for p in private}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    params = [p for p in model.parameters() if p.requires_grad]
    data = pair_tensors(vocab, train_pairs, image_size)
    grouped = cfg.private and cfg.unit != "pair"
    units = units_of(train_pairs, cfg.unit)
    n = len(units)  # privacy units: pairs, or annotators
    batch = min(cfg.batch_size, n)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    if grouped:
        loader = DataLoader(UnitDataset(data, units), batch_size=batch, shuffle=True, generator=g,
                            collate_fn=collate_units)
    else:
        loader = DataLoader(data, batch_size=batch, shuffle=True, generator=g)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    wrapped: nn.Module = PairModel(model)
    delta = cfg.delta if cfg.delta is not None else default_delta(n)
    engine = None
    if cfg.private:
        from opacus import PrivacyEngine

        # Opacus warns here that its secure RNG is off (noise from torch's PRNG, not a CSPRNG): a privacy product
        # shows that warning, and the card records it (secure_rng)
        engine = PrivacyEngine(accountant=cfg.accountant)
        with warnings.catch_warnings():  # only make_private's own chatter (accountant orders, hook notes)
            warnings.simplefilter("ignore")
            made = engine.make_private_with_epsilon(
                module=wrapped, optimizer=opt, criterion=loss_fn, data_loader=loader, target_epsilon=cfg.epsilon,
                target_delta=delta, epochs=cfg.epochs, max_grad_norm=cfg.max_grad_norm, poisson_sampling=True,
                grad_sample_mode=cfg.grad_sample_mode)
        if cfg.grad_sample_mode == "ghost":
            wrapped, opt, loss_fn, loader = made
        else:
            wrapped, opt, loader = made
    steps = 0
    model.train()
    with warnings.catch_warnings():  # scoped, not process-wide: torch's note on Opacus' full backward hooks
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in progress_bar(range(cfg.epochs), cfg, f"{'DP-SGD' if cfg.private else 'training'} {arch}"):
            total, count = 0.0, 0
            for b in loader:
                unit_of_row = None
                if grouped:
                    *b, unit_of_row = b
                if b[0].shape[0] == 0:  # an empty Poisson batch
                    if engine is not None:  # still a DP-SGD step: a noise-only update, counted by the accountant
                        _noise_only_step(opt, params, cfg.grad_sample_mode)
                        steps += 1
                    continue
                # one clipped contribution per annotator, not per pair: per-row gradients summed per unit
                regroup = None if unit_of_row is None else (
                    lambda u=unit_of_row: group_grad_samples(params, u, int(u.max()) + 1))
                loss_sum, rows = bradley_terry_step(wrapped, b, loss_fn, opt, device, before_step=regroup)
                steps += 1
                total += loss_sum
                count += rows
            history.append({"phase": "private" if cfg.private else "train", "epoch": epoch + 1,
                            "loss": total / max(count, 1)})
    train_seconds = time.perf_counter() - t_private
    model.eval()
    if engine is not None:
        # remove Opacus' hooks and per-sample attributes so the plain module scores normally (public API)
        wrapped.cleanup()
        acct_steps = sum(s for _, _, s in engine.accountant.history)
        noise, sample_rate = engine.accountant.history[-1][0], engine.accountant.history[-1][1]
        epsilon = float(engine.get_epsilon(delta))
    else:
        acct_steps, noise, sample_rate, epsilon = steps, 0.0, batch / n, float("inf")
    acc = pairwise_accuracy(model, vocab, heldout_pairs, device=str(device), image_size=image_size)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    card = {
        "architecture": arch,
        "model_config": dict(getattr(model, "config", cfg.model_config)),
        "parameter_count": int(n_params),
        "trainable_parameter_count": int(n_train),
        "data_size": len(train_pairs),
        "privacy_units": int(n),
        "heldout_size": len(heldout_pairs),
        "public_pretrain_pairs": len(public_pairs) if cfg.pretrain_epochs else 0,
        "synthetic_pretrain_pairs": synthetic_pairs,
        "synthetic_pretrain_types": list(synthetic_types),
        "dp": engine is not None,
        "secure_rng": bool(engine.secure_mode) if engine is not None else None,
        "epsilon": epsilon if engine is not None else None,
        "target_epsilon": cfg.epsilon if engine is not None else None,
        "delta": delta if engine is not None else None,
        "noise_multiplier": float(noise),
        "sample_rate": float(sample_rate),
        "steps": int(acct_steps),
        "epochs": cfg.epochs,
        "batch_size": batch,
        "max_grad_norm": cfg.max_grad_norm if engine is not None else None,
        "accountant": cfg.accountant if engine is not None else None,
        "grad_sample_mode": cfg.grad_sample_mode if engine is not None else None,
        "privacy_unit": cfg.unit,
        "heldout_pairwise_accuracy": acc,
        "domain": domain,
        "train_seconds": round(train_seconds, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "seed": cfg.seed,
        "device": str(device),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return TrainResult(model=model, vocab=vocab, card=card, history=history)

