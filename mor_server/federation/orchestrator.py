"""Rounds: who takes part, what is sent, how long the server waits, and what is recorded.

:class:`RoundOrchestrator` starts scoring rounds (``plain``, ``dp``) and the baselines' training rounds over the open
sessions, gathers the reports the servicer accepted, and accounts every round once (metrics, registry counters, one
signed audit entry). Secure-aggregation rounds run the same gathering stage by stage
(:class:`~.secagg_transport.SecAggTransport`). Never raises for client behaviour: a failed round is a
``RoundOutcome`` with state FAILED and a reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mor.types import ScoringItem
from mor.v1 import federation_pb2 as pb
from mor.wire import expected_scores, items_to_pb, mode_to_pb, unflatten

from ..baselines.training_round import TrainingRound, TrainingSpec
from .config import dp_score_bound
from .rounds import PAYLOAD_FOR_MODE, Round, RoundOutcome, RoundState

log = logging.getLogger("mor.server")


@dataclass
class _Pending:
    round: Round
    items: list
    changed: asyncio.Event
    mode: str
    dp: tuple[float, float] | None = None
    task_digest: str = ""
    score_bound: float = math.inf



class RoundOrchestrator:
    """The rounds of :class:`~mor_server.federation.server.FederationServer` (its ``book``, ``_pending``,
    ``_conns`` and audit writer)."""

    def online_clients(self, mode: str | None = None) -> list[str]:
        return [c for c in self.registry.online(mode) if c in self._conns]

    async def _wait_until(self, who, n: int, timeout: float, what: str) -> list[str]:
        """Wait until ``who()`` lists at least ``n`` clients; raises TimeoutError naming who is there (``what``
        describes them: "clients online")."""
        end = self._clock() + timeout
        while len(who()) < n:
            remaining = end - self._clock()
            if remaining <= 0:
                raise TimeoutError(f"only {len(who())} of {n} {what} after {timeout:.0f} s: {who()}")
            try:
                await asyncio.wait_for(self._online_changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        return who()

    async def wait_for_clients(self, n: int, timeout: float = 30.0, mode: str | None = None) -> list[str]:
        """Wait until at least ``n`` clients are online (supporting ``mode``); raises TimeoutError naming who is."""
        return await self._wait_until(lambda: self.online_clients(mode), n, timeout, "clients online")

    def new_round_id(self) -> str:
        return f"r{next(self._round_seq):06d}-{secrets.token_hex(4)}"

    async def run_round(self, items: Sequence[ScoringItem], *, participants: Sequence[str] | None = None,
                        mode: str = "plain", min_clients: int | None = None, timeout: float = 30.0,
                        dp_clip: float = 1.0, dp_noise_multiplier: float = 1.0,
                        round_id: str | None = None) -> RoundOutcome:
        """Send one scoring task and gather reports. Never raises for client behaviour: a failed round comes back as
        a RoundOutcome with state FAILED and a reason. For ``plain``, ``reports[c]`` is the flat score list, for
        ``dp`` ``{"scores": [...], "epsilon": ...}``; use :meth:`scores_by_client` for per-item lists. (Its
        ``aggregate`` is empty: that field is for SecAgg+ rounds.)"""
        if mode not in PAYLOAD_FOR_MODE:
            raise ValueError(f"run_round supports modes {sorted(PAYLOAD_FOR_MODE)}; got {mode!r} "
                             "(secure aggregation runs through run_secagg_round)")
        self._check_items(items)
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        round_id = round_id or self.new_round_id()
        now = self._clock()
        chosen = tuple(participants) if participants is not None else tuple(self.online_clients(mode))
        min_clients = len(chosen) if min_clients is None else min_clients
        self.metrics.rounds_started.labels(mode=mode).inc()
        if len(chosen) < max(min_clients, 1):
            return self._fail_early(round_id, mode, chosen, now,
                                    f"{len(chosen)} clients online for mode {mode!r}, min_clients={min_clients}")
        rnd = Round(round_id, chosen, min_clients, now + timeout + self.config.deadline_grace_s, now,
                    expected_scores(items), mode)
        pending = _Pending(rnd, list(items), asyncio.Event(), mode,
                           (dp_clip, dp_noise_multiplier) if mode == "dp" else None)
        pending.score_bound = (dp_score_bound(dp_clip, dp_noise_multiplier, expected_scores(items)) if mode == "dp"
                               else float(self.config.max_abs_score))
        task = pb.ScoringTask(round_id=round_id, items=items_to_pb(items), timeout_ms=int(timeout * 1000),
                              mode=mode_to_pb(mode), score_bound=pending.score_bound)
        if mode == "dp":
            task.dp.CopyFrom(pb.DpParams(clip=dp_clip, noise_multiplier=dp_noise_multiplier))
        pending.task_digest = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        msg = pb.ServerMessage(task=task)
        try:
            outcome = await self._gather(rnd, pending, {c: msg for c in chosen})
        except asyncio.CancelledError:
            self._on_cancelled(rnd.outcome, mode, task_digest=pending.task_digest)
            raise
        self._account(outcome, mode, task_digest=pending.task_digest,
                      extra={"dp": {"clip": dp_clip, "noise_multiplier": dp_noise_multiplier}} if mode == "dp" else None)
        await self._audit_flush()
        return outcome

    async def _gather(self, rnd: Round, pending: _Pending, sends: dict[str, pb.ServerMessage]) -> RoundOutcome:
        """Send each participant its message and wait until all answered or dropped, or the deadline."""
        key = rnd.round_id
        self.book.add(rnd)
        self._pending[key] = pending
        for c in rnd.participants:
            conn = self._conns.get(c)
            if conn is None or conn.closed or c not in sends:
                rnd.drop(c, "not connected")
            elif not self._send_to(conn, sends[c]):
                rnd.drop(c, "not reading its stream")
        try:
            while not rnd.settled:
                remaining = rnd.deadline - self._clock()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(pending.changed.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                pending.changed.clear()
        except asyncio.CancelledError as e:
            rnd.cancel(self._clock(), cancel_reason(e))
            raise
        finally:
            outcome = self.book.finish(key, self._clock())
            del self._pending[key]
        return outcome

    # -- training rounds of the parameter-sharing baselines (protocol revision 3, docs/protocol.md §9) ----------
    def online_trainers(self, method: str) -> list[str]:
        """Online clients that announced ``method`` in RegisterRequest.training_methods and speak revision 3."""
        from mor.training import TRAINING_REVISION

        return [c for c in self.online_clients() if method in self._training_methods.get(c, ())
                and self._conns[c].revision >= TRAINING_REVISION]

    async def wait_for_trainers(self, n: int, method: str, timeout: float = 30.0) -> list[str]:
        """Wait until at least ``n`` clients can train ``method``; raises TimeoutError naming who can."""
        return await self._wait_until(lambda: self.online_trainers(method), n, timeout,
                                      f"clients online that train {method!r}")

    async def run_training_round(self, params, method: str, hparams: dict | None = None, *,
                                 update_names: Sequence[str] | None = None, participants: Sequence[str] | None = None,
                                 min_clients: int | None = None, timeout: float = 600.0, value_bound: float = 1e4,
                                 max_num_examples: int = 10_000_000, round_id: str | None = None) -> RoundOutcome:
        """One training round of a parameter-sharing baseline: broadcast ``params`` (name -> float32 array) with
        the method and local-training ``hparams`` (:data:`mor.training.HPARAM_DEFAULTS`), gather each
        participant's validated update. ``update_names``: the tensors clients send back (default: all). Like
        :meth:`run_round` it never raises for client behaviour: ``outcome.reports[c]`` is a
        :class:`~mor_server.baselines.training_round.ClientUpdate` (tensors, num_examples, epsilon, digest); a
        failed round has state FAILED and a reason. Recorded in the audit log (digests and counts, never the
        tensors) and the round metrics under mode ``train:<method>``."""
        from mor.training import hparams_to_pb, tensors_to_pb

        params = {n: np.asarray(v, dtype=np.float32) for n, v in params.items()}
        spec = TrainingSpec(method, {n: tuple(v.shape) for n, v in params.items()},
                            tuple(update_names) if update_names is not None else tuple(sorted(params)),
                            float(value_bound), int(max_num_examples))
        hp = hparams_to_pb(hparams or {})
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        task = pb.TrainingTask(round_id=round_id or self.new_round_id(), method=method,
                               parameters=tensors_to_pb(params), update_names=list(spec.update_names), hparams=hp,
                               timeout_ms=int(timeout * 1000), value_bound=spec.value_bound,
                               max_num_examples=spec.max_num_examples)
        limit = self.config.max_message_bytes
        size = pb.ServerMessage(training_task=task).ByteSize()
        if size > limit:
            raise ValueError(f"the training task is {size} bytes, over max_message_bytes={limit}: raise "
                             "ServerConfig.max_message_bytes (clients must raise their receive limit too) or train "
                             "fewer tensors")
        if spec.update_bytes + 64 * len(spec.update_names) + 1024 > limit:
            raise ValueError(f"an update of {spec.update_bytes} tensor bytes would exceed max_message_bytes={limit}")
        round_id, mode, now = task.round_id, f"train:{method}", self._clock()
        chosen = tuple(participants) if participants is not None else tuple(self.online_trainers(method))
        min_clients = len(chosen) if min_clients is None else min_clients
        self.metrics.rounds_started.labels(mode=mode).inc()
        if len(chosen) < max(min_clients, 1):
            return self._fail_early(round_id, mode, chosen, now,
                                    f"{len(chosen)} clients online that train {method!r}, min_clients={min_clients}")
        rnd = TrainingRound(round_id, chosen, min_clients, now + timeout + self.config.deadline_grace_s, now, 0,
                            mode, spec=spec)
        pending = _Pending(rnd, [], asyncio.Event(), mode)
        pending.task_digest = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        able = set(self.online_trainers(method))
        for c in chosen:
            if c in self._conns and c not in able:
                rnd.drop(c, f"does not train {method} (training_methods / protocol revision)")
        msg = pb.ServerMessage(training_task=task)
        try:
            outcome = await self._gather(rnd, pending, {c: msg for c in chosen if c in able})
        except asyncio.CancelledError:
            self._on_cancelled(rnd.outcome, mode, task_digest=pending.task_digest)
            raise
        h = {("public_seed" if f.name == "seed" else f.name): v for f, v in hp.ListFields()}  # public: in the task
        self._account(outcome, mode, task_digest=pending.task_digest, extra={
            "method": method, "hparams": h, "broadcast_tensors": len(params), "broadcast_bytes": size,
            "update_names": len(spec.update_names), "update_bytes": spec.update_bytes,
            "epsilon_total": {c: u.epsilon for c, u in outcome.reports.items()},
            "updates": {c: {"num_examples": u.num_examples, "sha256": u.digest, "bytes": u.bytes,
                            "train_loss": u.loss} for c, u in outcome.reports.items()}})
        await self._audit_flush()
        return outcome

    def _on_cancelled(self, outcome: RoundOutcome, mode: str, *, task_digest: str = "",
                      extra: dict | None = None) -> None:
        """A round task was cancelled (its caller gave up, or the server stops): it is recorded as failed with the
        reason, and every participant still connected is told to stop working on it."""
        self.metrics.rounds_cancelled.labels(mode=mode).inc()
        self._account(outcome, mode, task_digest=task_digest, extra=extra)
        self._audit_wait()
        note = pb.ServerMessage(cancelled=pb.RoundCancelled(round_id=outcome.round_id, reason=outcome.reason[:500]))
        for c in outcome.participants:
            conn = self._conns.get(c)
            if conn is not None:
                self._send_to(conn, note)

    def _check_items(self, items: Sequence[ScoringItem]) -> None:
        if not items:
            raise ValueError("a scoring task needs at least one item")
        if len(items) > self.config.max_items_per_task:
            raise ValueError(f"{len(items)} items exceed max_items_per_task={self.config.max_items_per_task}; "
                             "split the batch")
        for i, it in enumerate(items):
            if not it.candidates or len(it.candidates) > self.config.max_candidates_per_item:
                raise ValueError(f"items[{i}] has {len(it.candidates)} candidates; allowed 1.."
                                 f"{self.config.max_candidates_per_item}")

    def _fail_early(self, round_id, mode, chosen, now, reason) -> RoundOutcome:
        outcome = RoundOutcome(round_id, RoundState.FAILED, tuple(chosen), (), {}, {}, reason, now, now)
        self._account(outcome, mode)
        self._audit_wait()
        return outcome

    def _account(self, outcome: RoundOutcome, mode: str, *, task_digest: str = "", extra: dict | None = None) -> None:
        m = self.metrics
        (m.rounds_completed if outcome.ok else m.rounds_failed).labels(mode=mode).inc()
        m.round_latency.labels(mode=mode).observe(outcome.latency)
        for c, why in outcome.dropped.items():
            m.count_dropout(why)
            info = self.registry.get(c)
            if info:
                info.dropouts += 1
        for c in outcome.responders:
            info = self.registry.get(c)
            if info:
                info.rounds_answered += 1
        eps = {c: r["epsilon"] for c, r in outcome.reports.items() if isinstance(r, dict) and "epsilon" in r}
        self._audit("round", {"round_id": outcome.round_id, "mode": mode, "state": outcome.state.value,
                              "participants": list(outcome.participants), "responders": list(outcome.responders),
                              "dropouts": outcome.dropped, "reason": outcome.reason,
                              "latency_s": round(outcome.latency, 6), "task_digest": task_digest,
                              "epsilon_total": eps, **(extra or {})})
        if not outcome.ok:
            log.warning("round %s failed: %s", outcome.round_id, outcome.reason)

    @staticmethod
    def scores_by_client(outcome: RoundOutcome, items: Sequence[ScoringItem]) -> dict[str, list[list[float]]]:
        """Per-client, per-item score lists of a completed plain or dp round."""
        out = {}
        for c, payload in outcome.reports.items():
            flat = payload["scores"] if isinstance(payload, dict) else payload
            out[c] = unflatten(flat, items)
        return out


def cancel_reason(e: BaseException) -> str:
    why = e.args[0] if e.args and isinstance(e.args[0], str) else "abandoned by its caller"
    return f"cancelled: {why}"

