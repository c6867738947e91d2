"""``mor client train`` and ``mor client card``: argparse wiring over :mod:`mor_client.rewards`.

The lead's ``mor_client/cli.py`` calls :func:`register` with its subparsers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mor.cliargs import (device, existing_dir, non_negative_int, open_unit_interval, output_dir, output_file,
                         partition_name, positive_float, positive_int, register_missing, unit_interval)


def _epsilon(text: str) -> float:
    if text.lower() in ("inf", "infinity", "none"):
        return math.inf
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'inf', got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or 'inf' for non-private), got {text!r}")
    return v


_partition = partition_name  # mor.cliargs: one rule for every --partition flag


def _record_ledger(path: Path, model_id: str, card: dict) -> str:
    try:
        from privacy.ledger import PrivacyLedger  # written by the privacy package
    except ImportError:
        return "privacy.ledger is not available; no ledger entry written"
    if not hasattr(PrivacyLedger, "record_training"):
        return "privacy.ledger.PrivacyLedger has no record_training; no ledger entry written"
    PrivacyLedger(path).record_training(model_id=model_id, noise_multiplier=card["noise_multiplier"],
                                        sample_rate=card["sample_rate"], steps=card["steps"], delta=card["delta"],
                                        unit=card["privacy_unit"], accountant=card["accountant"],
                                        epsilon=card["epsilon"])
    return f"ledger entry written to {path}"


def _train(args) -> int:
    from mor_client.data import make_federation_split, make_pairs
    from mor_client.rewards import demo_config, save_model_dir, train_reward_model

    split = make_federation_split(seed=args.data_seed, scheme=args.scheme, n_clients=args.n_clients,
                                  include_shapes_client=args.include_shapes_client, flip_fraction=args.flip_fraction,
                                  n_annotators=args.n_annotators)
    if args.partition not in split.clients:
        raise ValueError(f"--partition {args.partition!r} unknown; this split has {sorted(split.clients)}")
    client = split.clients[args.partition]
    overrides = {k: v for k, v in dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                       max_grad_norm=args.max_grad_norm, accountant=args.accountant,
                                       grad_sample_mode=args.grad_sample_mode, delta=args.delta,
                                       pretrain_epochs=args.pretrain_epochs, max_pairs=args.max_pairs,
                                       unit=args.unit).items() if v is not None}
    cfg = demo_config(args.arch, epsilon=None if math.isinf(args.epsilon) else args.epsilon, seed=args.seed,
                      device=args.device, progress=not args.quiet, **overrides)
    public = make_pairs([e for e in split.server_public if e.question_type in client.question_types],
                        seed=args.data_seed, rejected_per_example=8) if cfg.pretrain_epochs else []
    res = train_reward_model(client.train, client.heldout, cfg, public_pairs=public,
                             domain=f"{args.partition}: {client.domain_desc}")
    card = save_model_dir(args.out, res.model, res.vocab, res.card)
    eps = "inf (no DP)" if card["epsilon"] is None else f"{card['epsilon']:.3f} (delta={card['delta']:.2e})"
    if card["privacy_unit"] != "pair":
        eps += f" per {card['privacy_unit']} ({card['privacy_units']} of them)"
    print(f"saved {args.out}: {card['architecture']}, {card['data_size']} pairs, epsilon {eps}, "
          f"held-out pairwise accuracy {card['heldout_pairwise_accuracy']:.3f}, {card['train_seconds']:.1f} s")
    if args.ledger is not None:
        if card["dp"]:
            print(_record_ledger(args.ledger, args.model_id or Path(args.out).name, card))
        else:
            print("non-private model: nothing charged to the ledger")
    return 0


def _card(args) -> int:
    from mor_client.rewards import read_card

    card = read_card(args.model_dir)
    if args.json:
        print(json.dumps(card, indent=2, sort_keys=True))
        return 0
    eps = "inf (not private)" if card.get("epsilon") is None else f"{card['epsilon']:.3f}"
    rows = [("architecture", card.get("architecture")), ("domain", card.get("domain")),
            ("parameters", f"{card.get('parameter_count')} ({card.get('trainable_parameter_count')} trained under DP)"),
            ("data size (pairs)", card.get("data_size")), ("epsilon", eps), ("delta", card.get("delta")),
            ("noise multiplier", card.get("noise_multiplier")), ("sample rate", card.get("sample_rate")),
            ("steps", card.get("steps")), ("epochs", card.get("epochs")), ("accountant", card.get("accountant")),
            ("privacy unit", card.get("privacy_unit")), ("privacy units in data", card.get("privacy_units")),
            ("held-out pairwise accuracy", card.get("heldout_pairwise_accuracy")),
            ("created", card.get("created_at")), ("weights sha256", card.get("weights_sha256"))]
    for k, v in rows:
        print(f"{k:>27}: {v}")
    return 0


def register(subparsers) -> None:
    """Add the ``train`` and ``card`` subcommands (``func(args) -> int``) to ``subparsers``."""
    try:
        from mor_client.rewards.models import ARCHITECTURES
        from mor_client.rewards.config import UNITS
    except ImportError as e:  # a lean install without the train extra (torch, opacus): say so, in one line
        register_missing(subparsers, "train", "train a reward model on a client partition", e, "train",
                         flags=("--out", "--arch", "--epsilon", "--partition", "--ledger"))
        register_missing(subparsers, "card", "show a trained reward model's card", e, "train", flags=("--json",))
        return

    t = subparsers.add_parser("train", help="train a reward model on a client partition (Opacus DP-SGD)")
    t.add_argument("--arch", default="cnn", choices=sorted(ARCHITECTURES), help="reward-model architecture")
    t.add_argument("--epsilon", type=_epsilon, default=8.0, help="target epsilon, or 'inf' for no DP")
    t.add_argument("--delta", type=open_unit_interval, default=None,
                   help="target delta (default: min(1e-5, 1/(10 n)))")
    t.add_argument("--partition", type=_partition, default="client0",
                   help="which client of the federation split (client0 .. client<n-clients - 1>)")
    t.add_argument("--scheme", default="by_question_type", choices=("by_question_type", "dirichlet", "iid"),
                   help="how easy-vqa is split over the clients")
    t.add_argument("--n-clients", type=positive_int, default=3, help="clients in the federation split")
    t.add_argument("--include-shapes-client", action="store_true",
                   help="the last client holds the procedural shapes domain")
    t.add_argument("--flip-fraction", type=unit_interval, default=0.0,
                   help="annotator noise: fraction of flipped pairs (1 flips every pair: an adversarial annotator)")
    t.add_argument("--n-annotators", type=positive_int, default=8, help="annotators the split's pairs are spread over")
    t.add_argument("--unit", choices=UNITS, default=None,
                   help="privacy unit of DP-SGD: one preference pair (default) or all pairs of one annotator "
                        "(per-annotator clipping; needs --grad-sample-mode hooks, the presets' mode)")
    t.add_argument("--data-seed", type=non_negative_int, default=0, help="seed of the federation split")
    t.add_argument("--seed", type=non_negative_int, default=0, help="seed of init, sampling and DP noise")
    t.add_argument("--max-pairs", type=positive_int, default=None,
                   help="use at most this many training pairs (default: the preset's max_pairs)")
    t.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: the preset's)")
    t.add_argument("--batch-size", type=positive_int, default=None,
                   help="expected (Poisson) batch size (default: the preset's)")
    t.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the preset's)")
    t.add_argument("--max-grad-norm", type=positive_float, default=None,
                   help="per-example clipping norm of DP-SGD (default: the preset's)")
    t.add_argument("--pretrain-epochs", type=non_negative_int, default=None,
                   help="public pre-training epochs, 0 for none (default: the preset's)")
    t.add_argument("--accountant", choices=("prv", "rdp"), default=None,
                   help="privacy accountant that calibrates the noise (default: the preset's)")
    t.add_argument("--grad-sample-mode", choices=("ghost", "hooks"), default=None,
                   help="Opacus per-sample gradient mode (default: the preset's)")
    t.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    t.add_argument("--out", required=True, type=output_dir, help="model folder to write")
    t.add_argument("--ledger", type=output_file, default=None,
                   help="privacy ledger (SQLite) to record the training in")
    t.add_argument("--model-id", default=None, help="ledger model id (default: the folder name)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)
    c = subparsers.add_parser("card", help="show a trained reward model's card")
    c.add_argument("model_dir", type=existing_dir, help="a model folder written by `mor client train`")
    c.add_argument("--json", action="store_true", help="print the card as JSON")
    c.set_defaults(func=_card)


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="mor-client")
    register(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args()
    sys.exit(a.func(a))
