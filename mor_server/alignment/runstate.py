"""Resume state of an alignment run (``<work_dir>/grpo/run.json`` and ``mor_state.json`` in each checkpoint).

A run killed at any point (``kill -9`` included) and started again with the same settings continues where it
stopped instead of starting over:

* ``run.json`` holds the run's *key* (a digest of every setting that changes what GRPO computes, the reference
  policy's weights and the caller's ``resume_key``, e.g. the reward models' identities), whether the calibrated
  router was saved and whether the run completed. It is written atomically.
* The router is saved (atomically) once calibrated; a resumed run reloads it instead of running the calibration
  round again (which in ``dp`` calibration mode would be charged to every client again).
* Every GRPO checkpoint gets ``mor_state.json`` (written by an ``on_save`` callback after the Trainer's own
  files): the reward's round counters and history and the accuracy curve so far, restored on resume so the report
  covers the whole run. A checkpoint without it (killed while saving) is incomplete and discarded.

A run whose key differs, or that completed, starts fresh (its old checkpoints are removed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np

from privacy.fsutil import atomic_write_text, replace_dir, staging_dir
from .grpo import discard_incomplete_checkpoints, latest_checkpoint

STATE_FILE = "run.json"
MOR_STATE = "mor_state.json"
_NOT_SEMANTIC = ("output_dir", "progress", "save_steps", "save_total_limit", "logging_steps")
# AlignmentConfig fields that change what a run computes: a restart with any of them changed starts fresh (the router
# and the GRPO checkpoints of the interrupted run were built with the old values)
_CONFIG_FIELDS = ("seed", "objective", "w_mix", "w_format", "w_length", "reward_shaping", "typed_answers", "top_k",
                  "router_hidden", "router_steps", "router_rank_weight", "router_abstain_z", "router_features",
                  "calibration_purpose", "answer_vocabulary", "policy_path", "adapter_path", "resume_key", "routing",
                  "collapse_guard")
# and the ones that are not in the key, with why (tests/test_crash_resume.py checks that every field is in one list):
# the warm start's settings (tiny, sft, pretrain, preset) reach the key through the reference policy's weights; grpo
# is keyed on its own (less its bookkeeping fields, _NOT_SEMANTIC); the rest only say where, how verbosely, on which
# device, or how much to evaluate, and a run may be resumed on a GPU after starting on the CPU
_NOT_IN_KEY = ("work_dir", "tiny", "sft", "pretrain", "preset", "grpo", "deadline_s", "retries", "eval_size",
               "curve_size", "curve_every", "resume", "progress", "device")


def _file_digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def run_settings(cfg, ref_dir: Path, *, sizes: dict) -> dict:
    """What a resumed GRPO run must share with the interrupted one (``cfg`` is an AlignmentConfig), as plain JSON
    values: the key is its digest, and ``run.json`` keeps it so that a restart can say which setting changed."""
    grpo = {k: v for k, v in _floats(cfg.grpo, asdict(cfg.grpo)).items() if k not in _NOT_SEMANTIC}
    weights = [p for p in Path(ref_dir).glob("*.safetensors")] or [p for p in Path(ref_dir).glob("*.bin")]
    config = _floats(cfg, {k: getattr(cfg, k, None) for k in _CONFIG_FIELDS})
    if is_dataclass(config["collapse_guard"]):
        config["collapse_guard"] = _floats(config["collapse_guard"], asdict(config["collapse_guard"]))
    blob = {"grpo": grpo, "config": config, "sizes": sizes,
            "reference": _file_digest(weights) if weights else None, "v": 2}
    return json.loads(json.dumps(blob, sort_keys=True, default=str))


def _floats(obj, values: dict) -> dict:
    """``values`` with numpy scalars as Python numbers and the ints of ``obj``'s float-typed dataclass fields as
    floats: a config file's ``2``, ``np.float32(2)`` and the default ``2.0`` are the same setting and must give the
    same key."""
    kinds = {f.name: str(f.type) for f in fields(obj)} if is_dataclass(obj) else {}
    values = {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}  # numpy scalars: Python's
    return {k: float(v) if "float" in kinds.get(k, "") and isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in values.items()}


def run_key(cfg, ref_dir: Path, *, sizes: dict) -> str:
    """Digest of :func:`run_settings`."""
    return settings_key(run_settings(cfg, ref_dir, sizes=sizes))


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def changed_settings(old: dict, new: dict) -> list[str]:
    """The settings that differ between two :func:`run_settings` (``config.router_abstain_z: 2.0 -> None``)."""
    out = []
    for part in sorted(set(old) | set(new)):
        a, b = old.get(part), new.get(part)
        if isinstance(a, dict) and isinstance(b, dict):
            label = "" if part == "config" else part + "."
            out += [f"{label}{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append("the reference policy's weights" if part == "reference" else f"{part}: {a!r} -> {b!r}")
    return out


def read_state(work: Path) -> dict | None:
    try:
        s = json.loads((Path(work) / "grpo" / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def _write_state(work: Path, state: dict) -> None:
    atomic_write_text(Path(work) / "grpo" / STATE_FILE, json.dumps(state, indent=1))


@dataclass
class ResumePlan:
    checkpoint: Path | None
    """The complete checkpoint GRPO continues from (None: GRPO starts at step 0)."""
    reuse_router: bool
    """The router calibrated by the interrupted run is reloaded (no calibration round)."""
    discarded: list
    """Checkpoint folders the interrupted run left incomplete (removed)."""
    why_fresh: str | None = None
    """Why nothing was resumed (None when something was)."""
    interrupted: bool = False
    """An unfinished run was there and is not continued (its checkpoints were removed): the caller says why."""


def plan(work: Path, key: str, resume, settings: dict | None = None) -> ResumePlan:
    """Decide how a run with ``key`` (the digest of ``settings``, :func:`run_settings`) starts. ``resume``: False
    (always fresh), "auto" (continue a matching, unfinished run if there is one) or True (continue one, or raise
    FileNotFoundError saying why not). ``settings`` are kept in run.json to name what changed on a later restart."""
    work = Path(work)
    grpo = work / "grpo"
    state = read_state(work)
    interrupted = bool(state) and not state.get("complete")
    why = None
    if not resume:
        why = "resume is off"
    elif state is None:
        why = f"no {STATE_FILE} in {grpo}"
    elif state.get("key") != key:
        changed = changed_settings(state["settings"], settings) \
            if isinstance(state.get("settings"), dict) and settings else []
        why = ("settings changed since the interrupted run: " + "; ".join(changed)) if changed else \
            "the settings, reference policy or reward models differ from the interrupted run's"
    elif state.get("complete"):
        why = "the previous run completed"
    elif not (state.get("router") and (work / "router" / "router.json").is_file()):
        why = "the previous run stopped before its router was calibrated"
    if why is None:
        discarded = discard_incomplete_checkpoints(grpo, require=(MOR_STATE,))
        return ResumePlan(latest_checkpoint(grpo, require=(MOR_STATE,)), True, discarded)
    if resume is True:
        raise FileNotFoundError(f"resume=True but there is nothing to resume in {grpo}: {why}")
    if grpo.exists():
        shutil.rmtree(grpo)
    _write_state(work, {"key": key, "router": False, "complete": False, "started": time.time(),
                        **({"settings": settings} if settings else {})})
    return ResumePlan(None, False, [], why, interrupted=interrupted and bool(resume))


def save_router(router, path: Path) -> None:
    """Save the router whole or not at all (staging folder swapped in), then record it in run.json."""
    path = Path(path)
    staged = staging_dir(path)
    router.save(staged)
    replace_dir(staged, path)
    work = path.parent
    state = read_state(work) or {}
    _write_state(work, {**state, "router": True})


def mark_complete(work: Path) -> None:
    state = read_state(work)
    if state is not None:
        _write_state(work, {**state, "complete": True, "finished": time.time()})


def state_callback(mor, curve=None):
    """A TrainerCallback writing ``mor_state.json`` into each checkpoint as it is saved."""
    from transformers import TrainerCallback

    class MoRStateCallback(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not ck.is_dir():
                return
            with mor._lock:
                data = {"step": state.global_step, "rounds_ok": mor.rounds_ok, "rounds_failed": mor.rounds_failed,
                        "attempts_failed": mor.attempts_failed, "unscored": mor.unscored,
                        "abstained": getattr(mor, "abstained", 0),
                        "history": list(mor.history), "curve_points": list(curve.points) if curve else []}
            atomic_write_text(ck / MOR_STATE, json.dumps(data, default=float))

    return MoRStateCallback()


def restore(checkpoint: Path, mor, curve=None) -> dict:
    """Load ``mor_state.json`` of ``checkpoint`` into the reward (counters, history) and the accuracy curve."""
    data = json.loads((Path(checkpoint) / MOR_STATE).read_text())
    with mor._lock:
        for k in ("rounds_ok", "rounds_failed", "attempts_failed", "unscored", "abstained"):
            setattr(mor, k, int(data.get(k, 0)))
        mor.history = list(data.get("history", []))
    if curve is not None:
        curve.points = list(data.get("curve_points", []))
    return data


__all__ = ["MOR_STATE", "ResumePlan", "mark_complete", "plan", "read_state", "restore", "run_key", "save_router",
           "state_callback"]
