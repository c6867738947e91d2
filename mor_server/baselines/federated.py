"""Run a parameter-sharing baseline as a real federation: R training rounds over the server's gRPC sessions (mTLS,
protocol revision 3), each aggregated with the rules of :mod:`mor_server.baselines.aggregation`, then the resulting
policy evaluated with :mod:`mor_server.alignment.evaluate`.

Server state per method (docs/baselines.md):

* ``fedit``: the LoRA adapters (A, B per ``o_proj``), initialised like peft (A kaiming-uniform, B = 0) from the
  run's seed; every round broadcasts them, clients train both, the server averages each tensor by sample share;
* ``ffa``: the same adapters, but A stays frozen at its init: clients return only B, the server averages B;
* ``stack``: the merged base weights of the adapted ``o_proj`` layers; every round broadcasts them with fresh
  adapters (seeded by the round), clients return (A_k, B_k), the server adds s·Σ p_k B_k A_k to the base;
* ``fedcmp``: the multimodal projector; clients return their trained projector, the server aggregates the
  differences ΔW_k = W_k − W with CRA + OPM (:class:`~mor_server.baselines.aggregation.CanonicalAggregator`).

The final policy is the warm start with the state applied as plain weights (adapters merged), so it is evaluated
exactly like MoR's aligned policy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from mor.training import METHODS, check_hparams

from . import aggregation as agg


@dataclass
class BaselineConfig:
    """One federated run of a parameter-sharing baseline."""

    method: str = "fedit"
    """fedit | stack | ffa (FLORA) or fedcmp (Fed-CMP)."""
    rounds: int = 3
    lora_rank: int = 2
    lora_alpha: float = 64.0
    """FLORA's reference: rank 2, lora_alpha 64 (a scaling of 32)."""
    hparams: dict = field(default_factory=dict)
    """Local training (keys of ``mor.training.HPARAM_DEFAULTS``); round_index and total_rounds are set per
    round from ``rounds``; ``epsilon`` is the example-level budget of the whole run (inf: no DP)."""
    min_clients: int | None = None
    """Fewest updates a round needs (None: every client that trains the method)."""
    participants: tuple[str, ...] | None = None
    timeout: float = 600.0
    seed: int = 0
    value_bound: float = 1e4
    cra: agg.CanonicalConfig = field(default_factory=agg.CanonicalConfig)
    """Fed-CMP's aggregation settings."""
    secagg: bool = False
    """fedit / ffa only: run each round under SecAgg+ (the server unmasks only sum_k n_k theta_k and sum_k n_k,
    never a client's update; docs/protocol.md §9.5). ``value_bound`` * ``max_num_examples`` is then the fixed-point
    range of each client's weighted input."""
    max_num_examples: int = 100_000

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.secagg and self.method not in ("fedit", "ffa"):
            raise ValueError(f"secagg needs a weighted sum (fedit or ffa); {self.method} needs each client's update")
        if int(self.rounds) != self.rounds or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if int(self.lora_rank) != self.lora_rank or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be an integer >= 1, got {self.lora_rank!r}")
        check_hparams({k: v for k, v in self.hparams.items() if k not in ("round_index", "total_rounds")})


@dataclass
class RoundRecord:
    index: int
    round_id: str
    ok: bool
    responders: tuple[str, ...]
    dropped: dict
    num_examples: dict
    epsilon: dict
    train_loss: dict
    update_bytes: int
    seconds: float
    reason: str = ""


class FederatedBaseline:
    """Server side of one baseline run. ``policy``: the warm-started policy (left unchanged)."""

    def __init__(self, policy, config: BaselineConfig):
        from mor_client.baselines import base_weights, lora_init, lora_modules, projector_state

        self.policy = policy
        self.config = cfg = config
        self._lora_init = lambda seed: lora_init(policy, cfg.lora_rank, seed)
        if cfg.method in ("fedit", "ffa"):
            self.state = self._lora_init(cfg.seed)
        elif cfg.method == "stack":
            self.state = base_weights(policy, lora_modules(policy))
        else:
            self.state = projector_state(policy)
        self.state = {n: np.asarray(v, np.float32) for n, v in self.state.items()}
        self.cra = agg.CanonicalAggregator(cfg.cra) if cfg.method == "fedcmp" else None
        self.history: list[RoundRecord] = []
        self.last_params: dict[str, np.ndarray] = {}
        self.last_updates: dict = {}

    # -- one round -------------------------------------------------------------------------------------------------
    def broadcast(self, index: int) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
        """The tensors of round ``index`` and the names clients send back."""
        m = self.config.method
        if m == "stack":  # fresh adapters every round, the same for every client (seeded by the run and round)
            fresh = self._lora_init(self.config.seed * 1_000_003 + index + 1)
            return {**self.state, **fresh}, tuple(sorted(fresh))
        if m == "ffa":
            return dict(self.state), tuple(sorted(n for n in self.state if ".lora_B." in n))
        return dict(self.state), tuple(sorted(self.state))

    def aggregate(self, params: Mapping[str, np.ndarray], updates: Mapping[str, object]) -> dict[str, np.ndarray]:
        """The new server state from the round's validated updates (client -> ClientUpdate), by the method's
        rule in :mod:`aggregation`; clients are taken in sorted order."""
        m, cfg = self.config.method, self.config
        clients = sorted(updates)
        tens = [updates[c].tensors for c in clients]
        counts = [updates[c].num_examples for c in clients]
        if m == "fedit":
            new = agg.fedit(tens, counts)
        elif m == "ffa":
            frozen = {n: v for n, v in params.items() if ".lora_A." in n}
            new = agg.ffa([{**frozen, **t} for t in tens], counts, frozen_a=frozen)
        elif m == "stack":
            delta = agg.stack(tens, counts, scaling=cfg.lora_alpha / cfg.lora_rank)
            new = {f"{mod}.weight": np.asarray(self.state[f"{mod}.weight"], np.float64) + d
                   for mod, d in delta.items()}
        else:
            deltas = [{n: np.asarray(t[n], np.float64) - np.asarray(params[n], np.float64) for n in t} for t in tens]
            new = self.cra.step({n: params[n] for n in deltas[0]}, deltas, counts)
        return {**self.state, **{n: np.asarray(v, np.float32) for n, v in new.items()}}

    def hparams_for(self, index: int) -> dict:
        return {**self.config.hparams, "round_index": index, "total_rounds": self.config.rounds,
                "lora_alpha": self.config.lora_alpha, "seed": int(self.config.hparams.get("seed", self.config.seed))}

    async def run_round(self, server, index: int) -> RoundRecord:
        cfg = self.config
        params, names = self.broadcast(index)
        t0 = time.perf_counter()
        if cfg.secagg:  # the server gets only the weighted average: that IS the new fedit / ffa state
            out = await server.run_secagg_training_round(
                params, cfg.method, self.hparams_for(index), update_names=names, participants=cfg.participants,
                min_clients=cfg.min_clients, timeout=cfg.timeout, value_bound=cfg.value_bound,
                max_num_examples=cfg.max_num_examples)
            if out.ok:
                self.last_params, self.last_updates = params, {}
                self.state = {**self.state, **{n: np.asarray(v, np.float32) for n, v in out.aggregate["mean"].items()}}
            rec = RoundRecord(index, out.round_id, out.ok, tuple(out.responders), dict(out.dropped),
                              {"(sum)": out.aggregate.get("num_examples")} if out.ok else {}, {}, {},
                              0, time.perf_counter() - t0, out.reason)
            self.history.append(rec)
            return rec
        out = await server.run_training_round(params, cfg.method, self.hparams_for(index), update_names=names,
                                              participants=cfg.participants, min_clients=cfg.min_clients,
                                              timeout=cfg.timeout, value_bound=cfg.value_bound,
                                              max_num_examples=cfg.max_num_examples)
        if out.ok:
            self.last_params, self.last_updates = params, dict(out.reports)
            self.state = self.aggregate(params, out.reports)
        rec = RoundRecord(index, out.round_id, out.ok, tuple(out.responders), dict(out.dropped),
                          {c: u.num_examples for c, u in out.reports.items()},
                          {c: u.epsilon for c, u in out.reports.items()},
                          {c: u.loss for c, u in out.reports.items()},
                          sum(u.bytes for u in out.reports.values()), time.perf_counter() - t0, out.reason)
        self.history.append(rec)
        return rec

    async def run(self, server) -> list[RoundRecord]:
        """All rounds; a failed round leaves the state unchanged and is recorded (never silently skipped)."""
        for r in range(self.config.rounds):
            await self.run_round(server, r)
        return self.history

    def run_sync(self, server_thread) -> list[RoundRecord]:
        """The same through a :class:`mor_server.federation.thread.ServerThread`."""
        for r in range(self.config.rounds):
            server_thread.call(self.run_round(server_thread.server, r),
                               self.config.timeout + server_thread.server.config.deadline_grace_s
                               + server_thread.margin_s, what="training round")
        return self.history

    # -- result ----------------------------------------------------------------------------------------------------
    def policy_model(self):
        """The warm start with the aggregated state applied as plain weights (adapters merged)."""
        from mor_client.baselines import apply_state

        return apply_state(self.policy, self.config.method, self.state, lora_alpha=self.config.lora_alpha)

    def summary(self) -> dict:
        ok = [h for h in self.history if h.ok]
        params, names = self.broadcast(0)
        eps = {}
        for h in ok:
            eps.update(h.epsilon)
        return {"method": self.config.method, "rounds": len(self.history), "completed": len(ok),
                "failed": len(self.history) - len(ok), "epsilon_per_client": eps,
                "update_bytes_per_round": [h.update_bytes for h in self.history],
                "update_bytes_per_client_per_round": sum(4 * int(np.prod(np.shape(v))) for n, v in params.items()
                                                         if n in names),
                "broadcast_bytes_per_round": sum(4 * int(np.prod(np.shape(v))) for v in params.values()),
                "server_sees": ("only the sample-weighted average of the updates and the total example count "
                                "(SecAgg+)" if self.config.secagg else "each client's update in the clear"),
                "config": {k: v for k, v in asdict(self.config).items() if k != "cra"},
                "history": [asdict(h) for h in self.history]}


def evaluate_policy(model, processor, examples: Sequence, **kw) -> dict:
    """Exact-match accuracy of a baseline's policy (overall, per domain, diversity): :func:`evaluate.accuracy`."""
    from mor_server.alignment.evaluate import accuracy

    return accuracy(model, processor, list(examples), **kw)


async def run_baseline(server, policy, processor, config: BaselineConfig, test_examples: Sequence = (), *,
                       wait_clients: int | None = None, wait_timeout: float = 60.0) -> dict:
    """Wait for the trainers, run every round, evaluate on ``test_examples`` (if any); returns the summary with
    ``accuracy`` and the baseline object under ``"baseline"``."""
    if wait_clients:
        await server.wait_for_trainers(wait_clients, config.method, wait_timeout)
    fb = FederatedBaseline(policy, config)
    t0 = time.perf_counter()
    await fb.run(server)
    out = fb.summary()
    out["train_seconds"] = time.perf_counter() - t0
    if test_examples:
        model = fb.policy_model()
        out["accuracy"] = await asyncio.to_thread(evaluate_policy, model, processor, test_examples)
    out["baseline"] = fb
    return out
