"""Client-side trainer of the parameter-sharing baselines (FLORA fedit/stack/ffa, Fed-CMP) on the built-in policy.

One module although over 400 lines: the trainer and the tensor helpers the server's driver reuses
(``base_weights``, ``lora_init``, ``apply_state``) define one layout of the broadcast, which must not drift apart.

Given a training round's broadcast (:class:`mor_client.training.TrainingRequest`), :class:`PolicyTrainer` loads the
tensors into its own copy of the same warm-started tiny Llava the server aligns, trains one local pass over its
private split and returns its trained values of the tensors the round asks for:

* FLORA (``fedit``, ``stack``, ``ffa``): LoRA adapters (peft, ``inject_adapter_in_model``) on the language
  model's attention output projections (``o_proj``), rank from the broadcast A's shape, ``lora_alpha`` from the
  round (FLORA: 64 at rank 2, a scaling of 32); ``ffa`` trains only B (A stays at its shared random init);
  ``stack`` also receives the merged base weights of those projections;
* Fed-CMP (``fedcmp``): the multimodal projector's weights and biases, everything else frozen.

The objective is SFT on the chosen answers of the client's preference pairs (one example per pair, so a pair is the
privacy unit). With a finite ``hparams.epsilon`` the round runs Opacus DP-SGD (Poisson sampling, per-example
clipping) with the noise calibrated so that ``total_rounds`` rounds together spend that epsilon (PRV accountant),
and each round is recorded in the client's privacy ledger (``record_training``, unit ``pair``) before its update
leaves. Tensor names are the plain model's parameter names (``...o_proj.lora_A.weight``, ``...o_proj.weight``,
``model.multi_modal_projector.linear_1.weight``), never peft's internal ones.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import secrets
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mor.training import METHODS, is_private

from .training import TrainingRefused, TrainingRequest, TrainingResult

LORA_TARGET = r".*language_model.*\.o_proj"
"""peft ``target_modules`` regex: the attention output projections of the language model only."""
PROJECTOR_PREFIX = "model.multi_modal_projector."
LORA_METHODS = ("fedit", "stack", "ffa")


# --------------------------------------------------------------------------------------------- name plumbing
def canonical(name: str) -> str:
    """peft's parameter name -> the plain model's (``...o_proj.base_layer.weight`` -> ``...o_proj.weight``,
    ``...lora_A.default.weight`` -> ``...lora_A.weight``)."""
    return name.replace(".base_layer.", ".").replace(".default.", ".").replace(".default", "")


def lora_modules(model) -> list[str]:
    """Names of the modules LoRA adapts (the language model's ``o_proj`` linear layers)."""
    pat = re.compile(LORA_TARGET)
    return [n for n, m in model.named_modules() if pat.fullmatch(n) and isinstance(m, torch.nn.Linear)]


def projector_state(model) -> dict[str, np.ndarray]:
    """Fed-CMP's tensors: every parameter of the multimodal projector."""
    out = {n: p.detach().cpu().float().numpy().copy() for n, p in model.named_parameters()
           if n.startswith(PROJECTOR_PREFIX)}
    if not out:
        raise ValueError(f"the policy has no parameters under {PROJECTOR_PREFIX!r} (not a Llava-style VLM?)")
    return out


def lora_init(model, rank: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh adapters for every LoRA module, as peft initialises them: A ~ kaiming-uniform(a=sqrt 5), B = 0."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for mod in lora_modules(model):
        lin = model.get_submodule(mod)
        a = torch.empty(rank, lin.in_features)
        bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix
        a.uniform_(-bound, bound, generator=g)
        out[f"{mod}.lora_A.weight"] = a.numpy()
        out[f"{mod}.lora_B.weight"] = np.zeros((lin.out_features, rank), np.float32)
    if not out:
        raise ValueError(f"the policy has no module matching {LORA_TARGET!r} to adapt")
    return out


def base_weights(model, modules: Sequence[str]) -> dict[str, np.ndarray]:
    return {f"{m}.weight": model.get_submodule(m).weight.detach().cpu().float().numpy().copy() for m in modules}


def apply_state(model, method: str, state: Mapping[str, np.ndarray], *, lora_alpha: float = 64.0):
    """A copy of ``model`` with a baseline's server state applied as plain weights (for evaluation and as the
    next stage's base): LoRA adapters merged as W + (lora_alpha / r) B A; base or projector tensors loaded."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if ".lora_A." in name or ".lora_B." in name:
                continue
            params[name].copy_(torch.as_tensor(np.asarray(value), dtype=params[name].dtype))
        if method in LORA_METHODS:
            for mod in lora_modules(out):
                a, b = state.get(f"{mod}.lora_A.weight"), state.get(f"{mod}.lora_B.weight")
                if a is None or b is None:
                    continue
                s = lora_alpha / np.shape(a)[0]
                w = out.get_submodule(mod).weight
                w += torch.as_tensor(s * (np.asarray(b, np.float64) @ np.asarray(a, np.float64)), dtype=w.dtype)
    return out


# ------------------------------------------------------------------------------------------------ the trainer
@dataclass
class SFTExample:
    """One example of a client: its image, the question, the answer its annotator chose and (for DPO) the one it
    rejected."""

    image: bytes
    question: str
    answer: str
    rejected: str | None = None


def examples_from_pairs(pairs) -> list[SFTExample]:
    """Examples from preference pairs: the chosen answer of each pair (annotator noise included) and the rejected
    one (used by the ``dpo`` objective)."""
    return [SFTExample(p.example.image, p.example.question, p.chosen, p.rejected) for p in pairs]


class PolicyTrainer:
    """Trains the parameter-sharing baselines on a client's private examples (see the module docstring).

    model, processor: the warm-started policy (the same checkpoint the server aligns); kept unchanged, each round
    trains a copy. examples: objects with ``.image``, ``.question``, ``.answer`` (:func:`examples_from_pairs`).
    ledger: a ``privacy.ledger.PrivacyLedger`` charged (unit ``pair``) for every round's training.
    """

    methods = METHODS

    def __init__(self, model, processor, examples: Sequence, *, ledger=None, device: str = "cpu",
                 model_id: str = "baseline", max_examples: int | None = None, methods: Sequence[str] = METHODS,
                 accountant: str = "prv", max_epsilon: float | None = None):
        self.base = model.to("cpu").eval()
        self.processor = processor
        self.examples = list(examples)[:max_examples] if max_examples else list(examples)
        if len(self.examples) < 2:
            raise ValueError(f"PolicyTrainer needs at least 2 training examples, got {len(self.examples)}")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: {unknown[0]!r} is not one of {METHODS}")
        self.methods = tuple(methods)
        self.ledger = ledger
        self.device = torch.device(device)
        self.model_id = model_id
        if accountant not in ("prv", "rdp"):
            raise ValueError(f"accountant must be 'prv' or 'rdp', got {accountant!r}")
        self.accountant = accountant
        if max_epsilon is not None and not max_epsilon > 0:
            raise ValueError(f"max_epsilon must be > 0 (or None: no ceiling), got {max_epsilon!r}")
        self.max_epsilon = max_epsilon
        """The client's own example-level ceiling: a round that would take the composed epsilon (the ledger's:
        every training it records, reward models included; else this trainer's rounds) past it is refused before
        training, whatever epsilon, total_rounds and round_index the server announces. None: no ceiling (the
        server's run-level epsilon is trusted)."""
        """How the noise is calibrated and the rounds recorded: ``prv`` (tight, as the reward models' DP-SGD) or
        ``rdp`` (fast, conservative)."""
        self._encoded = None
        self._lock = threading.Lock()
        self._history: list[tuple[float, float, int]] = []  # (noise, sample_rate, steps) of past rounds
        self.last: dict = {}

    @classmethod
    def from_policy_dir(cls, policy_dir, examples, **kw) -> "PolicyTrainer":
        """Load the warm-started policy saved with ``mor_server.alignment.policy.save_policy`` (a local folder)."""
        from transformers import LlavaForConditionalGeneration, LlavaProcessor

        model = LlavaForConditionalGeneration.from_pretrained(policy_dir, local_files_only=True)
        processor = LlavaProcessor.from_pretrained(policy_dir, local_files_only=True)
        return cls(model, processor, examples, **kw)

    # -- data ------------------------------------------------------------------------------------------------------
    def _data(self) -> dict:
        if self._encoded is None:
            from mor_server.alignment.warmstart import _sft_batch  # the warm start's own tokenisation: answer + </s> labelled

            self._encoded = _sft_batch(self.processor, self.examples, torch.device("cpu"))
        return self._encoded

    def _dpo_data(self) -> dict:
        """Chosen and rejected completions of every pair, tokenised together (equal lengths), split in halves."""
        if getattr(self, "_dpo_encoded", None) is None:
            from mor_server.alignment.warmstart import _sft_batch  # the warm start's own tokenisation: answer + </s> labelled

            if any(getattr(e, "rejected", None) is None for e in self.examples):
                raise TrainingRefused("FAILED_PRECONDITION", "objective dpo needs a rejected answer for every "
                                                             "example (this client has chosen answers only)")
            rej = [SFTExample(e.image, e.question, e.rejected) for e in self.examples]
            enc = _sft_batch(self.processor, list(self.examples) + rej, torch.device("cpu"))
            n = len(self.examples)
            self._dpo_encoded = {"pixel_values": enc["pixel_values"][:n],
                                 **{f"{k}_c": enc[k][:n] for k in ("input_ids", "attention_mask", "labels")},
                                 **{f"{k}_r": enc[k][n:] for k in ("input_ids", "attention_mask", "labels")}}
        return self._dpo_encoded

    # -- one round -------------------------------------------------------------------------------------------------
    def _prepare(self, req: TrainingRequest):
        """A fresh copy of the policy with the broadcast loaded; returns (model, {canonical name: param})."""
        model = copy.deepcopy(self.base)
        for p in model.parameters():
            p.requires_grad_(False)
        if req.method in LORA_METHODS:
            a_names = [n for n in req.parameters if n.endswith(".lora_A.weight")]
            if not a_names:
                raise TrainingRefused("INVALID_ARGUMENT", f"{req.method}: the broadcast has no lora_A tensors")
            rank = int(req.parameters[a_names[0]].shape[0])
            from peft import LoraConfig, inject_adapter_in_model

            cfg = LoraConfig(r=rank, lora_alpha=float(req.hparams["lora_alpha"]), lora_dropout=0.0, bias="none",
                             target_modules=LORA_TARGET)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = inject_adapter_in_model(cfg, model)
        params = {canonical(n): p for n, p in model.named_parameters()}
        with torch.no_grad():
            for name, value in req.parameters.items():
                p = params.get(name)
                if p is None or tuple(p.shape) != tuple(value.shape):
                    raise TrainingRefused("INVALID_ARGUMENT", f"broadcast tensor {name!r} {list(value.shape)} does "
                                                              "not match this client's policy (another checkpoint?)")
                p.copy_(torch.as_tensor(value, dtype=p.dtype))
        for p in model.parameters():  # peft made its new adapters trainable: only the update's tensors train
            p.requires_grad_(False)
        trainable = [params[n] for n in req.update_names]
        for p in trainable:
            p.requires_grad_(True)
        return model.to(self.device), params, trainable

    def noise_for(self, h: Mapping, n: int) -> tuple[float, float, int]:
        """(noise multiplier, sample rate, steps per round) so that ``total_rounds`` rounds spend ``epsilon``."""
        batch = min(int(h["batch_size"]), n)
        q = batch / n
        steps = int(h["local_epochs"]) * math.ceil(n / batch)
        if not is_private(h):
            return 0.0, q, steps
        z = _noise_multiplier(float(h["epsilon"]), float(h["delta"]), q, steps * int(h["total_rounds"]),
                              self.accountant)
        return z, q, steps

    def train(self, req: TrainingRequest) -> TrainingResult:
        with self._lock:  # one round at a time: the ledger's order and the trainer's history stay consistent
            return self._train(req)

    def _train(self, req: TrainingRequest) -> TrainingResult:
        h = req.hparams
        if req.method not in self.methods:
            raise TrainingRefused("FAILED_PRECONDITION", f"this client does not train {req.method!r}")
        if h["round_index"] >= h["total_rounds"]:
            raise TrainingRefused("RESOURCE_EXHAUSTED", f"round_index {h['round_index']} >= total_rounds "
                                                        f"{h['total_rounds']}: this run's epsilon is spent",
                                  remaining_epsilon=0.0)
        t0 = time.perf_counter()
        private = is_private(h)
        # the server chooses hparams.seed: under DP the noise and the Poisson sampling must not be derivable from it
        # (the server could regenerate the noise and subtract it), so they come from a secret seed drawn from the
        # OS's CSPRNG (torch's generators themselves are not cryptographic; Opacus' secure_mode needs torchcsprng,
        # which is not installed). Without DP the public seed makes a round reproducible.
        secret = secrets.randbits(63) if private else None
        torch.manual_seed(secret if private else int(h["seed"]) * 1_000_003 + int(h["round_index"]))
        model, params, trainable = self._prepare(req)
        dpo = h["objective"] == "dpo"
        if dpo:  # the reference is the round's broadcast policy: its log-probabilities before any local step
            d = self._dpo_data()
            with torch.no_grad():
                model.eval()
                ref_c = _seq_logprob(_PolicyForward(model), d["input_ids_c"], d["attention_mask_c"],
                                     d["pixel_values"], d["labels_c"])
                ref_r = _seq_logprob(_PolicyForward(model), d["input_ids_r"], d["attention_mask_r"],
                                     d["pixel_values"], d["labels_r"])
            ds = torch.utils.data.TensorDataset(d["input_ids_c"], d["attention_mask_c"], d["input_ids_r"],
                                                d["attention_mask_r"], d["pixel_values"], d["labels_c"],
                                                d["labels_r"], ref_c, ref_r)
            n = int(d["input_ids_c"].shape[0])
        else:
            data = self._data()
            ds = torch.utils.data.TensorDataset(data["input_ids"], data["attention_mask"], data["pixel_values"],
                                                data["labels"])
            n = int(data["input_ids"].shape[0])
        noise, q, steps = self.noise_for(h, n)
        if self.max_epsilon is not None:
            after = self.prospective_epsilon(noise if private else 0.0, q, steps, float(h["delta"]))
            if after > self.max_epsilon:
                raise TrainingRefused("RESOURCE_EXHAUSTED", f"this round would take the example-level epsilon to "
                                                            f"{after:.3g} > max_epsilon {self.max_epsilon:g}",
                                      remaining_epsilon=max(0.0, self.max_epsilon - self.epsilon(float(h["delta"]))))
        opt = torch.optim.AdamW(trainable, lr=float(h["learning_rate"]), betas=(h["adam_beta1"], h["adam_beta2"]),
                                eps=float(h["adam_eps"]), weight_decay=float(h["weight_decay"]))
        batch = min(int(h["batch_size"]), n)
        gen = torch.Generator().manual_seed(secrets.randbits(63) if private
                                            else int(h["seed"]) * 7919 + int(h["round_index"]))
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=gen)
        net = _PolicyForward(model)
        engine = None
        if private:
            from opacus import PrivacyEngine

            # Opacus warns here that its secure RNG is off (noise from torch's PRNG, not a CSPRNG): a privacy
            # product shows that warning (the noise below is seeded from the OS's CSPRNG)
            engine = PrivacyEngine(accountant="prv")
            with warnings.catch_warnings():  # only make_private's own chatter (accountant orders, hook notes)
                warnings.simplefilter("ignore")
                net, opt, loader = engine.make_private(module=net, optimizer=opt, data_loader=loader,
                                                       noise_multiplier=noise, max_grad_norm=float(h["max_grad_norm"]),
                                                       poisson_sampling=True, grad_sample_mode="hooks",
                                                       noise_generator=torch.Generator().manual_seed(
                                                           secrets.randbits(63)))
        net.train()
        done, losses = 0, []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
            for _ in range(int(h["local_epochs"])):
                for b in loader:
                    if b[0].shape[0] == 0:  # an empty Poisson batch is still a DP-SGD step: noise only
                        from mor_client.rewards.trainer import _noise_only_step

                        _noise_only_step(opt, trainable, "hooks")
                        done += 1
                        continue
                    b = [t.to(self.device) for t in b]
                    if dpo:
                        loss = _dpo_loss(net, b, float(h["dpo_beta"]))
                    else:
                        loss = _sft_loss(net(*b[:3]), b[3])
                    opt.zero_grad(set_to_none=True)
                    # DP-DPO: rows i and B+i are pair i, the hooks see 2B rows: halve so a pair's two rows sum to its
                    # own gradient
                    (loss / 2 if private and dpo else loss).backward()
                    if private and dpo:  # clip and noise per PAIR (the privacy unit), not per completion
                        from mor_client.rewards.trainer import group_grad_samples

                        m = b[0].shape[0]
                        group_grad_samples(trainable, torch.arange(m).repeat(2), m)
                    if not private:
                        torch.nn.utils.clip_grad_norm_(trainable, float(h["max_grad_norm"]))
                    opt.step()
                    done += 1
                    losses.append(float(loss.item()))
        if engine is not None:  # remove Opacus' hooks and per-sample attributes (public API)
            net.cleanup()
        steps_taken = done
        out = {name: params[name].detach().cpu().float().numpy().copy() for name in req.update_names}
        # charge before the update leaves this client (the SDK sends it after train() returns)
        if self.ledger is not None:
            self.ledger.record_training(model_id=f"{self.model_id}:{req.method}:{req.round_id}",
                                        noise_multiplier=noise if private else 0.0, sample_rate=q,
                                        steps=steps_taken, delta=float(h["delta"]), unit="pair",
                                        accountant=self.accountant)
        self._history.append((noise if private else 0.0, q, steps_taken))
        eps = self.epsilon(float(h["delta"]))
        self.last = {"round_id": req.round_id, "method": req.method, "tensors": out, "num_examples": n,
                     "noise_multiplier": noise, "sample_rate": q, "steps": steps_taken, "epsilon": eps,
                     "seconds": time.perf_counter() - t0}
        return TrainingResult(out, n, epsilon=eps, loss=float(np.mean(losses)) if losses else float("nan"),
                              info={k: v for k, v in self.last.items() if k != "tensors"})

    def prospective_epsilon(self, noise: float, sample_rate: float, steps: int, delta: float) -> float:
        """The composed example-level epsilon if a round of (noise, sample_rate, steps) were recorded now, by the
        same composition the ledger applies when it records it."""
        if self.ledger is not None:
            from privacy.ledger import PrivacyLedger

            rows = [dict(r) for r in self.ledger._rows("pair")]
            new = dict(kind="training", unit="pair", epsilon_given=math.inf if noise <= 0 else None, delta=delta,
                       mechanism="dpsgd", rho=None, noise_multiplier=noise, sample_rate=sample_rate, steps=steps,
                       accountant=self.accountant)
            rows.append(new)
            return float(PrivacyLedger._compose(rows, PrivacyLedger._natural_delta(rows, delta))[0])
        hist = [*self._history, (noise, sample_rate, steps)]
        if any(z <= 0 for z, _, _ in hist):
            return math.inf
        from privacy import accounting as acc

        return float(acc.prv_epsilon(hist, delta) if self.accountant == "prv" else acc.rdp_epsilon(hist, delta))

    def epsilon(self, delta: float) -> float:
        """Example-level epsilon so far: the ledger's (every training it records, composed; read from its newest
        entry) or this trainer's own rounds (same bound) without a ledger."""
        if self.ledger is not None:
            rows = self.ledger.history("pair")
            return float(rows[-1]["epsilon_after"]) if rows else 0.0
        if not self._history or any(z == 0 for z, _, _ in self._history):
            return math.inf
        from privacy import accounting as acc

        return float(acc.prv_epsilon(self._history, delta) if self.accountant == "prv"
                     else acc.rdp_epsilon(self._history, delta))


_INT_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256)


@functools.lru_cache(maxsize=64)
def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """The smallest noise multiplier (to 0.1%) whose ``steps`` Poisson-subsampled Gaussian steps are at most
    (``epsilon``, ``delta``)-DP by the ledger's own bound (:mod:`privacy.accounting`: RDP, or PRV including its
    ``eps_error``), so the ledger never reports more than the target for the run. Bisection, bracketed by RDP
    (fast; PRV is never above it); cached: a run asks the same question every round."""
    from privacy import accounting as acc

    def eps(z: float, how, orders=_INT_ORDERS) -> float:
        hist = [(z, sample_rate, steps)]
        return acc.rdp_epsilon(hist, delta, orders) if how == "rdp" else acc.prv_epsilon(hist, delta)

    def bisect(lo: float, hi: float, how: str, rel: float, orders=_INT_ORDERS) -> float:
        while hi - lo > rel * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid, how, orders) <= epsilon else (mid, hi)
        return hi

    # RDP over any subset of orders bounds epsilon from above, so every z found here keeps the ledger (which
    # takes the minimum over all its orders, and PRV) at or below the target. First integer orders (fast), then
    # the ledger's orders near the best one at that z (fractional orders near 1-2 matter at large epsilon)
    hi = 1.0
    while eps(hi, "rdp") > epsilon:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon} at delta {delta}")
    lo = hi / 2
    while lo > 1e-3 and eps(lo, "rdp") <= epsilon:
        lo /= 2
    z = bisect(lo, hi, "rdp", 1e-3)
    full = list(acc.DEFAULT_ORDERS)
    best = acc.rdp_to_epsilon(acc.rdp_curve(z, sample_rate, steps, full), delta, full)[1]
    if best in full:
        i = full.index(best)
        near = tuple(sorted(set(full[max(0, i - 3): i + 4]) | set(_INT_ORDERS)))
        if eps(z / 2, "rdp", near) > epsilon:
            z = bisect(z / 2, z, "rdp", 1e-3, near)
    if accountant == "prv":  # PRV is tighter still: less noise for the same (epsilon, delta)
        if eps(z / 4, "prv") > epsilon:
            z = bisect(z / 4, z, "prv", 2e-3)
    return float(z)


class _PolicyForward(torch.nn.Module):
    """(input_ids, attention_mask, pixel_values) -> logits; a plain module for Opacus' GradSampleModule."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pixel_values):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits


def _seq_logprob_from_logits(logits, labels):
    """Sum of log p(token) over each row's labelled tokens (the answer and </s>)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * (tgt != -100).float()).sum(1)


def _seq_logprob(net, input_ids, attention_mask, pixel_values, labels, batch: int = 64):
    out = []
    for i in range(0, input_ids.shape[0], batch):
        s = slice(i, i + batch)
        out.append(_seq_logprob_from_logits(net(input_ids[s], attention_mask[s], pixel_values[s]), labels[s]))
    return torch.cat(out)


def _dpo_loss(net, b, beta: float):
    """DPO (Rafailov et al. 2023) per pair, averaged: -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) -
    log ref(r)))); chosen and rejected completions go through one forward pass (rows i and B + i)."""
    ids_c, m_c, ids_r, m_r, pix, lab_c, lab_r, ref_c, ref_r = b
    k = ids_c.shape[0]
    logits = net(torch.cat([ids_c, ids_r]), torch.cat([m_c, m_r]), torch.cat([pix, pix]))
    lp = _seq_logprob_from_logits(logits, torch.cat([lab_c, lab_r]))
    margin = (lp[:k] - ref_c) - (lp[k:] - ref_r)
    return -F.logsigmoid(beta * margin).mean()


def _sft_loss(logits, labels):
    """Mean over examples of each example's mean token cross-entropy on its labelled tokens (per-example terms,
    so DP-SGD's per-example clipping sees one example's loss)."""
    logits, tgt = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1).clamp(min=0),
                         reduction="none").view(tgt.shape)
    mask = (tgt != -100).float()
    return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
