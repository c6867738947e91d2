"""What a reward-model training run needs besides data (:class:`TrainConfig`, every field documented) and the
demo presets of each architecture (:data:`DEMO_PRESETS`). Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ACCOUNTANTS = ("prv", "rdp")
UNITS = ("pair", "annotator")
GRAD_SAMPLE_MODES = ("ghost", "hooks")


@dataclass
class TrainConfig:
    """Everything a training run needs besides data. Every field documents itself."""

    arch: str = "cnn"
    """Architecture name (see mor_client.rewards.ARCHITECTURES)."""
    model_config: dict = field(default_factory=dict)
    """Keyword arguments of the architecture."""
    epsilon: float | None = 8.0
    """Target epsilon; None or inf trains without DP."""
    delta: float | None = None
    """Target delta; default min(1e-5, 1 / (10 n_pairs)), below 1/n."""
    epochs: int = 20
    """Passes over the private pairs."""
    batch_size: int = 512
    """Expected (Poisson) batch size in privacy units (pairs, or annotators with unit="annotator");
    sample_rate = batch_size / n_units."""
    lr: float = 3e-3
    """Adam learning rate for the private phase."""
    max_grad_norm: float = 1.0
    """Per-pair clipping norm C."""
    accountant: str = "prv"
    """Privacy accountant: "prv" or "rdp"."""
    grad_sample_mode: str = "ghost"
    """Per-sample gradients: "ghost" (ghost clipping, Linear/Embedding) or "hooks"."""
    unit: str = "pair"
    """Privacy unit: "pair" (one preference pair) or "annotator" (all of one annotator's pairs; needs
    grad_sample_mode="hooks")."""
    max_pairs: int | None = None
    """Use at most this many private pairs (the first ones); None: all."""
    pretrain_epochs: int = 0
    """Non-private epochs on public pairs before the private phase."""
    pretrain_lr: float = 3e-3
    """Learning rate of public pre-training."""
    # synthetic public pre-training (mor_client.data.synthetic: drawn from a seed, no privacy cost), before the
    # public pairs: visual pre-training on the images' colour/shape labels, then Bradley-Terry on synthetic pairs
    synthetic_images: int = 0
    """Synthetic images to draw (0: no synthetic pre-training)."""
    synthetic_questions: int = 1
    """Questions (= pairs) per synthetic image, of the domain's question types."""
    synthetic_types: tuple | None = None
    """Question types; None: those of public_pairs (else of the private pairs)."""
    visual_epochs: int = 0
    """Epochs of colour/shape classification with the model's image_features."""
    synthetic_epochs: int = 0
    """Bradley-Terry epochs on the synthetic pairs (cosine-decayed lr)."""
    synthetic_lr: float = 2e-3
    """Adam learning rate of both synthetic phases."""
    synthetic_batch: int = 128
    """Batch size of both synthetic phases."""
    seed: int = 0
    """Seeds model init, sampling and DP noise."""
    device: str = "cpu"
    """Device: "cpu" or "cuda" (or "cuda:N")."""
    progress: bool = True
    """Show tqdm progress bars."""

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


def progress_bar(iterable, cfg: TrainConfig, desc: str, total=None):
    if not cfg.progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)

