"""The training rounds' wire contract (protocol revision 3, docs/protocol.md §9), shared by client and server.

The server broadcasts named float32 tensors (``mor.v1.Tensor``: name, shape, dtype ``"float32"``, raw
little-endian bytes, row-major) in a ``TrainingTask``; a client answers with a ``ParameterUpdate`` holding its trained
values of the tensors named in ``update_names`` and its example count. This module holds what both sides share:
the methods, the tensor codec, the validation of a tensor set against the expected names and shapes (every problem
names its field, like the score report checks) and the local-training hyper-parameters. Torch-free. The client's
side (the trainer types and the task handler) is :mod:`mor_client.training`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

METHODS = ("fedit", "stack", "ffa", "fedcmp")
"""Parameter-sharing methods a training round can run (docs/baselines.md)."""
DTYPE = "float32"
"""The only tensor dtype of the wire contract: IEEE-754 binary32, little-endian."""
OBJECTIVES = ("sft", "dpo")
MAX_TENSORS = 4096
"""At most this many tensors in one task or update."""
MAX_NAME_BYTES = 512
MAX_RANK = 8

_LE_F32 = np.dtype("<f4")


class TensorProblem(ValueError):
    """A tensor set that does not match what was expected; ``field`` is the offending field path."""

    def __init__(self, field_path: str, message: str):
        super().__init__(message)
        self.field = field_path
        self.message = message


# ------------------------------------------------------------------------------------------------ tensor codec
def encode_tensor(name: str, value) -> dict:
    """``{name, shape, dtype, data}`` of one tensor (the fields of ``mor.v1.Tensor``)."""
    a = np.ascontiguousarray(np.asarray(value, dtype=np.float64).astype(_LE_F32))
    return {"name": name, "shape": [int(s) for s in a.shape], "dtype": DTYPE, "data": a.tobytes(order="C")}


def tensors_to_pb(tensors: Mapping[str, np.ndarray]):
    """A list of ``mor.v1.Tensor`` messages, in name order."""
    from mor.v1 import federation_pb2 as pb

    return [pb.Tensor(**encode_tensor(n, tensors[n])) for n in sorted(tensors)]


def decode_tensors(tensors: Sequence, expected: Mapping[str, Sequence[int]] | None, field_prefix: str, *,
                   value_bound: float = math.inf, exact: bool = True) -> dict[str, np.ndarray]:
    """Decode and check a repeated ``Tensor`` field (any objects with ``name``, ``shape``, ``dtype``, ``data``).

    ``expected``: name -> shape; with ``exact`` every expected name must be present once and nothing else (None:
    any names, shapes as declared). Every problem raises :class:`TensorProblem` naming the field, e.g.
    ``report.update.tensors[2].data``: unknown, duplicate or missing names, a dtype other than float32, a shape that
    differs from the expected one, a byte length other than 4 * product(shape), NaN/inf, |value| > value_bound.
    Returns name -> float32 array (native byte order, a copy)."""
    if len(tensors) > MAX_TENSORS:
        raise TensorProblem(field_prefix, f"{field_prefix} has {len(tensors)} tensors; at most {MAX_TENSORS}")
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(tensors):
        f = f"{field_prefix}[{i}]"
        name = t.name
        if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise TensorProblem(f"{f}.name", f"{f}.name is empty or longer than {MAX_NAME_BYTES} bytes")
        if name in out:
            raise TensorProblem(f"{f}.name", f"{f}.name {name!r} appears twice")
        if expected is not None and name not in expected:
            raise TensorProblem(f"{f}.name", f"{f}.name {name!r} is not a tensor of this round; expected one of "
                                             f"{sorted(expected)[:8]}{' ...' if len(expected) > 8 else ''}")
        if t.dtype != DTYPE:
            raise TensorProblem(f"{f}.dtype", f"{f}.dtype is {t.dtype!r}; only {DTYPE!r} (IEEE-754 binary32, "
                                              "little-endian) is accepted")
        shape = tuple(int(s) for s in t.shape)
        if len(shape) > MAX_RANK:
            raise TensorProblem(f"{f}.shape", f"{f}.shape has rank {len(shape)}; at most {MAX_RANK}")
        if expected is not None and shape != tuple(int(s) for s in expected[name]):
            raise TensorProblem(f"{f}.shape", f"{f}.shape is {list(shape)}; tensor {name!r} has shape "
                                              f"{list(expected[name])}")
        n = math.prod(shape)
        if len(t.data) != 4 * n:
            raise TensorProblem(f"{f}.data", f"{f}.data has {len(t.data)} bytes; shape {list(shape)} of float32 "
                                             f"needs exactly {4 * n}")
        a = np.frombuffer(bytes(t.data), dtype=_LE_F32).astype(np.float32).reshape(shape)
        bad = ~np.isfinite(a)
        if bad.any():
            j = int(np.flatnonzero(bad.reshape(-1))[0])
            raise TensorProblem(f"{f}.data", f"{f}.data element {j} of {name!r} is {a.reshape(-1)[j]}; values "
                                             "must be finite")
        if a.size and math.isfinite(value_bound):
            big = np.abs(a) > value_bound
            if big.any():
                j = int(np.flatnonzero(big.reshape(-1))[0])
                raise TensorProblem(f"{f}.data", f"{f}.data element {j} of {name!r} is {a.reshape(-1)[j]:g}, "
                                                 f"outside the task's value_bound {value_bound:g}")
        out[name] = a
    if expected is not None and exact:
        missing = sorted(set(expected) - set(out))
        if missing:
            raise TensorProblem(field_prefix, f"{field_prefix} lacks tensor {missing[0]!r}"
                                              f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                                              "send exactly the tensors the task names")
    return out


# --------------------------------------------------------------------------------------------- hyper-parameters
HPARAM_DEFAULTS = {
    # FLORA's reference settings (github dphuongn/FLoRA): Adam(W) lr 5e-5, betas (0.9, 0.98), eps 1e-6, wd 0.2
    "learning_rate": 5e-5, "local_epochs": 1, "batch_size": 16, "epsilon": math.inf, "delta": 1e-5,
    "max_grad_norm": 1.0, "total_rounds": 1, "round_index": 0, "seed": 0, "weight_decay": 0.2,
    "adam_beta1": 0.9, "adam_beta2": 0.98, "adam_eps": 1e-6, "lora_alpha": 64.0, "objective": "sft",
    "dpo_beta": 0.1,
}


def check_hparams(h: Mapping) -> dict:
    """Complete ``h`` with :data:`HPARAM_DEFAULTS` and check it; raises ValueError naming the key."""
    unknown = sorted(set(h) - set(HPARAM_DEFAULTS))
    if unknown:
        raise ValueError(f"hparams: unknown key {unknown[0]!r}; known: {sorted(HPARAM_DEFAULTS)}")
    out = {**HPARAM_DEFAULTS, **h}
    for k in ("learning_rate", "max_grad_norm", "lora_alpha", "adam_eps", "dpo_beta"):
        if not (isinstance(out[k], (int, float)) and math.isfinite(out[k]) and out[k] > 0):
            raise ValueError(f"hparams.{k}: must be a finite number > 0, got {out[k]!r}")
    for k in ("local_epochs", "batch_size", "total_rounds"):
        if int(out[k]) != out[k] or out[k] < 1:
            raise ValueError(f"hparams.{k}: must be an integer >= 1, got {out[k]!r}")
    if int(out["round_index"]) != out["round_index"] or out["round_index"] < 0:
        raise ValueError(f"hparams.round_index: must be an integer >= 0, got {out['round_index']!r}")
    if not (out["epsilon"] > 0 or out["epsilon"] == 0):
        raise ValueError(f"hparams.epsilon: must be > 0, 0 or inf (0 and inf: no DP), got {out['epsilon']!r}")
    if not 0 < out["delta"] < 1:
        raise ValueError(f"hparams.delta: must be in (0, 1), got {out['delta']!r}")
    if not 0 <= out["weight_decay"] < 10 or not 0 <= out["adam_beta1"] < 1 or not 0 <= out["adam_beta2"] < 1:
        raise ValueError("hparams: weight_decay must be in [0, 10), adam_beta1/adam_beta2 in [0, 1)")
    if out["objective"] not in OBJECTIVES:
        raise ValueError(f"hparams.objective: must be one of {OBJECTIVES}, got {out['objective']!r}")
    for k in ("local_epochs", "batch_size", "total_rounds", "round_index", "seed"):
        out[k] = int(out[k])
    return out


_ZERO_IS_VALUE = ("round_index", "seed", "weight_decay", "adam_beta1", "adam_beta2")


def hparams_to_pb(h: Mapping):
    from mor.v1 import federation_pb2 as pb

    h = check_hparams(h)
    return pb.TrainingHyperParameters(**{k: (math.inf if k == "epsilon" and h[k] == 0 else h[k]) for k in h})


def hparams_from_pb(msg) -> dict:
    """The hyper-parameters of a TrainingTask, defaults for unset fields; raises ValueError naming the field."""
    h = {}
    for k, default in HPARAM_DEFAULTS.items():
        v = getattr(msg, k)
        # proto3 cannot tell 0 from unset: where 0 is not a valid value, unset means the default
        h[k] = v if (v or k in _ZERO_IS_VALUE) else default
    if h["epsilon"] == 0:
        h["epsilon"] = math.inf
    return check_hparams(h)


def is_private(h: Mapping) -> bool:
    return math.isfinite(float(h.get("epsilon", math.inf))) and float(h.get("epsilon", 0)) > 0


TRAINING_REVISION = 3
"""The protocol revision that introduced training rounds: the server sends TrainingTasks only to sessions at it."""
