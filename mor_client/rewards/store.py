"""A reward-model folder, in Hugging Face's ``save_pretrained`` / ``from_pretrained`` conventions:

* ``model.safetensors``: the weights (the model's ``state_dict``);
* ``config.json``: ``{"architecture": ..., "vocab_size": ..., <the hyper-parameters that rebuild the module>}``,
  flat as in Hugging Face's configs (``build_model(**config)`` rebuilds it);
* ``README.md``: the model card for people and the Hub, YAML metadata on top (``library_name``, ``tags``, the DP
  guarantee under ``differential_privacy``: epsilon, delta, accountant, privacy unit; ``training_pairs``,
  ``heldout_pairwise_accuracy`` and a ``model-index`` entry for it), written with ``huggingface_hub.ModelCard``;
* ``vocab.json``: the word vocabulary the features use;
* ``card.json``: the machine-readable card every reader of this project uses (``mor client card``, the demo, the
  server's registration, the ledger), and the folder's completion marker: removed first, written last, so a save
  interrupted mid-way (kill -9) leaves no card and the folder is never taken for a model.

Card conventions: non-private models have ``"dp": false`` and ``"epsilon": null`` (meaning epsilon = inf);
``weights_sha256`` is the SHA-256 of ``model.safetensors`` and is checked on every load (a card without it is
refused). ``config.json`` must agree with the card's ``architecture`` and ``model_config``.

Why not ``huggingface_hub.PyTorchModelHubMixin`` itself (read in huggingface_hub 2.4): its ``from_pretrained``
treats any path that is not a folder as a Hub repository id and downloads it, and its loader uses
``strict=False`` without any digest, so a missing or replaced tensor would load silently; its ``save_pretrained``
writes files in place (not crash-safe) and has no place for the vocabulary or ``card.json``; and it only serves
subclasses, while ``register_architecture`` accepts any builder returning an ``nn.Module``. Overriding all of
that would leave nothing of the mixin, so the same conventions are written here by hand: :func:`save_pretrained`
/ :func:`from_pretrained` (and the methods of the same names on ``RewardModule`` and ``RewardModelScorer``) read
and write local folders only and never download anything.

Folders of the previous layout (``model.safetensors``, ``vocab.json``, ``card.json``; no ``config.json`` and no
``README.md``) still load: their card holds the architecture, the hyper-parameters and the digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from privacy.fsutil import atomic_write_bytes, fsync_dir

from .features import Vocab
from .models import build_model

WEIGHTS, VOCAB, CARD, CONFIG, README = "model.safetensors", "vocab.json", "card.json", "config.json", "README.md"
#: library name and tags of the README's metadata (the architecture is added as a tag)
LIBRARY_NAME = "mor"
TAGS = ("mor", "reward-model", "bradley-terry", "preference-model", "differential-privacy", "dp-sgd", "opacus")
RETRAIN = "retrain it with `mor client train` or restore the folder"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_config_of(model: torch.nn.Module, card: dict) -> dict:
    """The keyword arguments that rebuild ``model``: the card's ``model_config`` (what loading has always used),
    else the model's ``config`` dict."""
    if isinstance(card.get("model_config"), dict):
        return dict(card["model_config"])
    cfg = getattr(model, "config", None)
    return dict(cfg) if isinstance(cfg, dict) else {}


def hub_config(architecture: str, vocab_size: int, model_config: dict) -> dict:
    """``config.json``: the architecture, the vocabulary size and the hyper-parameters, flat."""
    clash = sorted({"architecture", "vocab_size"} & set(model_config))
    if clash:
        raise ValueError(f"model_config may not hold {clash}: config.json keeps those names for the architecture "
                         "and the vocabulary size")
    return {"architecture": architecture, "vocab_size": int(vocab_size), **model_config}


def _json_number(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def model_card_markdown(card: dict) -> str:
    """``README.md``: YAML metadata (Hugging Face model-card format) and a short human-readable card."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    arch = str(card.get("architecture", "custom"))
    domain = card.get("domain") or ""
    dp = card.get("dp")  # None: a bare card (e.g. RewardModule.save_pretrained without one) records no training
    guarantee = {k: _json_number(card.get(k)) for k in (
        "dp", "epsilon", "target_epsilon", "delta", "accountant", "privacy_unit", "privacy_units",
        "noise_multiplier", "sample_rate", "steps", "epochs", "max_grad_norm", "secure_rng")}
    guarantee["dp"] = None if dp is None else bool(dp)
    acc = card.get("heldout_pairwise_accuracy")
    eval_results = None
    if isinstance(acc, (int, float)):
        eval_results = [EvalResult(
            task_type="reward-modeling", task_name="pairwise preference (Bradley-Terry)",
            dataset_type="preference-pairs", dataset_name=f"held-out preference pairs{f' ({domain})' if domain else ''}",
            metric_type="pairwise_accuracy", metric_name="held-out pairwise accuracy", metric_value=float(acc))]
    data = ModelCardData(
        library_name=LIBRARY_NAME, tags=[*TAGS, arch], model_name=f"mor-reward-{arch}" + (f"-{domain}" if domain else ""),
        eval_results=eval_results, architecture=arch, domain=domain or None,
        differential_privacy=guarantee, training_pairs=card.get("data_size"), heldout_pairs=card.get("heldout_size"),
        heldout_pairwise_accuracy=acc, weights_file=WEIGHTS, weights_sha256=card.get("weights_sha256"))
    if dp:
        unit = card.get("privacy_unit", "pair")
        promise = (f"({_fmt(card.get('epsilon'), '.3f')}, {_fmt(card.get('delta'), '.2g')})-differential privacy "
                   f"per {unit} ({card.get('privacy_units')} {unit}s in the data), {card.get('accountant')} "
                   f"accountant, noise multiplier {_fmt(card.get('noise_multiplier'), '.3f')}, sample rate "
                   f"{_fmt(card.get('sample_rate'), '.4g')}, {card.get('steps')} steps, clipping norm "
                   f"{card.get('max_grad_norm')}")
    elif dp is None:
        promise = "not recorded: this folder's card holds no training record"
    else:
        promise = "none: trained without differential privacy (epsilon = infinity)"
    acc_text = _fmt(acc, ".3f") if isinstance(acc, (int, float)) else "not measured"
    body = f"""
# MoR reward model: {arch}{f" ({domain})" if domain else ""}

A Bradley-Terry reward model for (image, question, answer) trained with `mor client train`: one scalar reward per
candidate answer. `card.json` beside this file is the machine-readable card (the same figures, and more).

| | |
|---|---|
| privacy guarantee | {promise} |
| training pairs | {card.get("data_size")} |
| held-out pairwise accuracy | {acc_text} on {card.get("heldout_size")} held-out pairs |
| parameters | {card.get("parameter_count")} ({card.get("trainable_parameter_count")} trained in the private phase) |
| weights | `{WEIGHTS}`, SHA-256 `{card.get("weights_sha256")}` (checked on load) |

## Use

```python
from mor_client.rewards import RewardModelScorer

scorer = RewardModelScorer.from_pretrained("path/to/this/folder")  # local folders only, nothing is downloaded
scores = scorer.score(items)  # items: mor.types.ScoringItem; one list of rewards per item
```

or serve it in a federation: `mor client join --model path/to/this/folder ...`.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def save_pretrained(path: str | os.PathLike, model: torch.nn.Module, vocab: Vocab, card: dict) -> dict:
    """Write the model folder (see the module docstring); returns the card as written (``weights_sha256`` added).
    Every file is replaced atomically; ``card.json`` goes first and comes back last."""
    from safetensors.torch import save as st_save

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    card.setdefault("architecture", getattr(model, "arch", "custom"))
    model_config = model_config_of(model, card)
    config = hub_config(str(card["architecture"]), len(vocab), model_config)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    (d / CARD).unlink(missing_ok=True)
    fsync_dir(d)
    atomic_write_bytes(d / WEIGHTS, st_save(state))
    atomic_write_bytes(d / CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
    atomic_write_bytes(d / VOCAB, json.dumps(vocab.tokens).encode())
    card["model_config"] = model_config
    card["weights_file"] = WEIGHTS
    card["weights_sha256"] = sha256_file(d / WEIGHTS)
    atomic_write_bytes(d / README, model_card_markdown(card).encode("utf-8"))
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


def read_config(path: str | os.PathLike, card: dict) -> dict:
    """``config.json`` of a folder, checked against its card; a folder of the previous layout (no config.json)
    gets the same dict from its card."""
    d = Path(path)
    if "architecture" not in card:
        raise ValueError(f"{d / CARD}: no architecture in the card; {RETRAIN}")
    from_card = {"architecture": card["architecture"], **(card.get("model_config") or {})}
    if not (d / CONFIG).is_file():
        return from_card
    try:
        config = json.loads((d / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / CONFIG}: not valid JSON ({e}); {RETRAIN}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{d / CONFIG}: expected a JSON object, got {type(config).__name__}; {RETRAIN}")
    config = dict(config)
    config.pop("vocab_size", None)  # checked against vocab.json by the caller
    if config != json.loads(json.dumps(from_card)):
        raise ValueError(f"{d / CONFIG} disagrees with {CARD} (architecture or hyper-parameters); the folder was "
                         f"edited: {RETRAIN}")
    return config


def from_pretrained(path: str | os.PathLike, device: str = "cpu"):
    """(model in eval mode, vocab, card) from a model folder, local only; verifies the weights' SHA-256."""
    from safetensors.torch import load_file

    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"{path}: not a folder; give a reward-model folder written by `mor client train` "
                         "(nothing is downloaded)")
    card = read_card(d)
    if not (d / WEIGHTS).is_file() or not (d / VOCAB).is_file():
        raise ValueError(f"{path}: missing {WEIGHTS} or {VOCAB}; {RETRAIN}")
    if not card.get("weights_sha256"):
        raise ValueError(f"{path}: {CARD} has no weights_sha256, so {WEIGHTS} cannot be verified; {RETRAIN}")
    digest = sha256_file(d / WEIGHTS)
    if digest != card["weights_sha256"]:
        raise ValueError(f"{path}: {WEIGHTS} does not match the card's weights_sha256 (corrupted or replaced); "
                         f"{RETRAIN}")
    config = read_config(d, card)
    vocab = Vocab(json.loads((d / VOCAB).read_text()))
    if (d / CONFIG).is_file():
        declared = json.loads((d / CONFIG).read_text()).get("vocab_size")
        if declared is not None and declared != len(vocab):
            raise ValueError(f"{d / CONFIG}: vocab_size {declared} but {VOCAB} has {len(vocab)} words; {RETRAIN}")
    arch = config.pop("architecture")
    model = build_model(arch, len(vocab), **config)
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    model.to(device).eval()
    return model, vocab, card


#: the names of the first layout, kept: every caller and test of them keeps working
save_model_dir = save_pretrained
load_model_dir = from_pretrained
