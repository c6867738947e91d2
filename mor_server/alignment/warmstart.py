"""The built-in policy's warm start: the reference GRPO starts from, and is KL-regularised to.

One module although a little over 400 lines: both stages train through the same batch encoding (``_sft_batch``,
``SFTEncoded``) and the cache key covers both, so a split would separate a stage from the key that decides its reuse.

* stage 1 (optional, :class:`PretrainConfig`): learn to see from synthetic images drawn by the project's own renderer
  (vision-tower classification, captioning, image-text matching, a yes/no curriculum on prior-balanced synthetic
  questions; no private data, no privacy cost);
* stage 2 (:class:`SFTConfig`, :func:`sft_warm_start`): supervised fine-tuning on the server's labelled public split;
* :func:`warm_start_cached`: both, cached in a folder keyed by every stage's settings, the data digest and
  :data:`WARM_START_CODE_VERSION`, swapped in whole so a killed run never leaves a cache that is trusted.

The prompt format (chat template, ``user_message``) and the model builder live in :mod:`.policy`; the named recipes
``mor demo --warm-start`` selects are in :mod:`.recipes`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from mor_client.data.synthetic import parse_curriculum

from .policy import (ASSISTANT, EOS, ImageCache, TinyLlavaConfig, autocast_for, build_tiny_llava, model_device,
                     pick_device, policy_vocabulary, save_policy, to_pil, user_message)


@dataclass
class SFTConfig:
    """Supervised warm start of the policy on labelled (image, question, answer) examples."""

    steps: int = 150
    """Optimizer steps (deterministic given the seed; about 15 s on 2 idle CPU cores)."""
    max_seconds: float = 120.0
    """Safety cap on wall-clock time; training stops at whichever of steps / max_seconds comes first."""
    epochs: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    max_examples: int | None = None
    """Use at most this many examples (None: all)."""
    balance_types: bool = False
    """Draw every batch with as many examples of each question type as the others (each type's examples reshuffled
    when used up), instead of in proportion to the data. easy-vqa's public split is 72% yes/no, and at lr 3e-3 the
    proportional SFT-50 can leave colour and shape questions answered "yes" (docs/alignment.md, "The reference is
    fragile")."""
    lr_schedule: str = "constant"
    """``constant`` (after a 20-step linear warm-up) or ``cosine`` (transformers' cosine schedule with the same warm-up):
    the learning rate then decays along a half cosine to zero at the last step, so the phase ends on small steps
    instead of wherever the last large one left it."""


LR_SCHEDULES = ("constant", "cosine")


def _scheduler(opt, schedule: str, total: int):
    """The learning-rate scheduler of ``schedule`` over ``total`` optimizer steps, 20 warm-up steps first."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if schedule == "cosine":
        from transformers import get_cosine_schedule_with_warmup

        return get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(20, total // 2), num_training_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))


def _sft_batch(processor, examples, device, images: ImageCache | None = None):
    """Tokenise a batch: full conversation; labels only on the answer + </s>. ``images``: decoded images reused
    across batches (each image is decoded once per warm start instead of once per batch it appears in); the
    processor encodes the whole batch in one call."""
    tok = processor.tokenizer
    pils = (images or ImageCache()).pils(examples)
    prompts = [processor.apply_chat_template(user_message(e.question), add_generation_prompt=True)
               for e in examples]
    full = [p + " " + str(e.answer).lower() + " " + EOS for p, e in zip(prompts, examples)]
    old = tok.padding_side
    tok.padding_side = "right"
    try:
        enc = processor(images=pils, text=full, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    # all prompts render to the same number of tokens only if questions have equal length: mask per row instead
    asst = tok.convert_tokens_to_ids(ASSISTANT)
    prompt_len = None
    for i in range(labels.shape[0]):
        pos = (enc["input_ids"][i] == asst).nonzero()
        if len(pos):
            cut = int(pos[-1]) + 1
        else:  # no ASSISTANT token (another tokenizer): the first prompt's length, encoded only when needed
            if prompt_len is None:
                old = tok.padding_side
                tok.padding_side = "right"
                try:
                    prompt_len = len(processor(images=pils[:1], text=prompts[:1])["input_ids"][0])
                finally:
                    tok.padding_side = old
            cut = prompt_len
        labels[i, :cut] = -100
    enc["labels"] = labels
    return {k: v.to(device) for k, v in enc.items()}


class SFTEncoded:
    """Every SFT example encoded once, before training: the processor runs over the examples in chunks (images
    decoded once, pixel values computed once per example), and a training batch is then only an index, a pad and a
    stack (:meth:`batch`), identical to what :func:`_sft_batch` gives for the same examples. ``ok`` is False when
    the processor's output is not one row per example (e.g. Qwen2-VL's flattened patches) or a prompt has no
    ``ASSISTANT:`` token: the caller then encodes each batch with :func:`_sft_batch`."""

    def __init__(self, processor, examples: Sequence, images: ImageCache | None = None, chunk: int = 128):
        self.pad_id = processor.tokenizer.pad_token_id
        asst = processor.tokenizer.convert_tokens_to_ids(ASSISTANT)
        self.rows: list[dict] = []
        self.seq_keys: set[str] = set()
        self.ok = self.pad_id is not None
        cache = images if images is not None else ImageCache()
        for b in range(0, len(examples), chunk) if self.ok else ():
            part = list(examples[b: b + chunk])
            enc = _sft_batch(processor, part, torch.device("cpu"), cache)
            ids = enc["input_ids"]
            if any(v.shape[0] != len(part) for v in enc.values()) or \
                    not bool((ids == asst).any(dim=1).all()):
                self.ok = False
                break
            self.seq_keys = {k for k, v in enc.items() if v.dim() == 2 and v.shape == ids.shape}
            lens = enc["attention_mask"].sum(dim=1).tolist()
            for i, n in enumerate(lens):  # right-padded: a row's tokens are its first n
                self.rows.append({k: (v[i, : int(n)] if k in self.seq_keys else v[i]) for k, v in enc.items()})

    def batch(self, idx: Sequence[int], device) -> dict:
        rows = [self.rows[i] for i in idx]
        width = max(len(r["input_ids"]) for r in rows)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": -100}
        out = {}
        for k in rows[0]:
            if k in self.seq_keys:
                out[k] = torch.stack([torch.nn.functional.pad(r[k], (0, width - len(r[k])), value=fill.get(k, 0))
                                      for r in rows])
            else:
                out[k] = torch.stack([r[k] for r in rows])
        return {k: v.to(device) for k, v in out.items()}


def sft_warm_start(model, processor, examples: Sequence, config: SFTConfig | None = None, *, progress: bool = True,
                   readout: Sequence[float | None] | None = None) -> dict:
    """Supervised fine-tuning on labelled examples (the server's public split): answers in the right format.

    readout: one binary target per example (None: no target), read by a throwaway linear head from the language
    model's last hidden state at the position that predicts the answer's first token, trained alongside the answers
    (binary cross-entropy added to the loss). It makes that state encode a property of the input the answers do not
    teach (the ``negation`` curriculum phase: whether a yes/no question is negated), without choosing an answer for it.

    Returns a summary dict (steps, seconds, final loss; with ``readout`` also the readout's last-batch accuracy). The
    model is trained in place and left in eval mode.
    """
    import time

    from tqdm.auto import tqdm

    cfg = config or SFTConfig()
    examples = list(examples)
    if not examples:
        raise ValueError("sft_warm_start: examples is empty; pass the server's labelled public split")
    for attr in ("image", "question", "answer"):
        if not hasattr(examples[0], attr):
            raise TypeError(f"sft_warm_start: examples need an .{attr} field (got {type(examples[0]).__name__})")
    if readout is not None and len(readout) != len(examples):
        raise ValueError(f"sft_warm_start: readout has {len(readout)} targets for {len(examples)} examples; "
                         "give one per example (None where there is none)")
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    device = model_device(model)
    if cfg.steps <= 0:  # no supervised steps (``--sft-steps 0``: the reference is stage 1's policy as it is)
        model.eval()
        return {"steps": 0, "seconds": 0.0, "final_loss": None, "examples": len(examples),
                "device": str(device)}
    cache = ImageCache()
    encoded = SFTEncoded(processor, examples, cache)  # every example encoded once (one row per example)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    head = targets = None
    if readout is not None:
        head = torch.nn.Linear(model.config.text_config.hidden_size, 1).to(device)
        targets = torch.tensor([-1.0 if t is None else float(t) for t in readout[: len(examples)]], device=device)
        params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    readout_acc = float("nan")
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = min(cfg.steps, steps_per_epoch * cfg.epochs)
    sched = _scheduler(opt, cfg.lr_schedule, total)
    model.train()
    t0, step, loss_v = time.perf_counter(), 0, float("nan")
    bar = tqdm(total=total, desc="SFT warm start", disable=not progress, leave=False)
    done = False
    draw = _type_balanced_order(examples, rng) if cfg.balance_types else None
    for _ in range(cfg.epochs):
        if draw is not None:
            order = [next(draw) for _ in range(len(examples))]
        else:
            order = list(range(len(examples)))
            rng.shuffle(order)
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b: b + cfg.batch_size]
            batch = encoded.batch(idx, device) if encoded.ok else \
                _sft_batch(processor, [examples[i] for i in idx], device, cache)
            with autocast_for(device):  # bf16 matmuls on CUDA (fp32 weights and optimizer); fp32 on the CPU
                out = model(**batch, output_hidden_states=head is not None)
            loss = out.loss
            if head is not None:
                y = targets[torch.as_tensor(idx, device=device)]
                has = y >= 0
                if bool(has.any()):
                    # the state at the position that predicts the answer's first token (right-padded rows)
                    rows = torch.arange(len(idx), device=device)
                    pos = (batch["labels"] != -100).float().argmax(dim=1) - 1
                    logit = head(out.hidden_states[-1][rows, pos][has].float()).squeeze(-1)
                    loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logit, y[has])
                    readout_acc = float(((logit > 0).float() == y[has]).float().mean())
                    loss = loss + READOUT_NEUTRAL_WEIGHT * _answer_shift(out.logits[rows, pos][has],
                                                                         batch["labels"][rows, pos + 1][has], y[has])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            loss_v = out.loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.3f}")
            if step >= cfg.steps or time.perf_counter() - t0 > cfg.max_seconds:
                done = True
                break
        if done:
            break
    bar.close()
    model.eval()
    out = {"steps": step, "seconds": round(time.perf_counter() - t0, 2), "final_loss": loss_v,
           "examples": len(examples), "device": str(device)}
    if head is not None:
        out["readout_last_batch_accuracy"] = readout_acc
    return out


READOUT_NEUTRAL_WEIGHT = 10.0
"""Weight of :func:`_answer_shift` in a readout phase."""


def _answer_shift(logits, first_tokens, y):
    """How far the first answer token's log-probabilities differ between the rows whose readout target is 1 and those
    whose target is 0 (squared difference of the two groups' means, over the answer tokens of these rows): the
    readout's property must reach the answer position without choosing an answer. On prior-balanced data it says
    nothing about the answer, yet a readout trained without this term tilted greedy yes/no answers by it in a random
    direction (measured: the ``negation`` phase left one seed's reference answering every negated question "yes" and
    every other one "no", the wording prior of easy-vqa, and another seed's the opposite; docs/alignment.md)."""
    on, off = y > 0.5, y <= 0.5
    if not bool(on.any()) or not bool(off.any()):
        return logits.new_zeros(())
    lp = logits.float().log_softmax(-1)[:, torch.unique(first_tokens)]
    return ((lp[on].mean(0) - lp[off].mean(0)) ** 2).sum()


def _type_balanced_order(examples: Sequence, rng: random.Random):
    """Endless example indices cycling over the question types in turn (``question_type``, else ``domain``), each
    type's indices in a fresh shuffled order every time they are used up."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(str(getattr(e, "question_type", None) or getattr(e, "domain", "")), []).append(i)
    queues: dict[str, list[int]] = {t: [] for t in groups}
    while True:
        for t in sorted(groups):
            if not queues[t]:
                queues[t] = list(groups[t])
                rng.shuffle(queues[t])
            yield queues[t].pop()


@dataclass
class PretrainConfig:
    """Stage 1 of the built-in policy's public warm start (issue #17): before the SFT on the server's public VQA
    examples, learn to *see* from synthetic images drawn by the project's own renderer (no privacy cost).

    * ``vision_steps``: the vision tower alone learns to classify each synthetic image's colour and shape from every
      patch token (and their mean), through two linear heads that are thrown away afterwards;
    * ``caption_steps``: the whole policy learns to caption synthetic images ("a red circle", "the circle is red";
      :mod:`mor_client.data.synthetic_captions`): grounded colour and shape words, but no VQA question -> answer
      mapping (the prompt is never a question).

    Both 0: no stage 1 (the warm start is the public SFT alone)."""

    vision_steps: int = 0
    """Vision-tower classification steps (batch 64)."""
    caption_steps: int = 0
    """Captioning steps of the whole policy (batch ``batch_size``)."""
    match_steps: int = 0
    """Image-text matching steps after the captions (BLIP-style ITM: does "red shape" / "circle" / "red circle"
    describe the image?), read from the language model's last hidden state by a throwaway linear head. Each
    matching step also takes a captioning batch when ``caption_steps`` > 0 (without it, matching alone made the
    policy forget its captions: 92.5% -> 6.5% held-out, docs/alignment.md)."""
    caption_prompts: str = "fixed"
    """``fixed``: every caption follows the one prompt "the image"; ``varied``: the prompt ("the image", "the color",
    "the shape") decides what the caption names, so the language model learns to read the text after the image
    (:func:`mor_client.data.synthetic_captions.prompted_caption`)."""
    yesno_curriculum: str = ""
    """Supervised phases on public prior-balanced synthetic yes/no questions after the other parts, ``name=steps[@lr]``
    comma-separated (:func:`mor_client.data.synthetic.curriculum_phase_examples`; ``YESNO_CURRICULUM`` there is the
    one measured in docs/alignment.md): teaches the policy to compare the colour or shape a question names with the
    image's, which easy-vqa's own wording lets it skip. Empty: none."""
    curriculum_lr: float = 1e-3
    """Learning rate of the curriculum phases that do not name one."""
    curriculum_schedule: str = "constant"
    """``SFTConfig.lr_schedule`` of every curriculum phase (``cosine``: each phase decays its learning rate to zero)."""
    images: int = 2000
    """Synthetic images drawn for stage 1 (the vision, caption and matching parts use the same images)."""
    batch_size: int = 32
    learning_rate: float = 3e-3
    seed: int = 0
    """Seed of the synthetic images and of the batch order (follows the run's seed in the demo)."""
    max_seconds: float = 1800.0
    """Safety cap on each part's wall-clock time."""

    def enabled(self) -> bool:
        return self.vision_steps > 0 or self.caption_steps > 0 or self.match_steps > 0 or bool(self.yesno_curriculum)


def pretrain_vision_tower(model, processor, examples: Sequence, labels: Sequence[tuple[int, int]], *, steps: int,
                          n_colors: int, n_shapes: int, seed: int = 0, learning_rate: float = 3e-3,
                          batch_size: int = 64, max_seconds: float = 1800.0) -> dict:
    """Every patch token of the vision tower (and their mean) classifies the image's colour and shape.

    labels: ``(colour index, shape index)`` per example. Returns the last batch's colour/shape accuracy."""
    import time

    device = next(model.parameters()).device
    pix = processor.image_processor([to_pil(e.image) for e in examples], return_tensors="pt")["pixel_values"]
    pix = pix.to(device=device, dtype=next(model.parameters()).dtype)
    yc = torch.tensor([c for c, _ in labels], device=device)
    ys = torch.tensor([s for _, s in labels], device=device)
    tower = model.model.vision_tower
    hidden = model.config.vision_config.hidden_size
    torch.manual_seed(seed)
    hc, hs = torch.nn.Linear(hidden, n_colors).to(device), torch.nn.Linear(hidden, n_shapes).to(device)
    opt = torch.optim.AdamW([*tower.parameters(), *hc.parameters(), *hs.parameters()], lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    ce = torch.nn.functional.cross_entropy
    acc_c = acc_s = float("nan")
    t0, done = time.perf_counter(), 0
    tower.train()
    for _ in range(steps):
        idx = torch.randint(0, len(examples), (batch_size,), generator=gen).to(device)
        h = tower(pixel_values=pix[idx]).last_hidden_state
        t = h.shape[1]
        pc, ps = hc(h.mean(1)), hs(h.mean(1))
        loss = (ce(hc(h).flatten(0, 1), yc[idx].repeat_interleave(t)) + ce(hs(h).flatten(0, 1),
                ys[idx].repeat_interleave(t)) + ce(pc, yc[idx]) + ce(ps, ys[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
        acc_c = float((pc.argmax(1) == yc[idx]).float().mean())
        acc_s = float((ps.argmax(1) == ys[idx]).float().mean())
        if time.perf_counter() - t0 > max_seconds:
            break
    model.eval()
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 2), "last_batch_colour_acc": acc_c,
            "last_batch_shape_acc": acc_s}


def pretrain_policy(model, processor, config: PretrainConfig, *, progress: bool = True,
                    done_phases: int | None = None) -> dict:
    """Stage 1 of the warm start (see :class:`PretrainConfig`), in place. Returns a summary dict.

    done_phases: the model is a checkpoint of this stage 1 that ran the parts before the curriculum and its first
    ``done_phases`` phases (:func:`stage1_checkpoint`): only the remaining phases run (None: everything runs)."""
    from mor_client.data.easyvqa import COLORS, SHAPE_NAMES
    from mor_client.data.synthetic import synthetic_attributes
    from mor_client.data.synthetic_captions import make_caption_examples

    for name in ("vision_steps", "caption_steps", "match_steps", "images"):
        if getattr(config, name) < 0:
            raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(config, name)}")
    phases = parse_curriculum(config.yesno_curriculum, default_lr=config.curriculum_lr)  # bad specs fail first
    if config.curriculum_schedule not in LR_SCHEDULES:
        raise ValueError(f"PretrainConfig.curriculum_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                         f"{config.curriculum_schedule!r}")
    out: dict = {"images": config.images}
    if not config.enabled():
        return out
    if done_phases is not None:  # the parts before the curriculum (and its first phases) are in the checkpoint
        out["yesno_curriculum"] = yesno_curriculum(model, processor, phases, seed=config.seed,
                                                   batch_size=config.batch_size, max_seconds=config.max_seconds,
                                                   progress=progress, start=done_phases,
                                                   schedule=config.curriculum_schedule)
        return out
    if config.images < 1:
        raise ValueError("PretrainConfig.images must be >= 1 when vision_steps, caption_steps or match_steps > 0")
    data_seed = 10_000 + config.seed  # a stream of its own (the reward models' synthetic data use small seeds)
    captions = make_caption_examples(config.images, seed=data_seed, prompts=config.caption_prompts)
    if config.vision_steps:
        labels = []
        for i in range(config.images):
            shape, color = synthetic_attributes(data_seed, i)
            labels.append((COLORS.index(color), SHAPE_NAMES.index(shape)))
        out["vision"] = pretrain_vision_tower(model, processor, captions, labels, steps=config.vision_steps,
                                              n_colors=len(COLORS), n_shapes=len(SHAPE_NAMES), seed=config.seed,
                                              learning_rate=config.learning_rate, max_seconds=config.max_seconds)
    if config.caption_steps:
        out["captions"] = sft_warm_start(model, processor, captions, SFTConfig(
            steps=config.caption_steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
            seed=config.seed, max_seconds=config.max_seconds), progress=progress)
    if config.match_steps:
        out["matching"] = pretrain_matching(model, processor, captions, seed=data_seed, steps=config.match_steps,
                                            with_captions=config.caption_steps > 0,
                                            batch_size=config.batch_size, learning_rate=config.learning_rate,
                                            train_seed=config.seed, max_seconds=config.max_seconds)
    if phases:
        out["yesno_curriculum"] = yesno_curriculum(model, processor, phases, seed=config.seed,
                                                   batch_size=config.batch_size, max_seconds=config.max_seconds,
                                                   progress=progress, schedule=config.curriculum_schedule)
    return out


def yesno_curriculum(model, processor, phases: Sequence[tuple[str, int, float]], *, seed: int, batch_size: int = 32,
                     max_seconds: float = 1800.0, progress: bool = True, start: int = 0,
                     schedule: str = "constant") -> list[dict]:
    """Supervised training through the curriculum phases ``[(phase, steps, lr), ...]`` in order, each on its own fresh
    draw of public synthetic examples (data seed ``20_000 + 100 * seed + index``: disjoint from stage 1's images and
    from any held-out draw of small seeds; the ``negation`` phase also trains a readout of negation). ``start``: the
    first ``start`` phases already ran (a cached checkpoint continued); every phase seeds itself, so the result is
    the one a run through all of them gives. Returns one summary per phase trained."""
    from mor_client.data.synthetic import curriculum_phase_examples, negation_targets

    done = []
    for i, (name, steps, lr) in enumerate(phases):
        if i < start:
            continue
        data = curriculum_phase_examples(name, 20_000 + 100 * seed + i)
        info = sft_warm_start(model, processor, data, SFTConfig(steps=steps, batch_size=batch_size, learning_rate=lr,
                                                                seed=seed + i, max_seconds=max_seconds,
                                                                lr_schedule=schedule),
                              progress=progress, readout=negation_targets(data) if name == "negation" else None)
        done.append({"phase": name, "lr": lr, **{k: info[k] for k in ("steps", "seconds", "final_loss", "examples",
                                                                      "readout_last_batch_accuracy") if k in info}})
    return done


def pretrain_matching(model, processor, images: Sequence, *, seed: int, steps: int, batch_size: int = 32,
                      learning_rate: float = 3e-3, train_seed: int = 0, max_seconds: float = 1800.0,
                      with_captions: bool = False) -> dict:
    """BLIP-style image-text matching on synthetic images: the prompt ``<image> {phrase}`` (no question), a
    throwaway linear head on the language model's last hidden state at the generation position predicts whether
    the phrase describes the image (:func:`mor_client.data.synthetic_captions.matching_text`; image ``k`` of
    ``images`` is synthetic image ``k`` of ``seed``). ``with_captions``: every step also trains on a batch of
    ``images`` as captioning examples (their ``question``/``answer``), so matching does not erase the captions.
    Returns the last batch's matching accuracy."""
    import time

    from mor_client.data.synthetic_captions import matching_text

    device = next(model.parameters()).device
    tok = processor.tokenizer
    torch.manual_seed(train_seed)
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1).to(device)
    opt = torch.optim.AdamW([*[p for p in model.parameters() if p.requires_grad], *head.parameters()],
                            lr=learning_rate)
    rng = random.Random(train_seed)
    pil = {}
    model.train()
    t0, done, acc = time.perf_counter(), 0, float("nan")
    old = tok.padding_side
    tok.padding_side = "left"  # the generation position is the last one of every row
    try:
        for step in range(steps):
            idx = [rng.randrange(len(images)) for _ in range(batch_size)]
            pairs = [matching_text(seed, k, step) for k in idx]
            prompts = [processor.apply_chat_template(user_message(t), add_generation_prompt=True) for t, _ in pairs]
            for k in idx:
                if k not in pil:
                    pil[k] = to_pil(images[k].image)
            enc = processor(images=[pil[k] for k in idx], text=prompts, return_tensors="pt", padding=True).to(device)
            h = model(**enc, output_hidden_states=True).hidden_states[-1][:, -1, :]
            y = torch.tensor([float(m) for _, m in pairs], device=device)
            logit = head(h.float()).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
            if with_captions:
                tok.padding_side = old
                cap = _sft_batch(processor, [images[rng.randrange(len(images))] for _ in range(batch_size)], device)
                tok.padding_side = "left"
                loss = loss + model(**cap).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            done += 1
            acc = float(((logit > 0).float() == y).float().mean())
            if time.perf_counter() - t0 > max_seconds:
                break
    finally:
        tok.padding_side = old
    model.eval()
    return {"steps": done, "seconds": round(time.perf_counter() - t0, 2), "last_batch_accuracy": acc}


WARM_START_CODE_VERSION = "3"
"""Part of the warm-start cache key: bump it whenever the policy builder, tokenizer or SFT code changes what a
cached reference would contain, so no stale checkpoint is reused."""


def examples_digest(examples: Sequence) -> str:
    """SHA-256 over every example's question, answer and image pixels (order-sensitive): what a cache of a model
    trained on ``examples`` is keyed by, so another seed's split with the same size never matches."""
    h = hashlib.sha256()
    for e in examples:
        img = to_pil(e.image)
        for part in (str(e.question).encode(), b"\0", str(e.answer).encode(), b"\0",
                     f"{img.size[0]}x{img.size[1]}".encode(), img.tobytes()):
            h.update(part)
    return h.hexdigest()


def host_fingerprint(device: str | torch.device | None = None) -> dict:
    """What a checkpoint's bytes depend on beyond its settings and data: the torch build, the CPU kernels it picked
    (AVX2 / AVX512) and the thread count. The same settings on another host can train other weights (measured:
    the compact reference of seed 1 rebuilt on another session's machine ended at 46.0% instead of 54.3%), so every
    warm start records where it was built (docs/alignment.md, "The reference is fragile")."""
    dev = pick_device(device)[0]
    out = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "device": str(dev)}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def _same_build(cached_key, key: dict, info, sft: SFTConfig) -> bool:
    """Whether a cached warm start is the one ``key`` asks for. The SFT's ``max_seconds`` is a safety cap, not a
    setting: a cached SFT that ran all its steps under another cap is the same checkpoint (the bench's references,
    built with a larger cap, are the demo's). A cache that ran more SFT steps than asked never is (code before
    2026-12-03 ran one step for ``steps=0`` under the same key)."""
    if cached_key == key:
        return not isinstance(info, dict) or info.get("steps", 0) <= sft.steps
    if not isinstance(cached_key, dict) or not isinstance(cached_key.get("sft"), dict) or not isinstance(info, dict):
        return False

    def uncapped(k: dict) -> dict:
        return {**k, "sft": {n: v for n, v in k["sft"].items() if n != "max_seconds"}}

    return uncapped(cached_key) == uncapped(key) and info.get("steps") == sft.steps


def _read_meta(folder: str | Path) -> dict | None:
    """A warm-start cache's ``warm_start.json`` (written last: present means complete), or None."""
    try:
        cached = json.loads((Path(folder) / "warm_start.json").read_text())
    except (OSError, ValueError):
        return None
    return cached if isinstance(cached, dict) else None


def _load_checkpoint(folder: str | Path, dev):
    """The policy and processor saved in a warm-start cache, on ``dev`` (fp32, as trained and saved)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True).to(dev)
    return model, LlavaProcessor.from_pretrained(folder, local_files_only=True)


def _phases_done(cached: dict | None, wanted: dict) -> int | None:
    """How many of the curriculum phases of the stage-1 config ``wanted`` (a ``PretrainConfig`` as a dict) the
    cached stage-1 config ``cached`` ran, when ``cached`` is a beginning of ``wanted``: every other field equal and
    its phases the first ones of ``wanted``'s. None when it is not."""
    if not isinstance(cached, dict) or set(cached) != set(wanted):
        return None
    if any(cached[k] != wanted[k] for k in wanted if k != "yesno_curriculum"):
        return None
    try:
        have = parse_curriculum(cached["yesno_curriculum"], default_lr=wanted["curriculum_lr"])
        want = parse_curriculum(wanted["yesno_curriculum"], default_lr=wanted["curriculum_lr"])
    except (ValueError, TypeError, AttributeError):
        return None
    return len(have) if want[: len(have)] == have else None


def stage1_checkpoint(candidates: Sequence[str | Path], key: dict) -> tuple[Path, dict, int | None] | None:
    """The candidate (warm-start cache folders) whose checkpoint is stage 1 of the build ``key`` describes, or its
    beginning: complete (its ``warm_start.json`` written), the same policy config, data digest and code version, no
    SFT step run, and the same pre-training or one whose curriculum phases are the first of ``key``'s (the rest then
    continue from it). The one furthest along wins. Returns ``(folder, its stage-1 summary, curriculum phases it
    ran, or None when it is the whole stage 1)``, or None."""
    same = ("tiny", "n", "data_sha256", "code")
    best = None
    for folder in candidates:
        cached = _read_meta(folder)
        if cached is None or not isinstance(cached.get("key"), dict):
            continue
        info = cached.get("info") if isinstance(cached.get("info"), dict) else {}
        if not all(cached["key"].get(k) == key[k] for k in same) or info.get("steps") != 0:
            continue
        if cached["key"].get("pretrain") == key["pretrain"]:
            return Path(folder), info.get("pretrain") or {}, None
        done = _phases_done(cached["key"].get("pretrain"), key["pretrain"])
        ran = (info.get("pretrain") or {}).get("yesno_curriculum") or []
        if done is not None:  # every phase it ran ran all its steps (a time cap can end one early)
            want = parse_curriculum(key["pretrain"]["yesno_curriculum"], default_lr=key["pretrain"]["curriculum_lr"])
            if len(ran) != done or any(not isinstance(r, dict) or r.get("steps") != w[1] for r, w in zip(ran, want)):
                done = None
        if done is not None and (best is None or done > best[2]):
            best = (Path(folder), info.get("pretrain") or {}, done)
    return best


def _without_defaults(values: dict, defaults: dict) -> dict:
    """``values`` less the fields that hold their ``defaults`` value."""
    return {k: v for k, v in values.items() if not (k in defaults and v == defaults[k])}


def warm_start_cached(cache_dir: str | Path, examples: Sequence, *, tiny: TinyLlavaConfig | None = None,
                      sft: SFTConfig | None = None, pretrain: PretrainConfig | None = None,
                      progress: bool = True, device: str | torch.device | None = None,
                      stage1_from: Sequence[str | Path] = ()):
    """Build + (stage 1: ``pretrain`` on synthetic images, optional) + SFT the tiny policy, or reuse the checkpoint
    cached in ``cache_dir`` when its settings match (configs of every stage, data digest and code version).

    stage1_from: other warm-start caches whose checkpoint may stand in for stage 1 (:func:`stage1_checkpoint`):
    one built with the same policy config, pre-training, data digest and code version that ran no SFT step is
    stage 1's output as it is, so the SFT starts from it instead of pre-training again (tens of minutes on a CPU
    for the compact recipes); one whose curriculum is the beginning of this one's is continued with the remaining
    phases. The SFT and every phase seed themselves, so the result is the one a build from scratch gives.

    device: where the policy is built, warm-started and returned (default :func:`pick_device`: CUDA when present,
    with bf16 autocast; fp32 weights are trained and saved). The device is not part of the cache key.
    Returns ``(model, processor, info)``; the directory holds the frozen reference checkpoint.
    """
    dev = pick_device(device)[0]
    cache_dir = Path(cache_dir)
    # fields added later are in the key only when set, so references built before them keep their key
    sft_key = _without_defaults(asdict(sft or SFTConfig()), {"balance_types": False, "lr_schedule": "constant"})
    pre_key = _without_defaults(asdict(pretrain), {"curriculum_schedule": "constant"}) \
        if pretrain is not None and pretrain.enabled() else None
    key = {"tiny": asdict(tiny or TinyLlavaConfig()), "sft": sft_key, "n": len(examples),
           "data_sha256": examples_digest(examples), "code": WARM_START_CODE_VERSION, "pretrain": pre_key}
    cached = _read_meta(cache_dir)
    if cached is not None and _same_build(cached.get("key"), key, cached.get("info"), sft or SFTConfig()):
        model, processor = _load_checkpoint(cache_dir, dev)
        model.eval()  # evaluation before GRPO runs where the policy will train
        return model, processor, {**cached.get("info", {}), "cached": True}
    stage1 = stage1_checkpoint(stage1_from, key) if key["pretrain"] is not None else None
    if stage1 is not None:  # stage 1, or its beginning, already ran with these settings: start from its checkpoint
        folder, summary, done = stage1
        model, processor = _load_checkpoint(folder, dev)
        pre = {**summary, "reused_from": str(folder)}
        if done is not None:  # the curriculum's remaining phases
            more = pretrain_policy(model, processor, pretrain, progress=progress, done_phases=done)
            pre = {**pre, "yesno_curriculum": list(summary.get("yesno_curriculum", [])) + more["yesno_curriculum"]}
    else:
        # the vocabulary covers the public split's words (easy-vqa's, plus another family's when a client holds one)
        model, processor = build_tiny_llava(policy_vocabulary(examples), config=tiny)
        model.to(dev)  # the warm start trains on the GPU when there is one (fp32 weights; saved as such)
        pre = pretrain_policy(model, processor, pretrain, progress=progress) if pretrain is not None else None
    info = sft_warm_start(model, processor, examples, sft, progress=progress)
    if pre is not None and pretrain.enabled():
        info = {**info, "pretrain": pre}
    info["host"] = host_fingerprint(dev)
    # built in a staging folder and swapped in whole, warm_start.json (the cache's completion marker) written last
    # inside it: a run killed while saving leaves the old cache or none, never a half-written one that is trusted
    from privacy.fsutil import replace_dir, staging_dir

    staged = staging_dir(cache_dir)
    save_policy(model, processor, staged)
    (staged / "warm_start.json").write_text(json.dumps({"key": key, "info": info}, indent=1))
    replace_dir(staged, cache_dir)
    return model, processor, {**info, "cached": False}
