"""Secure-aggregation rounds over the sessions: SecAgg+ (privacy.secagg) carried stage by stage.

:class:`SecAggTransport` runs scoring rounds in ``secagg`` / ``secagg+dp`` (the server unmasks only the routed,
weighted sum) and the baselines' ``fedit`` / ``ffa`` training rounds under SecAgg+ (only the sample-weighted sum of
the updates). Both drive the one stage loop of :class:`privacy.secagg.StageLoop` over the orchestrator's gathering:
each stage is a round of its own in the round book (key ``<round id>/<stage>``) with its own deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Sequence

import numpy as np

from mor.modes import SECAGG_MODES
from mor.types import ScoringItem
from mor.v1 import federation_pb2 as pb
from mor.wire import items_to_pb, mode_to_pb
# imported here, never inside a round: the first SecAgg round must not pay the import on the event loop
from privacy.secagg import STAGES, SecAggAbort, SecAggServer, StageLoop, ddp

from ..baselines.training_round import TrainingSpec
from .orchestrator import _Pending, cancel_reason
from .rounds import Round, RoundOutcome, RoundState, stage_key

DEFAULT_VALUE_RANGE = 16.0
"""Scores are encoded in [-range, range] unless a round names another (``run_secagg_round(value_range=...)``); the
alignment engine's backend sets it from the calibration round in plain ``secagg``
(``mor_server.federation.backend.secagg_value_range``)."""


class SecAggTransport:
    """The secure-aggregation rounds of :class:`~mor_server.federation.server.FederationServer`."""

    async def _secagg_stages(self, sa, round_id: str, chosen: Sequence[str], alive: list[str], task, task_field: str,
                             *, timeout: float, stage_timeout: float, label_mode: str, dropped: dict[str, str]) -> str:
        """Drive a SecAgg+ round's stages over the sessions (:class:`privacy.secagg.StageLoop`, the one stage loop, for
        scoring and training rounds alike). The first stage's payloads ride in a copy of ``task`` (sent as ``ServerMessage.<task_field>``),
        every later stage in a SecAggMessage; each stage waits for its participants until its deadline (the first
        ``timeout``, the others ``stage_timeout``) and its survivors feed the next. Unmasking runs off the event
        loop. Fills ``dropped`` as clients drop; returns the abort reason ("" when the stages ran to the end).
        CancelledError propagates (the caller records the cancelled round)."""
        loop = StageLoop(sa)
        try:
            while not loop.done:
                i, stage, out = loop.index, loop.stage, loop.outgoing
                limit = timeout if i == 0 else stage_timeout
                if i == 0:
                    sends = {}
                    for c, payload in out.items():
                        t = type(task)()
                        t.CopyFrom(task)
                        t.secagg.CopyFrom(pb.SecAggMessage(round_id=round_id, stage=stage, payload=payload))
                        sends[c] = pb.ServerMessage(**{task_field: t})
                else:
                    sends = {c: pb.ServerMessage(secagg=pb.SecAggMessage(round_id=round_id, stage=stage,
                                                                          payload=payload))
                             for c, payload in out.items()}
                targets = tuple(c for c in alive if c in sends)
                rnd = Round(stage_key(round_id, stage), targets or tuple(alive[:1]) or tuple(chosen[:1]), 1,
                            self._clock() + limit + self.config.deadline_grace_s, self._clock(), 0, label_mode)
                if not targets:
                    raise SecAggAbort(f"no client left at stage {stage}")
                o = await self._gather(rnd, _Pending(rnd, [], asyncio.Event(), label_mode), sends)
                for c, why in o.dropped.items():
                    dropped.setdefault(c, f"{why} (stage {stage})")
                alive = list(o.responders)
                # unmasking is CPU work: off the event loop, so other rounds and sessions keep their deadlines
                await asyncio.to_thread(loop.advance, {c: o.reports[c] for c in o.responders})
        except SecAggAbort as e:
            return f"secure aggregation aborted: {e}"
        return ""

    async def run_secagg_round(self, items: Sequence[ScoringItem], *, weights: dict[str, Sequence[float]],
                               mode: str = "secagg", participants: Sequence[str] | None = None,
                               min_clients: int | None = None, timeout: float = 30.0,
                               value_range: float = DEFAULT_VALUE_RANGE,
                               weight_cap: float = 1.0, frac_bits: int = 16, out_of_range: str = "clip",
                               dp_noise_multiplier: float = 1.0, dp_min_survivors: int | None = None,
                               stage_timeout: float | None = None, round_id: str | None = None,
                               max_colluders: int | None = None) -> RoundOutcome:
        """One SecAgg+ round: every client multiplies its scores by its routing weight (one weight per item) and
        masks them; the server unmasks only the weighted sum ``aggregate["sum"]`` (flat, item-major; ``reports`` stays
        empty). The server
        never holds an individual client's score. ``mode="secagg+dp"`` adds distributed discrete-Gaussian noise
        calibrated to ``dp_min_survivors`` (default: the threshold) and charged to each client's ledger.

        ``timeout`` bounds the first stage (scoring + key advertisement); later stages get ``stage_timeout``
        (default: min(timeout, 10 s)). A silent client is a dropout, not a stall. ``max_colluders``: the colluding
        clients per neighbourhood the round tolerates (default: privacy.secagg.graph.default_colluders); clients
        refuse a round below their own minimum."""
        if mode not in SECAGG_MODES:
            raise ValueError(f"run_secagg_round runs secagg or secagg+dp, got {mode!r}")
        self._check_items(items)
        round_id = round_id or self.new_round_id()
        now = self._clock()
        chosen = tuple(sorted(participants if participants is not None else self.online_clients(mode)))
        self.metrics.rounds_started.labels(mode=mode).inc()
        if not chosen:
            return self._fail_early(round_id, mode, chosen, now, f"no client online supports mode {mode!r}")
        missing = [c for c in chosen if c not in weights]
        if missing:
            raise ValueError(f"weights has no entry for participants {missing}")
        sizes = [len(it.candidates) for it in items]
        m = sum(sizes)
        W = np.stack([np.repeat(np.asarray(weights[c], dtype=np.float64), sizes) for c in chosen]) if chosen else None
        if W is not None and W.shape[1] != m:
            raise ValueError(f"each weights entry needs one weight per item ({len(items)})")
        wdigest = hashlib.sha256(np.ascontiguousarray(W).tobytes() if W is not None else b"").hexdigest()
        try:
            kw = {}
            if mode == "secagg+dp":
                surv = dp_min_survivors or max(2, (len(chosen) + 1) // 2)
                kw = dict(dp_sigma=ddp.calibrate_sigma(dp_noise_multiplier, value_range=value_range,
                                                       weight_cap=weight_cap, frac_bits=frac_bits, m=m,
                                                       min_survivors=surv), dp_min_survivors=surv)
            sa = SecAggServer(round_id, chosen, vector_length=m, weights=W, value_range=value_range,
                              weight_cap=weight_cap, frac_bits=frac_bits, out_of_range=out_of_range,
                              max_colluders=max_colluders, **kw)
        except Exception as e:  # e.g. too few clients for a threshold, weights above the cap
            return self._fail_early(round_id, mode, chosen, now, f"secure aggregation could not start: {e}")
        threshold = sa.threshold
        min_clients = max(threshold, min_clients or threshold)
        if len(chosen) < min_clients:
            return self._fail_early(round_id, mode, chosen, now,
                                    f"{len(chosen)} clients online for {mode}; SecAgg+ needs at least {min_clients}")
        stage_timeout = stage_timeout or min(timeout, 10.0)
        dropped: dict[str, str] = {}
        task = pb.ScoringTask(round_id=round_id, items=items_to_pb(items), timeout_ms=int(timeout * 1000),
                              mode=mode_to_pb(mode), crl=self._crl.pem if self._crl else b"")
        task_digest = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        try:
            reason = await self._secagg_stages(sa, round_id, chosen, list(chosen), task, "task", timeout=timeout,
                                               stage_timeout=stage_timeout, label_mode=mode, dropped=dropped)
        except asyncio.CancelledError as e:  # abandoned by its caller: record it, tell the clients, stop
            self._on_cancelled(RoundOutcome(round_id, RoundState.FAILED, chosen, (), dropped, {}, cancel_reason(e),
                                            now, self._clock()), mode, task_digest=task_digest,
                               extra={"weights_digest": wdigest, "threshold": threshold})
            raise
        result = sa.result()
        end = self._clock()
        for c, stage in result.dropped.items():
            dropped.setdefault(c, f"dropped at stage {stage}" + (f": {sa.rejected[c]}" if c in sa.rejected else ""))
        ok = result.ok and len(result.survivors) >= min_clients
        if result.ok and not ok:
            reason = f"only {len(result.survivors)} survivors, min_clients={min_clients}"
        aggregate = {"sum": result.total.tolist(), "survivors": list(result.survivors),
                     "out_of_range": result.out_of_range} if ok else {}
        outcome = RoundOutcome(round_id, RoundState.COMPLETED if ok else RoundState.FAILED, chosen,
                               tuple(result.survivors) if ok else (), dropped, {},
                               reason or ("" if ok else result.reason), now, end, aggregate=aggregate)
        agg = {}
        if ok:
            total = np.asarray(result.total)
            agg = {"n": int(total.size), "mean": float(total.mean()), "std": float(total.std()),
                   "out_of_range_clipped": result.out_of_range}  # total only (masked); None in secagg+dp
        self._account(outcome, mode, task_digest=task_digest,
                      extra={"weights_digest": wdigest, "aggregate": agg, "threshold": threshold,
                             "max_colluders": sa.max_colluders,
                             "secagg_config_digest": sa.config_digest(), "rejected": dict(sa.rejected)})
        await self._audit_flush()
        return outcome

    async def run_secagg_training_round(self, params, method: str, hparams: dict | None = None, *,
                                        update_names: Sequence[str] | None = None,
                                        participants: Sequence[str] | None = None, min_clients: int | None = None,
                                        timeout: float = 600.0, stage_timeout: float | None = None,
                                        value_bound: float = 100.0, max_num_examples: int = 100_000,
                                        frac_bits: int = 16, round_id: str | None = None) -> RoundOutcome:
        """A training round of ``fedit`` or ``ffa`` under SecAgg+ (docs/protocol.md §9.5): each client trains, then
        masks [n_k * theta_k (every tensor of ``update_names``, flattened, in order), n_k]; the server unmasks only
        the sum, so it learns the sample-weighted average sum_k n_k theta_k / sum_k n_k and the total count, never a
        client's update. ``aggregate`` of a completed round: ``{"mean": {name: array}, "num_examples": total,
        "survivors": [...]}`` (``reports`` stays empty). Fixed point: 2^-frac_bits per coordinate of n_k theta_k; every value of a client's
        input must lie within value_bound * max_num_examples (else that client refuses: OUT_OF_RANGE)."""
        from mor.training import hparams_to_pb, tensors_to_pb

        if method not in ("fedit", "ffa"):
            raise ValueError(f"secure aggregation needs a weighted sum: fedit or ffa, not {method!r} (stack and "
                             "fedcmp need each client's update)")
        params = {n: np.asarray(v, dtype=np.float32) for n, v in params.items()}
        spec = TrainingSpec(method, {n: tuple(v.shape) for n, v in params.items()},
                            tuple(update_names) if update_names is not None else tuple(sorted(params)),
                            float(value_bound), int(max_num_examples))
        hp = hparams_to_pb(hparams or {})
        round_id = round_id or self.new_round_id()
        mode, now = f"train:{method}", self._clock()
        chosen = tuple(sorted(participants if participants is not None else self.online_trainers(method)))
        self.metrics.rounds_started.labels(mode=mode).inc()
        if not chosen:
            return self._fail_early(round_id, mode, chosen, now, f"no client online trains {method!r}")
        sizes = [int(np.prod(spec.shapes[n])) for n in spec.update_names]
        m = sum(sizes) + 1
        try:
            sa = SecAggServer(round_id, chosen, vector_length=m, value_range=spec.value_bound * spec.max_num_examples,
                              frac_bits=frac_bits, mod_bits=64, out_of_range="error")
        except Exception as e:
            return self._fail_early(round_id, mode, chosen, now, f"secure aggregation could not start: {e}")
        min_clients = max(sa.threshold, min_clients or sa.threshold)
        if len(chosen) < min_clients:
            return self._fail_early(round_id, mode, chosen, now,
                                    f"{len(chosen)} clients online train {method}; SecAgg+ needs at least {min_clients}")
        task = pb.TrainingTask(round_id=round_id, method=method, parameters=tensors_to_pb(params),
                               update_names=list(spec.update_names), hparams=hp, timeout_ms=int(timeout * 1000),
                               value_bound=spec.value_bound, max_num_examples=spec.max_num_examples,
                               mode=pb.PRIVACY_MODE_SECAGG, crl=self._crl.pem if self._crl else b"")
        if pb.ServerMessage(training_task=task).ByteSize() + 1024 > self.config.max_message_bytes:
            raise ValueError(f"the training task exceeds max_message_bytes={self.config.max_message_bytes}")
        task_digest = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        stage_timeout = stage_timeout or min(timeout, 10.0)
        dropped: dict[str, str] = {}
        able = set(self.online_trainers(method))
        for c in chosen:
            if c in self._conns and c not in able:
                dropped[c] = f"does not train {method} (training_methods / protocol revision)"
                sa.mark_dropout(c, STAGES[0])
        try:
            reason = await self._secagg_stages(sa, round_id, chosen, [c for c in chosen if c not in dropped], task,
                                               "training_task", timeout=timeout, stage_timeout=stage_timeout,
                                               label_mode="secagg", dropped=dropped)
        except asyncio.CancelledError as e:
            self._on_cancelled(RoundOutcome(round_id, RoundState.FAILED, chosen, (), dropped, {}, cancel_reason(e),
                                            now, self._clock()), mode, task_digest=task_digest)
            raise
        result = sa.result()
        for c, stage in result.dropped.items():
            dropped.setdefault(c, f"dropped at stage {stage}" + (f": {sa.rejected[c]}" if c in sa.rejected else ""))
        ok = result.ok and len(result.survivors) >= min_clients
        aggregate = {}
        if ok:
            total = np.asarray(result.total, dtype=np.float64)
            count = float(total[-1])
            if not count >= 1:
                ok, reason = False, f"the unmasked example count is {count:g}"
            else:
                mean, k = {}, 0
                for n, size in zip(spec.update_names, sizes):
                    mean[n] = (total[k:k + size] / count).reshape(spec.shapes[n])
                    k += size
                aggregate = {"mean": mean, "num_examples": count, "survivors": list(result.survivors)}
        if result.ok and not ok and not reason:
            reason = f"only {len(result.survivors)} survivors, min_clients={min_clients}"
        outcome = RoundOutcome(round_id, RoundState.COMPLETED if ok else RoundState.FAILED, chosen,
                               tuple(result.survivors) if ok else (), dropped, {},
                               reason or ("" if ok else result.reason), now, self._clock(), aggregate=aggregate)
        h = {("public_seed" if f.name == "seed" else f.name): v for f, v in hp.ListFields()}  # public: in the task
        self._account(outcome, mode, task_digest=task_digest, extra={
            "method": method, "secagg": True, "hparams": h, "broadcast_tensors": len(params),
            "update_names": len(spec.update_names), "vector_length": m, "threshold": sa.threshold,
            "secagg_config_digest": sa.config_digest(), "rejected": dict(sa.rejected),
            "num_examples_total": aggregate.get("num_examples")})
        await self._audit_flush()
        return outcome

