"""Training rounds of the parameter-sharing baselines (protocol revision 3, docs/protocol.md §9), torch-free.

The server broadcasts named float32 tensors (``mor.v1.Tensor``: name, shape, dtype ``"float32"``, raw
little-endian bytes, row-major) in a ``TrainingTask``; a client loads them into its local copy of the policy,
trains on its private data and answers with a ``ParameterUpdate`` holding its trained values of the tensors named in
``update_names`` and its example count. This module holds what both sides share: the tensor codec, the
validation of a tensor set against the expected names and shapes (every problem names its field, like the score
report checks), and the types a client-side trainer implements (:class:`Trainer`). The torch trainer of the built-in
policy is :mod:`mor_client.baselines`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

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


class TrainingRefused(Exception):
    """Raised by a trainer to decline a round (sent as a Refusal with a google.rpc.Code name)."""

    def __init__(self, code: str, reason: str, remaining_epsilon: float = float("nan")):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.remaining_epsilon = remaining_epsilon


@dataclass
class TrainingRequest:
    """One training round as a trainer sees it (decoded and validated)."""

    round_id: str
    method: str
    parameters: dict[str, np.ndarray]
    update_names: tuple[str, ...]
    hparams: dict
    timeout_s: float = 600.0


@dataclass
class TrainingResult:
    """What a trainer returns: its trained values of exactly ``update_names`` and the examples it trained on."""

    tensors: dict[str, np.ndarray]
    num_examples: int
    epsilon: float = math.inf
    loss: float = float("nan")
    info: dict = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    """A client-side trainer: ``methods`` it supports (announced at Register) and ``train(request)``."""

    methods: Sequence[str]

    def train(self, request: TrainingRequest) -> TrainingResult: ...


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


# ------------------------------------------------------------------------------------------ the SDK's handler
async def handle_training_task(client, task, send_q) -> None:
    """Answer one ``TrainingTask`` for a :class:`~mor_client.client.FederationClient` with a ``trainer``: decode
    and check the broadcast, run ``trainer.train`` in a worker thread under the task's deadline, check the result
    against the task (names, shapes, finiteness, value_bound) and send the ParameterUpdate, or a Refusal naming the
    reason. The client's audit log records what left (digest, sizes, example count, epsilon), never the values."""
    import asyncio
    import hashlib
    import logging

    from mor.v1 import federation_pb2 as pb

    from .release import Release

    log = logging.getLogger("mor.client")
    rid, method = task.round_id, task.method
    mode = f"train:{method}"

    def refuse(code: str, reason: str, remaining: float = float("nan")) -> None:
        rel = Release("refuse", code=code, reason=reason[:400], remaining_epsilon=remaining)
        client.audit_release(rid, mode, rel, n_items=0)
        log.info("training round %s refused: %s: %s", rid, code, reason)
        send_q.put_nowait(client.release_message(rid, rel))
        client.on_event("training", {"round_id": rid, "method": method, "release": "refuse", "code": code})

    trainer = client.trainer
    if trainer is None:
        return refuse("FAILED_PRECONDITION", "this client has no trainer: it only scores")
    if method not in tuple(trainer.methods):
        return refuse("FAILED_PRECONDITION", f"method {method!r} is not one this client trains "
                                             f"({list(trainer.methods)})")
    timeout = task.timeout_ms / 1000 if task.timeout_ms else 600.0
    secagg = task.mode == pb.PRIVACY_MODE_SECAGG
    if secagg:  # checked before training: a round this client cannot finish is refused at once
        problem = _secagg_precheck(client, task)
        if problem is not None:
            return refuse(*problem)
    elif task.mode not in (pb.PRIVACY_MODE_UNSPECIFIED, pb.PRIVACY_MODE_PLAIN):
        return refuse("FAILED_PRECONDITION", f"training rounds run in plain or secagg mode, not mode {task.mode}")
    try:
        params = decode_tensors(task.parameters, None, "task.parameters")
        names = tuple(task.update_names)
        if not names or len(set(names)) != len(names) or any(n not in params for n in names):
            raise ValueError("task.update_names must be distinct names of broadcast tensors, at least one")
        hp = hparams_from_pb(task.hparams)
    except ValueError as e:  # TensorProblem is a ValueError
        return refuse("INVALID_ARGUMENT", f"malformed training task: {e}")
    req = TrainingRequest(rid, method, params, names, hp, timeout)
    try:
        res = await asyncio.wait_for(asyncio.to_thread(trainer.train, req), timeout)
    except TrainingRefused as e:
        return refuse(e.code, e.reason, e.remaining_epsilon)
    except asyncio.TimeoutError:
        return refuse("DEADLINE_EXCEEDED", f"local training exceeded the {timeout:.1f} s deadline")
    except Exception as e:  # the institution's trainer: report, do not crash the session
        log.exception("trainer failed on round %s", rid)
        return refuse("INTERNAL", f"local trainer failed: {type(e).__name__}: {e}")
    bound = task.value_bound or math.inf
    try:
        missing = [n for n in names if n not in res.tensors]
        if missing:
            raise TensorProblem("update", f"the trainer returned no tensor {missing[0]!r}")
        tensors = tensors_to_pb({n: res.tensors[n] for n in names})
        decode_tensors(tensors, {n: params[n].shape for n in names}, "update", value_bound=bound)
        n_ex = int(res.num_examples)
        if n_ex < 1 or (task.max_num_examples and n_ex > task.max_num_examples):
            raise TensorProblem("num_examples", f"num_examples {n_ex} outside 1..{task.max_num_examples}")
    except (TensorProblem, TypeError, ValueError) as e:
        return refuse("INTERNAL", f"local trainer returned an update the task does not accept: {e}")
    if secagg:
        return await _secagg_update(client, task, {n: res.tensors[n] for n in names}, n_ex, send_q, refuse)
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.name.encode() + b"\0" + t.data)
    eps = float(res.epsilon) if res.epsilon is not None else math.inf
    if client.audit is not None:  # durably, before it leaves
        client.audit.append("release", {"round_id": rid, "mode": mode, "tensors": len(tensors),
                                        "bytes": sum(len(t.data) for t in tensors), "sha256": h.hexdigest(),
                                        "num_examples": n_ex, "epsilon_total": eps, "train_loss": res.loss})
    client.stats.reports += 1
    send_q.put_nowait(pb.ClientMessage(report=pb.ScoreReport(round_id=rid, update=pb.ParameterUpdate(
        tensors=tensors, num_examples=n_ex, epsilon_charged=eps,
        train_loss=res.loss if math.isfinite(res.loss) else 0.0))))
    log.info("training round %s answered: %s, %d tensors, %d examples", rid, method, len(tensors), n_ex)
    client.on_event("training", {"round_id": rid, "method": method, "release": "update", "examples": n_ex,
                                 "epsilon": eps})


# ------------------------------------------------------------------------------------------ mor-client join flags
class NoScorer:
    """A scorer for a client that only trains (``mor-client join --scorer mor_client.training:NoScorer``): every
    scoring task is refused (the SDK answers INTERNAL "local scorer failed"), training rounds are answered."""

    card = {"architecture": "none (parameter-sharing baseline client)", "parameter_count": 0}

    def score(self, items):
        raise RuntimeError("this client only answers training rounds (it has no reward model)")


def add_join_flags(j) -> None:
    """The ``mor-client join`` flags of the trainer (one argument group)."""
    from mor.cliargs import (csv_choices, device, existing_dir, float_range, non_negative_int, partition_name,
                             positive_int)

    g = j.add_argument_group("training rounds of the parameter-sharing baselines (docs/baselines.md)")
    g.add_argument("--train-policy", type=existing_dir, default=None,
                   help="the warm-started policy folder (the server's frozen reference, saved with save_pretrained): "
                        "with it this client answers training rounds (FLORA fedit/stack/ffa, Fed-CMP)")
    g.add_argument("--train-partition", default="client0", type=partition_name,
                   help="this institution's private split of the federation data (client0, client1, ...): SFT on "
                        "the chosen answers of its preference pairs")
    g.add_argument("--train-data-seed", type=non_negative_int, default=0, help="seed of the federation split")
    g.add_argument("--train-n-clients", type=positive_int, default=3, help="clients in the federation split")
    g.add_argument("--train-max-examples", type=positive_int, default=None,
                   help="train on at most this many of the partition's pairs")
    g.add_argument("--train-methods", default=",".join(METHODS), type=csv_choices(METHODS),
                   help="comma-separated methods this client trains")
    g.add_argument("--train-accountant", choices=("prv", "rdp"), default="prv",
                   help="how DP-SGD's noise is calibrated and recorded in --ledger")
    g.add_argument("--train-device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--train-max-epsilon", type=float_range(0, lo_open=True, allow_inf=True), default=None,
                   help="required with --train-policy: this client's example-level epsilon ceiling; any training "
                        "round that would take the --ledger's composed epsilon (reward models included) past it is "
                        "refused, whatever the server announces; 'inf' accepts any round, non-private ones included")


def trainer_from_args(args, ledger=None):
    """The PolicyTrainer that ``--train-policy`` asks for (None without it); ``ledger``: the join's --ledger."""
    if getattr(args, "train_policy", None) is None:
        return None
    from mor_client.baselines import PolicyTrainer, examples_from_pairs
    from mor_client.data import make_federation_split

    split = make_federation_split(seed=args.train_data_seed, n_clients=args.train_n_clients)
    if args.train_partition not in split.clients:
        from mor.cliargs import UsageError

        raise UsageError(f"--train-partition {args.train_partition!r} unknown; this split has "
                         f"{sorted(split.clients)}")
    methods = tuple(m.strip() for m in args.train_methods.split(",") if m.strip())
    if args.train_max_epsilon is None:  # fail closed: the server's announcement is not a ceiling
        from mor.cliargs import UsageError

        raise UsageError("--train-policy needs --train-max-epsilon EPS: the most example-level epsilon this client "
                         "lets training rounds spend (the server's announced epsilon is not a limit); 'inf' accepts "
                         "any round, non-private ones included")
    return PolicyTrainer.from_policy_dir(args.train_policy, examples_from_pairs(split.clients[args.train_partition]
                                                                                 .train),
                                         ledger=ledger, device=args.train_device, methods=methods,
                                         max_examples=args.train_max_examples, accountant=args.train_accountant,
                                         model_id=f"baseline-{args.train_partition}",
                                         max_epsilon=args.train_max_epsilon)


def _secagg_precheck(client, task):
    """``(code, reason)`` when this client cannot take part in a secagg training round, else None: secagg enabled
    with a SecAggSession, the task's setup stage present, the CRL accepted, the cohort on the pinned roster."""
    session = client.secagg_handler
    if session is None or "secagg" not in client.policy.supported_modes:
        return "FAILED_PRECONDITION", "secure aggregation (mode secagg) is not enabled on this client"
    if task.method not in ("fedit", "ffa"):
        return "INVALID_ARGUMENT", f"a secagg training round must be fedit or ffa (a weighted sum), not {task.method}"
    if not task.HasField("secagg"):
        return "INVALID_ARGUMENT", "secagg training task carries no setup stage (task.secagg)"
    from privacy import pki

    try:
        if task.crl:
            session.accept_crl(task.crl)
        elif getattr(session, "require_crl", False) and getattr(session, "_crl", None) is None:
            raise pki.PKIError("the task carries no CRL, so peers' revocation cannot be checked")
    except pki.PKIError as e:
        return "FAILED_PRECONDITION", f"revocation check: {e}"
    if session.membership is not None:
        from privacy.membership import MembershipError
        from privacy.secagg import SecAggError
        from privacy.secagg.messages import SetupConfig

        try:
            cohort = SetupConfig.from_bytes(bytes(task.secagg.payload), round_id=task.round_id).client_ids
            session.membership.check_cohort(cohort)
        except (MembershipError, SecAggError) as e:
            return "PERMISSION_DENIED", f"membership: {e}"
    return None


def secagg_input(tensors: Mapping[str, np.ndarray], names: Sequence[str], num_examples: int) -> np.ndarray:
    """The SecAgg+ input of a training round (docs/protocol.md §9.5): [n * every value of ``names`` in order,
    flattened row-major, ..., n]."""
    n = float(num_examples)
    return np.concatenate([n * np.asarray(tensors[k], np.float64).reshape(-1) for k in names] + [np.array([n])])


async def _secagg_update(client, task, tensors, n_ex, send_q, refuse) -> None:
    """Mask this client's weighted update in the SecAgg+ round of a secagg training task: the SDK's SecAggSession
    runs the stages (signed keys, survivor checks, query audit) exactly as for a scoring round."""
    from privacy.secagg import SecAggClient

    session = client.secagg_handler
    vec = secagg_input(tensors, list(task.update_names), n_ex)
    bound = task.value_bound * task.max_num_examples
    if not np.all(np.abs(vec) <= bound):
        return refuse("OUT_OF_RANGE", "the weighted update lies outside the round's value range")
    sc = SecAggClient(task.round_id, client.client_id, identity_key=session._key, verify_peer=session.verify_peer,
                      identity_proof=session.identity_proof, **session.knobs(client), ledger=None,
                      query_audit=session.query_audit, item_digests=None)
    sc.set_input(vec)
    session._rounds[task.round_id] = sc
    session._modes[task.round_id] = "secagg"
    await session._step(client, send_q, task.secagg)
    client.on_event("training", {"round_id": task.round_id, "method": task.method, "release": "secagg",
                                 "examples": n_ex})

