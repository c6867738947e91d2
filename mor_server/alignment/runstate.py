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
from dataclasses import asdict, dataclass
from pathlib import Path

from privacy.fsutil import atomic_write_text, replace_dir, staging_dir
from .grpo import discard_incomplete_checkpoints, latest_checkpoint

STATE_FILE = "run.json"
MOR_STATE = "mor_state.json"
_NOT_SEMANTIC = ("output_dir", "progress", "save_steps", "save_total_limit", "logging_steps")
_CONFIG_FIELDS = ("seed", "objective", "w_mix", "w_format", "w_length", "reward_shaping", "typed_answers", "top_k",
                  "router_hidden", "router_steps", "router_rank_weight", "calibration_purpose", "answer_vocabulary",
                  "policy_path", "adapter_path", "resume_key", "routing")


def _file_digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def run_key(cfg, ref_dir: Path, *, sizes: dict) -> str:
    """Digest of what a resumed GRPO run must share with the interrupted one (``cfg`` is an AlignmentConfig)."""
    grpo = {k: v for k, v in asdict(cfg.grpo).items() if k not in _NOT_SEMANTIC}
    weights = [p for p in Path(ref_dir).glob("*.safetensors")] or [p for p in Path(ref_dir).glob("*.bin")]
    blob = {"grpo": grpo, "config": {k: getattr(cfg, k, None) for k in _CONFIG_FIELDS}, "sizes": sizes,
            "reference": _file_digest(weights) if weights else None, "v": 1}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


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


def plan(work: Path, key: str, resume) -> ResumePlan:
    """Decide how a run with ``key`` starts. ``resume``: False (always fresh), "auto" (continue a matching,
    unfinished run if there is one) or True (continue one, or raise FileNotFoundError saying why not)."""
    work = Path(work)
    grpo = work / "grpo"
    state = read_state(work)
    why = None
    if not resume:
        why = "resume is off"
    elif state is None:
        why = f"no {STATE_FILE} in {grpo}"
    elif state.get("key") != key:
        why = "the settings, reference policy or reward models differ from the interrupted run's"
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
    _write_state(work, {"key": key, "router": False, "complete": False, "started": time.time()})
    return ResumePlan(None, False, [], why)


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
