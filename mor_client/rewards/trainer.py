"""Bradley-Terry reward-model training under Opacus DP-SGD (or non-privately, epsilon = inf).

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
Public pre-training (the server's public split, any public data) costs no privacy.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .features import Vocab, default_vocab, encode_pairs
from .models import build_model, make_dp_compatible

ACCOUNTANTS = ("prv", "rdp")
UNITS = ("pair", "annotator")
GRAD_SAMPLE_MODES = ("ghost", "hooks")


@dataclass
class TrainConfig:
    """Everything a training run needs besides data. Every field documents itself."""

    arch: str = "cnn"                   # architecture name (see mor_client.rewards.ARCHITECTURES)
    model_config: dict = field(default_factory=dict)  # keyword arguments of the architecture
    epsilon: float | None = 8.0         # target epsilon; None or inf trains without DP
    delta: float | None = None          # target delta; default min(1e-5, 1 / (10 n_pairs)), below 1/n
    epochs: int = 20                    # passes over the private pairs
    batch_size: int = 512               # expected (Poisson) batch size in privacy units (pairs, or annotators
                                        # with unit="annotator"); sample_rate = batch_size / n_units
    lr: float = 3e-3                    # Adam learning rate for the private phase
    max_grad_norm: float = 1.0          # per-pair clipping norm C
    accountant: str = "prv"             # "prv" or "rdp"
    grad_sample_mode: str = "ghost"     # "ghost" (ghost clipping, Linear/Embedding) or "hooks"
    unit: str = "pair"                  # privacy unit: "pair" (one preference pair) or "annotator" (all of
                                        # one annotator's pairs; needs grad_sample_mode="hooks")
    max_pairs: int | None = None        # use at most this many private pairs (the first ones); None: all
    pretrain_epochs: int = 0            # non-private epochs on public pairs before the private phase
    pretrain_lr: float = 3e-3           # learning rate of public pre-training
    # synthetic public pre-training (mor_client.data.synthetic: drawn from a seed, no privacy cost), before the
    # public pairs: visual pre-training on the images' colour/shape labels, then Bradley-Terry on synthetic pairs
    synthetic_images: int = 0           # synthetic images to draw (0: no synthetic pre-training)
    synthetic_questions: int = 1        # questions (= pairs) per synthetic image, of the domain's question types
    synthetic_types: tuple | None = None  # question types; None: those of public_pairs (else of the private pairs)
    visual_epochs: int = 0              # epochs of colour/shape classification with the model's image_features
    synthetic_epochs: int = 0           # Bradley-Terry epochs on the synthetic pairs (cosine-decayed lr)
    synthetic_lr: float = 2e-3          # Adam learning rate of both synthetic phases
    synthetic_batch: int = 128          # batch size of both synthetic phases
    seed: int = 0                       # seeds model init, sampling and DP noise
    device: str = "cpu"                 # "cpu" or "cuda" (or "cuda:N")
    progress: bool = True               # tqdm progress bars

    @property
    def private(self) -> bool:
        return self.epsilon is not None and math.isfinite(self.epsilon)

    def validate(self) -> None:
        if self.epsilon is not None and not (self.epsilon > 0):
            raise ValueError(f"epsilon must be > 0 (or inf for non-private), got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise ValueError(f"max_pairs must be >= 2 (or None for all), got {self.max_pairs}")
        for name in ("pretrain_epochs", "synthetic_images", "visual_epochs", "synthetic_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("synthetic_questions", "synthetic_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.synthetic_types is not None:
            from mor_client.data.synthetic import SYNTHETIC_TYPES

            bad = [t for t in self.synthetic_types if t not in SYNTHETIC_TYPES]
            if bad or not self.synthetic_types:
                raise ValueError(f"synthetic_types must be a non-empty subset of {SYNTHETIC_TYPES}, got "
                                 f"{self.synthetic_types}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.unit == "annotator" and self.private and self.grad_sample_mode != "hooks":
            raise ValueError("unit='annotator' needs grad_sample_mode='hooks' (per-annotator clipping sums Opacus' "
                             "per-pair gradients; ghost clipping never materialises them): set "
                             "grad_sample_mode='hooks' (CLI: --grad-sample-mode hooks)")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")


#: "demo" presets: sizes, epochs and batch that reach the quality bar quickly on 2 CPU cores.
DEMO_PRESETS: dict[str, dict] = {
    # ghost clipping only helps layers with a norm sampler (Linear, Embedding); for conv / LayerNorm-heavy
    # models the hooks mode was faster on CPU (measured: docs/reward-models.md).
    "cnn": dict(model_config=dict(dim=64, channels=32), epochs=5, batch_size=512, lr=5e-3, max_grad_norm=1.0,
                pretrain_epochs=30, grad_sample_mode="hooks"),
    # vit: 4x4 patches (64 tokens) + ink channel + small position init; 8x8 patches stayed near 0.6 on shapes.
    # Pre-trained on synthetic public shape questions (no privacy cost); the private phase then fine-tunes
    # everything at a small learning rate (5e-3 undid much of the pre-training without DP).
    "vit": dict(model_config=dict(dim=32, depth=1, text_depth=1, heads=2, patch=4, ink=True), epochs=5,
                batch_size=512, lr=1e-3, max_grad_norm=1.0, pretrain_epochs=0, grad_sample_mode="hooks",
                synthetic_images=4000, synthetic_questions=2, visual_epochs=3, synthetic_epochs=2,
                synthetic_lr=2e-3, synthetic_batch=64),
    # lora: late fusion (conv stem + BERT-style question backbone with LoRA adapters). Pre-trained on synthetic
    # public yes/no questions: visual pre-training (colour, shape, "is the named thing there") then
    # Bradley-Terry; under DP only the LoRA adapters, fusion and head train (backbone and stem frozen).
    # yes/no: 25,577 pairs is slow under per-pair clipping, so the preset uses the first 6,000.
    "lora": dict(model_config=dict(dim=64, layers=2, heads=4, lora_r=8, ink=True, fusion="late"), epochs=5,
                 batch_size=512, lr=5e-3, max_grad_norm=1.0, pretrain_epochs=0, grad_sample_mode="hooks",
                 max_pairs=6000, synthetic_images=6000, synthetic_questions=3, visual_epochs=5,
                 synthetic_epochs=2, synthetic_lr=2e-3, synthetic_batch=64),
}


def demo_config(arch: str, **overrides) -> TrainConfig:
    """The demo preset of ``arch`` with ``overrides`` applied."""
    if arch not in DEMO_PRESETS:
        raise ValueError(f"no demo preset for arch {arch!r}; presets: {sorted(DEMO_PRESETS)}")
    kw = dict(DEMO_PRESETS[arch])
    kw["model_config"] = dict(kw["model_config"])
    kw.update(overrides)
    return TrainConfig(arch=arch, **kw)


class PairModel(nn.Module):
    """Wraps a reward model so that one row = one pair: output = r(chosen) - r(rejected), shape [B]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, question, question_mask, answers, answers_mask):
        s = self.model(image, question, question_mask, answers, answers_mask)
        return s[:, 0] - s[:, 1]


@dataclass
class TrainResult:
    model: nn.Module
    vocab: Vocab
    card: dict
    history: list[dict]


def _tensors(vocab: Vocab, pairs, image_size: int) -> TensorDataset:
    b = encode_pairs(vocab, pairs, image_size)
    return TensorDataset(b["image"], b["question"], b["question_mask"], b["answers"], b["answers_mask"])


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


def _bar(iterable, cfg: TrainConfig, desc: str, total=None):
    if not cfg.progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _pretrain(model, data: TensorDataset, cfg: TrainConfig, device) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.pretrain_lr)
    wrapped = PairModel(model)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    loader = DataLoader(data, batch_size=min(64, len(data)), shuffle=True, generator=g)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in _bar(range(cfg.pretrain_epochs), cfg, "public pre-training"):
        for batch in loader:
            batch = [t.to(device) for t in batch]
            out = wrapped(*batch)
            loss = loss_fn(out, torch.ones_like(out))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _synthetic_types(cfg: TrainConfig, public_pairs: Sequence, train_pairs: Sequence) -> tuple[str, ...]:
    """The question types synthetic pre-training draws: ``cfg.synthetic_types``, else the colour / shape /
    yes-no types of the public pairs (the client's declared domain), else those of the private pairs."""
    from mor_client.data.synthetic import SYNTHETIC_TYPES

    if cfg.synthetic_types is not None:
        return tuple(cfg.synthetic_types)
    for pairs in (public_pairs, train_pairs):
        present = {p.example.question_type for p in pairs}
        types = tuple(t for t in SYNTHETIC_TYPES if t in present)
        if types:
            return types
    return ()


def _synthetic_pretrain(model, cfg: TrainConfig, types: tuple[str, ...], vocab: Vocab, device,
                        image_size: int, history: list) -> int:
    """Non-private pre-training on synthetic public data (no privacy cost); returns the number of pairs.

    1. ``visual_epochs``: classify each synthetic image's colour (8) and shape (3) from
       ``model.image_features``. When the model also has ``question_features`` and a ``fusion`` with
       ``q_to_img`` (all built-ins), the logit of attribute word w is <image_features, q_to_img(question
       feature of the one-word question "w")>, i.e. the fusion's own multiplicative image-question term, so
       the word embeddings of colours and shapes learn to agree with the image features; otherwise a
       throw-away linear head is used. For a yes/no domain (aligned models only), also a grounding loss: the
       fusion's match score of a balanced question "is there a red shape?" / "is there a circle?" (true half
       of the time; :func:`mor_client.data.synthetic.presence_question`) must tell whether it is there.
    2. ``synthetic_epochs``: Bradley-Terry on synthetic pairs of the domain's question types (cosine lr).
    """
    from mor_client.data import make_pairs
    from mor_client.data.easyvqa import COLORS, SHAPE_NAMES
    from mor_client.data.synthetic import make_synthetic_examples, presence_question, synthetic_attributes

    from . import features

    t0 = time.perf_counter()
    q = cfg.synthetic_questions
    examples = make_synthetic_examples(cfg.synthetic_images, seed=cfg.seed, question_types=types,
                                       questions_per_image=q)
    pairs = make_pairs(examples, seed=cfg.seed)  # one pair per example, in order
    data = _tensors(vocab, pairs, image_size)
    for b in {e.image for e in examples}:  # keep the in-process image cache for real data
        features._IMG_CACHE.pop(b, None)
    history.append({"phase": "synthetic-data", "images": cfg.synthetic_images, "pairs": len(pairs),
                    "types": list(types), "seconds": round(time.perf_counter() - t0, 3)})
    g = torch.Generator().manual_seed(cfg.seed + 3)
    model.train()
    feats = getattr(model, "image_features", None)
    probe = feats(data.tensors[0][:2].to(device)) if callable(feats) else None
    if cfg.visual_epochs and probe is not None:
        t0 = time.perf_counter()
        rows = slice(0, None, q)  # one row per image: its first question
        images, questions, qmask = data.tensors[0][rows], data.tensors[1][rows], data.tensors[2][rows]
        attrs = [synthetic_attributes(cfg.seed, i) for i in range(len(images))]
        colour = torch.tensor([COLORS.index(c) for _, c in attrs])
        shape = torch.tensor([SHAPE_NAMES.index(s) for s, _ in attrs])
        if "yesno" in types:  # balanced grounding questions ("is there a red shape?", true half of the time)
            asked_q = [presence_question(cfg.seed, i) for i in range(len(images))]
            enc = [vocab.encode(t, questions.shape[1]) for t, _ in asked_q]
            questions = torch.tensor([ids for ids, _ in enc], dtype=torch.long)
            qmask = torch.tensor([m for _, m in enc], dtype=torch.float32)
            presence = torch.tensor([float(x) for _, x in asked_q])
        else:
            presence = torch.full((len(images),), -1.0)
        fusion = getattr(model, "fusion", None)
        aligned = (callable(getattr(model, "question_features", None)) and hasattr(fusion, "q_to_img")
                   and callable(getattr(fusion, "match_score", None)))
        if aligned:
            words = torch.tensor([[vocab.index.get(w, 1)] for w in COLORS + SHAPE_NAMES], device=device)
            words_mask = torch.ones(words.shape, device=device)
            # presence logit = match + b, with no learnt scale: the match feature itself must become large
            head = nn.Linear(1, 1, bias=True).to(device)
            nn.init.ones_(head.weight)
            head.weight.requires_grad_(False)
        else:
            head = nn.Linear(probe.shape[1], len(COLORS) + len(SHAPE_NAMES)).to(device)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad]
                               + [p for p in head.parameters() if p.requires_grad], lr=cfg.synthetic_lr)
        loader = DataLoader(TensorDataset(images, questions, qmask, colour, shape, presence),
                            batch_size=cfg.synthetic_batch, shuffle=True, generator=g)
        for _ in _bar(range(cfg.visual_epochs), cfg, "synthetic visual pre-training"):
            hits = total = p_hits = p_total = 0
            for x, qq, qm, yc, ys, yp in loader:
                x, qq, qm, yc, ys, yp = (t.to(device) for t in (x, qq, qm, yc, ys, yp))
                f = model.image_features(x)
                if aligned:
                    logits = f @ model.fusion.q_to_img(model.question_features(words, words_mask)).T
                else:
                    logits = head(f)
                loss = (nn.functional.cross_entropy(logits[:, :len(COLORS)], yc)
                        + nn.functional.cross_entropy(logits[:, len(COLORS):], ys))
                asked = yp >= 0
                if aligned and bool(asked.any()):  # grounding: does the image hold what the question names?
                    m = head(model.fusion.match_score(f, model.question_features(qq, qm))).squeeze(-1)
                    loss = loss + nn.functional.binary_cross_entropy_with_logits(m[asked], yp[asked])
                    p_hits += int(((m[asked] > 0).float() == yp[asked]).sum())
                    p_total += int(asked.sum())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                hits += int((logits[:, :len(COLORS)].argmax(1) == yc).sum())
                hits += int((logits[:, len(COLORS):].argmax(1) == ys).sum())
                total += 2 * len(x)
        history.append({"phase": "synthetic-visual", "images": len(images), "epochs": cfg.visual_epochs,
                        "aligned": aligned, "last_epoch_attribute_accuracy": hits / max(total, 1),
                        "last_epoch_presence_accuracy": p_hits / p_total if p_total else None,
                        "seconds": round(time.perf_counter() - t0, 3)})
    if cfg.synthetic_epochs:
        t0 = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.synthetic_lr)
        loader = DataLoader(data, batch_size=cfg.synthetic_batch, shuffle=True, generator=g)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.synthetic_epochs * len(loader)))
        wrapped = PairModel(model)
        loss_fn = nn.BCEWithLogitsLoss()
        for _ in _bar(range(cfg.synthetic_epochs), cfg, "synthetic pre-training"):
            total, count = 0.0, 0
            for batch in loader:
                batch = [t.to(device) for t in batch]
                out = wrapped(*batch)
                loss = loss_fn(out, torch.ones_like(out))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.item()) * out.shape[0]
                count += out.shape[0]
        history.append({"phase": "synthetic", "pairs": len(pairs), "epochs": cfg.synthetic_epochs,
                        "last_epoch_loss": total / max(count, 1), "seconds": round(time.perf_counter() - t0, 3)})
    return len(pairs)


def public_pretrain(model: nn.Module, cfg: TrainConfig, *, public_pairs: Sequence = (), train_pairs: Sequence = (),
                    vocab: Vocab | None = None) -> dict:
    """All non-private pre-training of ``train_reward_model`` (no privacy cost), in place on ``model``:
    synthetic public data (``cfg.synthetic_*``, ``cfg.visual_epochs``), then ``cfg.pretrain_epochs`` on
    ``public_pairs``. ``train_pairs`` is only consulted for the domain's question types when neither
    ``cfg.synthetic_types`` nor ``public_pairs`` name one. Returns what it did (pairs, types, history)."""
    vocab = vocab or default_vocab()
    device = torch.device(cfg.device)
    image_size = int(getattr(model, "config", {}).get("image_size", 32))
    history: list[dict] = []
    synthetic_pairs, synthetic_types = 0, ()
    if cfg.synthetic_images and (cfg.visual_epochs or cfg.synthetic_epochs):
        synthetic_types = _synthetic_types(cfg, public_pairs, train_pairs)
        if synthetic_types:
            synthetic_pairs = _synthetic_pretrain(model, cfg, synthetic_types, vocab, device, image_size, history)
        else:
            history.append({"phase": "synthetic", "skipped": "no colour, shape or yes/no questions in this domain"})
    n_public = 0
    if cfg.pretrain_epochs and public_pairs:
        t1 = time.perf_counter()
        _pretrain(model, _tensors(vocab, public_pairs, image_size), cfg, device)
        n_public = len(public_pairs)
        history.append({"phase": "pretrain", "pairs": n_public, "seconds": time.perf_counter() - t1})
    model.train()
    return {"synthetic_pairs": synthetic_pairs, "synthetic_types": tuple(synthetic_types) if synthetic_pairs else (),
            "public_pairs": n_public, "history": history}


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
    data = _tensors(vocab, train_pairs, image_size)
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
        for epoch in _bar(range(cfg.epochs), cfg, f"{'DP-SGD' if cfg.private else 'training'} {arch}"):
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
                b = [t.to(device) for t in b]
                out = wrapped(*b)
                loss = loss_fn(out, torch.ones_like(out))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if unit_of_row is not None:  # one clipped contribution per annotator, not per pair
                    group_grad_samples(params, unit_of_row, int(unit_of_row.max()) + 1)
                opt.step()
                steps += 1
                total += float(loss.item()) * out.shape[0]
                count += out.shape[0]
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
