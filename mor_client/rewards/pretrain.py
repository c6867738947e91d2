"""Public pre-training of a reward model (no privacy cost): synthetic public data drawn from a seed (visual
pre-training on the images' colour/shape labels, then Bradley-Terry on synthetic pairs), then Bradley-Terry on
public pairs (e.g. the server's public split). :func:`public_pretrain` runs all of it before the private phase."""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import TrainConfig, progress_bar
from .features import Vocab, default_vocab
from .pairs import PairModel, bradley_terry_step, pair_tensors


def _pretrain(model, data: TensorDataset, cfg: TrainConfig, device) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.pretrain_lr)
    wrapped = PairModel(model)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    loader = DataLoader(data, batch_size=min(64, len(data)), shuffle=True, generator=g)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in progress_bar(range(cfg.pretrain_epochs), cfg, "public pre-training"):
        for batch in loader:
            bradley_terry_step(wrapped, batch, loss_fn, opt, device)


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
    data = pair_tensors(vocab, pairs, image_size)
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
        for _ in progress_bar(range(cfg.visual_epochs), cfg, "synthetic visual pre-training"):
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
        for _ in progress_bar(range(cfg.synthetic_epochs), cfg, "synthetic pre-training"):
            total, count = 0.0, 0
            for batch in loader:
                loss_sum, rows = bradley_terry_step(wrapped, batch, loss_fn, opt, device)
                sched.step()
                total += loss_sum
                count += rows
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
        _pretrain(model, pair_tensors(vocab, public_pairs, image_size), cfg, device)
        n_public = len(public_pairs)
        history.append({"phase": "pretrain", "pairs": n_public, "seconds": time.perf_counter() - t1})
    model.train()
    return {"synthetic_pairs": synthetic_pairs, "synthetic_types": tuple(synthetic_types) if synthetic_pairs else (),
            "public_pairs": n_public, "history": history}

