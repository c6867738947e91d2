"""Training rounds of the parameter-sharing baselines, the client's side (protocol revision 3, docs/protocol.md §9).

A client loads the broadcast tensors into its local copy of the policy, trains on its private data and answers
with its trained values (the codec and the checks both sides share are in :mod:`mor.training`). This module holds
the types a client-side trainer implements (:class:`Trainer`), the SDK's handler of a ``TrainingTask`` and the
``join`` flags. The torch trainer of the built-in policy is :mod:`mor_client.baselines`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from mor.training import METHODS, TensorProblem, decode_tensors, hparams_from_pb, tensors_to_pb


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

