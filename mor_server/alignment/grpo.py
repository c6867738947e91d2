"""GRPO driver over TRL's GRPOTrainer: config, prompt dataset, Prometheus metrics, checkpoints and resume.

The policy is loaded from a saved directory so that, with ``beta > 0``, TRL loads the frozen reference from the
same directory (the warm-started checkpoint). Prompts are conversational (TRL requires it for multimodal
input) and come from the unlabeled public pool: the dataset never carries answers.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from .policy import pick_device


FREEZABLE = ("embeddings", "vision")
"""The parts ``GRPORunConfig.freeze`` can name."""


def freeze_parts(model, parts: Sequence[str]) -> None:
    """Turn off the gradients of ``parts`` (``FREEZABLE``) of a Llava-style ``model``. With LoRA (peft) the base
    weights are frozen anyway and this is not needed."""
    for part in parts:
        if part == "embeddings":
            mods = [model.get_input_embeddings()]
        else:  # vision
            inner = getattr(model, "model", model)
            mods = [m for m in (getattr(inner, "vision_tower", None), getattr(inner, "multi_modal_projector", None),
                                getattr(inner, "visual", None))  # Llava-style; Qwen-VL-style towers are "visual"
                    if m is not None]
            if not mods:
                raise ValueError("GRPORunConfig.freeze: 'vision' needs a model with a vision_tower or visual module "
                                 "(a Llava- or Qwen-VL-style VLM); leave freeze empty for this model")
        for m in mods:
            m.requires_grad_(False)


@dataclass
class GRPORunConfig:
    """Settings of one GRPO run (small defaults sized for the 5-minute demo on 2 CPU cores)."""

    output_dir: str = "runs/grpo"
    """Where checkpoints (checkpoint-<step>/) and the final policy (final/) go."""
    max_steps: int = 400
    """Optimizer steps of the run (the total, also when resuming)."""
    prompts_per_step: int = 8
    """Distinct prompts per step; each gets num_generations completions."""
    num_generations: int = 8
    """Group size G of GRPO (completions per prompt, compared with each other)."""
    learning_rate: float = 3e-4
    """Adam learning rate of the policy."""
    beta: float = 0.05
    """KL coefficient to the frozen reference (> 0 keeps the policy near the warm start)."""
    epsilon: float = 0.2
    """PPO-style clip range of the importance ratio."""
    loss_type: str = "dapo"
    """TRL loss aggregation: 'grpo', 'dapo', 'dr_grpo' or 'bnpo'."""
    temperature: float = 1.0
    """Sampling temperature of the completions (> 1 explores answers the warm start rarely gives, at the cost of
    more malformed samples)."""
    max_completion_length: int = 4
    """Tokens per completion (easy-vqa answers are one word + end of sequence)."""
    scale_rewards: str = "group"
    """Advantage normalisation: 'group', 'batch' or 'none'."""
    save_steps: int = 100
    """Checkpoint every save_steps steps (0: only the final policy)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints."""
    logging_steps: int = 1
    """Log (and export to Prometheus) every logging_steps steps."""
    seed: int = 0
    """Seed of sampling, shuffling and initialisation."""
    progress: bool = True
    """Show TRL's progress bar."""
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning). > 0 trains peft LoRA adapters through TRL's ``peft_config`` (the base
    weights stay frozen, so a 2B-class VLM fits one GPU; with beta > 0 the reference is the base model with the
    adapters disabled)."""
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list | None = "all-linear"
    """peft target_modules ('all-linear': every linear layer but the output head)."""
    use_vllm: bool = False
    """Generate completions with vLLM (TRL's ``use_vllm``, colocate mode: vLLM shares each training GPU). Off by
    default; needs CUDA and the vllm package (an error says so when it is missing)."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of each GPU's memory vLLM may take in colocate mode."""
    device: str | None = None
    """Force a device ("cpu"); None: CUDA with bf16 when present, else CPU."""
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (the learning rate decays along a half cosine to zero at ``max_steps``), after
    ``warmup_steps`` of linear warm-up (transformers' schedulers)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from zero (0: the first step runs at the full learning rate)."""
    freeze: str = ""
    """Parts of the policy GRPO leaves as they are, separated by ``,`` or ``+`` (``FREEZABLE``): ``embeddings`` (the token
    embeddings, which the built-in policies tie to the output head: the answer words' output vectors are the question
    words' input vectors), ``vision`` (the vision tower and the projector). Empty: every weight trains. Full fine-tuning
    only: with ``lora_r`` > 0 the base weights are frozen anyway and ``lora_target_modules`` decides what trains, so
    ``freeze`` is not applied (a warning says so)."""

    def frozen_parts(self) -> tuple[str, ...]:
        """``freeze`` as a tuple of part names (ValueError naming the field for an unknown part)."""
        parts = tuple(p.strip() for p in self.freeze.replace("+", ",").split(",") if p.strip())
        bad = [p for p in parts if p not in FREEZABLE]
        if bad:
            raise ValueError(f"GRPORunConfig.freeze: unknown part {bad[0]!r}; use a comma-separated list of "
                             f"{', '.join(FREEZABLE)} (or leave it empty)")
        return parts

    def validate(self) -> None:
        self.frozen_parts()
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"GRPORunConfig.lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"GRPORunConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("max_steps", "prompts_per_step", "num_generations", "max_completion_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPORunConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError("GRPORunConfig.num_generations must be >= 2 (GRPO compares completions in a group)")
        if self.beta < 0 or self.learning_rate <= 0 or self.epsilon <= 0:
            raise ValueError("GRPORunConfig: beta must be >= 0, learning_rate and epsilon > 0")
        if self.loss_type not in ("grpo", "dapo", "dr_grpo", "bnpo"):
            raise ValueError(f"GRPORunConfig.loss_type must be grpo, dapo, dr_grpo or bnpo, got {self.loss_type!r}")
        if self.lora_r < 0 or (self.lora_r and self.lora_alpha <= 0) or not 0 <= self.lora_dropout < 1:
            raise ValueError("GRPORunConfig: lora_r must be >= 0, lora_alpha > 0 and 0 <= lora_dropout < 1")
        if self.lora_r:
            import importlib.util

            if importlib.util.find_spec("peft") is None:
                raise ValueError("GRPORunConfig.lora_r > 0 needs the peft package (pip install peft)")
        if self.use_vllm:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise ValueError("GRPORunConfig.use_vllm needs the vllm package, which is not installed "
                                 "(pip install vllm, on a CUDA machine); leave use_vllm off to generate with "
                                 "transformers")
            if pick_device(self.device)[0].type != "cuda":
                raise ValueError("GRPORunConfig.use_vllm needs a CUDA device (vLLM colocate mode)")
            if not 0 < self.vllm_gpu_memory_utilization < 1:
                raise ValueError("GRPORunConfig.vllm_gpu_memory_utilization must be in (0, 1)")

    def peft_config(self):
        """The ``peft.LoraConfig`` handed to TRL when lora_r > 0, else None."""
        if not self.lora_r:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules, task_type="CAUSAL_LM")

    def to_trl(self, reward_weights: Sequence[float] | None):
        """The equivalent ``trl.GRPOConfig`` (CPU: use_cpu, fp32; CUDA: bf16)."""
        from trl import GRPOConfig

        self.validate()
        dev, _ = pick_device(self.device)
        cpu = dev.type == "cpu"
        vllm = dict(use_vllm=True, vllm_mode="colocate",
                    vllm_gpu_memory_utilization=self.vllm_gpu_memory_utilization) if self.use_vllm else {}
        return GRPOConfig(
            output_dir=self.output_dir, max_steps=self.max_steps,
            per_device_train_batch_size=self.prompts_per_step * self.num_generations,
            num_generations=self.num_generations, learning_rate=self.learning_rate, beta=self.beta,
            epsilon=self.epsilon, loss_type=self.loss_type, temperature=self.temperature,
            max_completion_length=self.max_completion_length, scale_rewards=self.scale_rewards,
            save_strategy="steps" if self.save_steps else "no", save_steps=self.save_steps or 500,
            save_total_limit=self.save_total_limit, logging_steps=self.logging_steps, seed=self.seed,
            data_seed=self.seed, report_to="none", use_cpu=cpu, bf16=not cpu, gradient_checkpointing=False,
            dataloader_num_workers=0, disable_tqdm=not self.progress,
            reward_weights=list(reward_weights) if reward_weights is not None else None,
            lr_scheduler_type=("constant_with_warmup" if self.warmup_steps else "constant")
            if self.lr_schedule == "constant" else "cosine", warmup_steps=self.warmup_steps, **vllm,
        )


def make_prompt_dataset(examples: Sequence):
    """GRPO prompts from unlabeled public examples (``.image`` PNG bytes, ``.question``, ``.example_id``,
    optional ``.question_type``/``.domain`` for reporting): a ``datasets.Dataset`` with conversational ``prompt``, ``image`` (PIL),
    ``image_png``, ``question``, ``example_id``, ``domain``. Answers are never read."""
    from datasets import Dataset, Features, Image, Value

    from .policy import to_pil
    from .rewards import png_bytes

    if not examples:
        raise ValueError("make_prompt_dataset: examples is empty; pass the server's unlabeled prompt pool")
    rows = []
    for i, e in enumerate(examples):
        rows.append({
            "prompt": [{"role": "user", "content": str(e.question)}],
            "image": to_pil(e.image), "image_png": png_bytes(e.image), "question": str(e.question),
            "example_id": str(getattr(e, "example_id", i)),
            # reporting only (routing weights by domain); never used by the reward or the policy
            "domain": str(getattr(e, "question_type", None) or getattr(e, "domain", "") or ""),
        })
    feats = Features({"prompt": [{"role": Value("string"), "content": Value("string")}], "image": Image(),
                      "image_png": Value("binary"), "question": Value("string"), "example_id": Value("string"),
                      "domain": Value("string")})
    return Dataset.from_list(rows, features=feats)


class GRPOMetrics:
    """Prometheus metrics of alignment, registered in the ``CollectorRegistry`` passed in (no global state)."""

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.step = Gauge("mor_grpo_step", "GRPO optimizer steps done", registry=r)
        self.reward = Gauge("mor_grpo_reward", "Mean total reward of the last logged step", registry=r)
        self.reward_std = Gauge("mor_grpo_reward_std", "Std of the total reward of the last logged step", registry=r)
        self.kl = Gauge("mor_grpo_kl", "KL to the reference at the last logged step", registry=r)
        self.loss = Gauge("mor_grpo_loss", "GRPO loss at the last logged step", registry=r)
        from ..federation.metrics import REWARD_ROUND_OUTCOMES, ClosedLabel

        self.rounds = ClosedLabel(Counter("mor_reward_rounds", "Reward scoring rounds run for GRPO", ["outcome"],
                                          registry=r), "outcome", REWARD_ROUND_OUTCOMES)
        self.round_seconds = Histogram("mor_reward_round_seconds", "Wall time of a successful reward round",
                                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.abstained = Counter("mor_reward_abstained_prompts",
                                 "GRPO prompts sent to no client: their question type is one the live clients do not "
                                 "rank above chance (the router's abstention)", registry=r)

    def round_done(self, ok: bool, seconds: float) -> None:
        self.rounds.labels(outcome="ok" if ok else "failed").inc()  # REWARD_ROUND_OUTCOMES; others are refused
        if ok:
            self.round_seconds.observe(seconds)

    def value(self, name: str, labels: dict | None = None) -> float:
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


def _callback(metrics: GRPOMetrics):
    from transformers import TrainerCallback

    class PrometheusCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            metrics.step.set(state.global_step)
            for key, gauge in (("reward", metrics.reward), ("reward_std", metrics.reward_std), ("kl", metrics.kl),
                               ("loss", metrics.loss)):
                if key in logs:  # TRL logs None/NaN when every reward of the step was missing
                    gauge.set(float("nan") if logs[key] is None else float(logs[key]))

    return PrometheusCallback()


class GRPOInterrupted(Exception):
    """GRPO stopped early on request (:class:`GracefulStop`) after saving a checkpoint to resume from."""

    def __init__(self, message: str, *, step: int, checkpoint: str | None, reason: str | None):
        super().__init__(message)
        self.step, self.checkpoint, self.reason = step, checkpoint, reason


class GracefulStop:
    """A stop request for a running GRPO loop (e.g. set from a SIGTERM handler): at the end of the current optimizer
    step the trainer saves a checkpoint and stops, and :func:`run_grpo` raises :class:`GRPOInterrupted`.

    ``active`` is True while the training loop runs (a signal handler can then defer to it instead of raising)."""

    def __init__(self):
        self.reason: str | None = None
        self.active = False

    def request(self, reason: str = "stop requested") -> None:
        self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


def _checkpoint_step(p: Path) -> int | None:
    tail = p.name.rsplit("-", 1)[-1]
    return int(tail) if p.name.startswith("checkpoint-") and tail.isdigit() else None


def checkpoint_complete(path: str | Path, require: Sequence[str] = ()) -> bool:
    """Whether a ``checkpoint-<step>`` folder was written to the end: the Trainer writes ``trainer_state.json``
    last (after weights, optimizer, scheduler and RNG states), so it must parse and name the folder's step; the
    files in ``require`` (written after it, e.g. by an ``on_save`` callback) must exist too."""
    p = Path(path)
    step = _checkpoint_step(p)
    if step is None or not p.is_dir():
        return False
    try:
        state = json.loads((p / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != step:
        return False
    has_weights = any((p / f).is_file() for f in ("model.safetensors", "pytorch_model.bin",
                                                   "model.safetensors.index.json", "adapter_model.safetensors"))
    return has_weights and (p / "optimizer.pt").is_file() and all((p / f).is_file() for f in require)


def latest_checkpoint(output_dir: str | Path, require: Sequence[str] = ()) -> Path | None:
    """The newest complete ``checkpoint-<step>`` directory under output_dir (see :func:`checkpoint_complete`),
    or None. A folder left half-written by a killed run is skipped."""
    ck = [p for p in Path(output_dir).glob("checkpoint-*")
          if _checkpoint_step(p) is not None and checkpoint_complete(p, require)]
    return max(ck, key=_checkpoint_step) if ck else None


def discard_incomplete_checkpoints(output_dir: str | Path, require: Sequence[str] = ()) -> list[str]:
    """Delete checkpoint folders a killed run left half-written (so checkpoint rotation never counts them)."""
    gone = []
    for p in Path(output_dir).glob("checkpoint-*"):
        if _checkpoint_step(p) is not None and not checkpoint_complete(p, require):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def _stop_callback(stop: GracefulStop):
    from transformers import TrainerCallback

    class StopCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stop.active = True

        def on_step_end(self, args, state, control, **kw):
            if stop.requested:  # save where we are and leave the loop (checked once per optimizer step)
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kw):
            stop.active = False

    return StopCallback()


def run_grpo(model_dir: str | Path, train_dataset, reward_funcs: list, reward_weights: Sequence[float] | None,
             config: GRPORunConfig | None = None, *, registry=None, metrics: GRPOMetrics | None = None,
             resume: bool | str | Path = False, callbacks: Sequence = (), stop: GracefulStop | None = None) -> dict:
    """Run GRPO on the policy saved in ``model_dir`` (also the KL reference when beta > 0).

    callbacks: extra ``transformers.TrainerCallback`` objects (e.g. :func:`mor_server.alignment.evaluate.accuracy_callback`).
    resume: True continues from the newest complete checkpoint in ``config.output_dir``, a path from that
    checkpoint (the step count, optimizer, scheduler and RNG states continue; the run stops at ``config.max_steps``
    in total). stop: a :class:`GracefulStop`; once requested, the current step ends with a checkpoint and
    :class:`GRPOInterrupted` is raised (no final policy is written). Returns ``{"model", "processor", "global_step", "log_history",
    "final_dir", "seconds", "resumed_from"}``; the final policy is saved to ``<output_dir>/final``.
    """
    from transformers import AutoModelForImageTextToText
    from trl import GRPOTrainer

    cfg = config or GRPORunConfig()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"run_grpo: model_dir {str(model_dir)!r} has no config.json; save the warm-started "
                                f"policy with mor_server.alignment.policy.save_policy first")
    metrics = metrics or GRPOMetrics(registry)
    dev, dtype = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    from .policy import _load_processor

    processor = _load_processor(model_dir)  # AutoProcessor (image-only when a video half needs torchvision)
    processor.tokenizer.padding_side = "left"
    frozen = cfg.frozen_parts()
    if frozen and cfg.lora_r:
        import warnings

        warnings.warn(f"GRPORunConfig.freeze={cfg.freeze!r} is not applied with lora_r={cfg.lora_r}: the base weights "
                      f"are frozen and lora_target_modules decides what trains", stacklevel=2)
    elif frozen:
        freeze_parts(model, frozen)
    args = cfg.to_trl(reward_weights)
    extra = [_stop_callback(stop)] if stop is not None else []
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                          processing_class=processor, callbacks=[_callback(metrics), *callbacks, *extra],
                          peft_config=cfg.peft_config())
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # logs go to Prometheus and log_history, not to stdout
    if cfg.progress:
        class _QuietProgress(ProgressCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                pass

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_QuietProgress)
    if resume is True:
        ck = latest_checkpoint(cfg.output_dir)
        if ck is None:
            raise FileNotFoundError(f"run_grpo(resume=True): no checkpoint to resume from (no complete "
                                    f"checkpoint-<step> directory) in {cfg.output_dir!r}")
    elif resume:
        ck = Path(resume)
        if not checkpoint_complete(ck):
            raise FileNotFoundError(f"run_grpo(resume={str(ck)!r}): not a complete checkpoint-<step> directory")
    else:
        ck = None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(ck) if ck else None)
    seconds = time.perf_counter() - t0
    if stop is not None and stop.requested and trainer.state.global_step < cfg.max_steps:
        step = trainer.state.global_step
        saved = Path(cfg.output_dir) / f"checkpoint-{step}"
        saved = saved if checkpoint_complete(saved) else latest_checkpoint(cfg.output_dir)
        raise GRPOInterrupted(f"GRPO stopped at step {step} of {cfg.max_steps} ({stop.reason}); "
                              + (f"resume from {saved.name}" if saved else "no checkpoint saved"),
                              step=step, checkpoint=str(saved) if saved else None, reason=stop.reason)
    final = Path(cfg.output_dir) / "final"
    trainer.save_model(str(final))
    if trainer.accelerator.is_main_process:  # one writer under accelerate
        processor.save_pretrained(final)
    metrics.step.set(trainer.state.global_step)
    model = trainer.model
    model.eval()
    return {"model": model, "processor": processor, "global_step": trainer.state.global_step,
            "log_history": list(trainer.state.log_history), "final_dir": str(final), "seconds": seconds,
            "resumed_from": str(ck) if ck else None, "config": asdict(cfg)}
