"""Model folder: ``model.safetensors`` (weights), ``vocab.json``, ``card.json`` (the model card).

Card conventions: non-private models have ``"dp": false`` and ``"epsilon": null`` (meaning epsilon = inf);
``weights_sha256`` is the SHA-256 of ``model.safetensors`` and is checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from privacy.fsutil import atomic_write_bytes, fsync_dir

from .features import Vocab
from .models import build_model

WEIGHTS, VOCAB, CARD = "model.safetensors", "vocab.json", "card.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model_dir(path: str | os.PathLike, model: torch.nn.Module, vocab: Vocab, card: dict) -> dict:
    """Write the model folder; returns the card as written (with ``weights_sha256`` added)."""
    from safetensors.torch import save as st_save

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # card.json is the completion marker: it goes first and comes back last, so a folder interrupted mid-save
    # (kill -9) holds no card and is never taken for a model (every file is also replaced atomically)
    (d / CARD).unlink(missing_ok=True)
    fsync_dir(d)
    atomic_write_bytes(d / WEIGHTS, st_save(state))
    atomic_write_bytes(d / VOCAB, json.dumps(vocab.tokens).encode())
    card = dict(card)
    card["weights_file"] = WEIGHTS
    card["weights_sha256"] = sha256_file(d / WEIGHTS)
    atomic_write_bytes(d / CARD, json.dumps(card, indent=2, sort_keys=True).encode())
    fsync_dir(d)
    return card


def read_card(path: str | os.PathLike) -> dict:
    """The card of a model folder (ValueError naming the folder if there is none)."""
    p = Path(path) / CARD
    if not p.is_file():
        raise ValueError(f"{path}: no {CARD} there; expected a folder written by `mor client train`")
    try:
        card = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{p}: not valid JSON ({e}); the model card is corrupt: retrain the model with "
                         "`mor client train` or restore the folder") from None
    if not isinstance(card, dict):
        raise ValueError(f"{p}: expected a JSON object (the model card), got {type(card).__name__}; retrain the "
                         "model with `mor client train` or restore the folder")
    return card


def load_model_dir(path: str | os.PathLike, device: str = "cpu"):
    """(model in eval mode, vocab, card) from a model folder; verifies the weights' SHA-256."""
    from safetensors.torch import load_file

    d = Path(path)
    card = read_card(d)
    if not (d / WEIGHTS).is_file() or not (d / VOCAB).is_file():
        raise ValueError(f"{path}: missing {WEIGHTS} or {VOCAB}")
    digest = sha256_file(d / WEIGHTS)
    if card.get("weights_sha256") and digest != card["weights_sha256"]:
        raise ValueError(f"{path}: {WEIGHTS} does not match the card's weights_sha256 (corrupted or replaced)")
    vocab = Vocab(json.loads((d / VOCAB).read_text()))
    model = build_model(card["architecture"], len(vocab), **card.get("model_config", {}))
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    model.to(device).eval()
    return model, vocab, card
