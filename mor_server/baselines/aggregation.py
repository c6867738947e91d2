"""Server-side aggregation rules of the parameter-sharing baselines, pure functions over named arrays.

A client update is a mapping ``name -> np.ndarray``; weights are the clients' sample counts (normalised here to
shares p_k = n_k / sum n). Nothing here imports torch or grpc: the federation moves flat float arrays and the
client-side trainers convert to and from tensors at the edge.

FLORA (LoRA adapters; for a module with adapter B (d_out x r) and A (r x d_in), the update is s·B·A with
s = lora_alpha / r):

* ``fedit``  – the public FLORA code's rule: every adapter tensor averaged separately,
  A' = sum p_k A_k, B' = sum p_k B_k. Not the average of the products: B'A' != sum p_k B_k A_k in general.
* ``stack``  – exact: the server merges delta W = s · sum_k p_k B_k A_k into the base weight and the clients
  re-initialise their adapters each round (FLoRA-stacking, arXiv 2409.05976). Needs each client's (A_k, B_k).
* ``ffa``    – A is frozen at a shared random init, only B is trained and averaged: B' = sum p_k B_k, so
  B'A = sum p_k B_k A exactly (FFA-LoRA, arXiv 2403.12313); a plain weighted sum, so it can run under SecAgg.

Fed-CMP (projector matrices; update dW_k = W_k - W for each matrix, see :class:`CanonicalAggregator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

Update = Mapping[str, np.ndarray]


class AggregationError(ValueError):
    """An update that cannot be aggregated (missing tensor, shape mismatch, bad weight); names the field."""


def sample_shares(sample_counts: Sequence[float]) -> np.ndarray:
    """p_k = n_k / sum n, checked: finite, non-negative, positive total."""
    n = np.asarray(sample_counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise AggregationError("sample_counts: need one count per client")
    if not np.all(np.isfinite(n)) or np.any(n < 0) or n.sum() <= 0:
        raise AggregationError(f"sample_counts: must be finite, >= 0 and not all 0, got {n.tolist()}")
    return n / n.sum()


def _check_same_keys(updates: Sequence[Update]) -> list[str]:
    if not updates:
        raise AggregationError("updates: no client update to aggregate")
    names = sorted(updates[0])
    for k, u in enumerate(updates):
        if sorted(u) != names:
            missing = sorted(set(names) - set(u)) or sorted(set(u) - set(names))
            raise AggregationError(f"updates[{k}]: tensor names differ from client 0's (e.g. {missing[0]!r})")
        for name in names:
            a = np.asarray(u[name])
            if a.shape != np.shape(updates[0][name]):
                raise AggregationError(f"updates[{k}][{name!r}]: shape {a.shape}, expected "
                                       f"{np.shape(updates[0][name])}")
            if not np.all(np.isfinite(a)):
                raise AggregationError(f"updates[{k}][{name!r}]: contains NaN or inf")
    return names


def weighted_average(updates: Sequence[Update], sample_counts: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_k p_k u_k for every named tensor (FedAvg; FLORA's `fedit` when the tensors are LoRA A and B)."""
    names = _check_same_keys(updates)
    p = sample_shares(sample_counts)
    if len(p) != len(updates):
        raise AggregationError(f"sample_counts: {len(p)} counts for {len(updates)} updates")
    return {n: sum(pk * np.asarray(u[n], dtype=np.float64) for pk, u in zip(p, updates)) for n in names}


def fedit(updates: Sequence[Update], sample_counts: Sequence[float]) -> dict[str, np.ndarray]:
    """FLORA's rule: each adapter tensor (lora_A and lora_B separately) averaged by sample share."""
    return weighted_average(updates, sample_counts)


def lora_pairs(update: Update) -> dict[str, tuple[str, str]]:
    """Group peft-style tensor names into modules: ``{module: (A name, B name)}`` for names containing
    ``lora_A`` / ``lora_B`` (e.g. ``...o_proj.lora_A.weight``)."""
    mods: dict[str, dict[str, str]] = {}
    for name in update:
        for tag in ("lora_A", "lora_B"):
            if f".{tag}." in name or name.endswith(f".{tag}"):
                mods.setdefault(name.replace(tag, "lora_X"), {})[tag] = name
    out = {}
    for mod, d in mods.items():
        if set(d) != {"lora_A", "lora_B"}:
            raise AggregationError(f"update[{next(iter(d.values()))!r}]: LoRA module without its "
                                   f"{'lora_B' if 'lora_A' in d else 'lora_A'} partner")
        out[mod.replace(".lora_X.weight", "").replace(".lora_X", "")] = (d["lora_A"], d["lora_B"])
    return out


def stack(updates: Sequence[Update], sample_counts: Sequence[float], *, scaling: float) -> dict[str, np.ndarray]:
    """FLoRA-stacking: ``{module: delta W}`` with delta W = scaling · sum_k p_k B_k A_k (exact), to be merged
    into the base weight; clients then start the next round from fresh adapters."""
    names = _check_same_keys(updates)
    p = sample_shares(sample_counts)
    if len(p) != len(updates):
        raise AggregationError(f"sample_counts: {len(p)} counts for {len(updates)} updates")
    pairs = lora_pairs({n: None for n in names})
    if not pairs:
        raise AggregationError("updates: no lora_A/lora_B tensors to stack")
    out = {}
    for mod, (a, b) in pairs.items():
        out[mod] = scaling * sum(pk * (np.asarray(u[b], np.float64) @ np.asarray(u[a], np.float64))
                                 for pk, u in zip(p, updates))
    return out


def ffa(updates: Sequence[Update], sample_counts: Sequence[float], *, frozen_a: Update | None = None,
        atol: float = 0.0) -> dict[str, np.ndarray]:
    """FFA-LoRA: average only the B tensors; every client's A must equal the shared frozen init (checked against
    ``frozen_a`` when given, else against client 0's). Returns the averaged B tensors (and A unchanged)."""
    names = _check_same_keys(updates)
    p = sample_shares(sample_counts)
    pairs = lora_pairs({n: None for n in names})
    out = {}
    for mod, (a, b) in pairs.items():
        ref = np.asarray((frozen_a or updates[0])[a], np.float64)
        for k, u in enumerate(updates):
            if not np.allclose(np.asarray(u[a], np.float64), ref, rtol=0.0, atol=atol):
                raise AggregationError(f"updates[{k}][{a!r}]: lora_A changed; in ffa mode A stays frozen at its "
                                       f"shared random init")
        out[a] = ref
        out[b] = sum(pk * np.asarray(u[b], np.float64) for pk, u in zip(p, updates))
    return out


# --------------------------------------------------------------------------------------------------- Fed-CMP
@dataclass
class CanonicalConfig:
    """Canonical reliability-aware aggregation (CRA) with orthogonality-preserved momentum (OPM)."""

    energy: float = 0.99
    """Rank of the shared basis: the fewest singular directions holding this fraction of the stacked updates'
    energy (sum of squared singular values). 1.0 keeps every non-zero direction (full rank)."""
    temperature: float = 1.0
    """Softmax temperature of the reliability scores; ``float('inf')`` gives rho_k = p_k (no reliability)."""
    momentum: float = 0.9
    """OPM coefficient beta (0: no momentum)."""
    server_lr: float = 1.0
    """Step eta applied to the momentum buffer."""
    reliability: bool = True
    """False: rho_k = p_k (the sample share), whatever the temperature."""


@dataclass
class CanonicalAggregator:
    """Fed-CMP's server, one state per projector matrix. For a matrix with client updates dW_k (d_out x d_in) and
    sample shares p_k:

    1. basis: U = the first r left singular vectors of M = [p_1 dW_1 | ... | p_K dW_K] (thin SVD), r the fewest
       holding ``energy`` of M's squared singular values;
    2. coefficients: C_k = U^T dW_k; consensus Cbar = sum p_k C_k;
    3. reliability: e_k = ||U C_k||^2 / ||dW_k||^2 (energy of the update inside the shared subspace),
       a_k = cos(C_k, Cbar); rho_k = p_k exp((e_k + a_k)/T) / sum_j p_j exp((e_j + a_j)/T);
    4. fused update: dW = U sum_k rho_k C_k;
    5. OPM: m <- beta · U U^T m + dW (the old momentum projected onto the current basis), W <- W + eta · m.

    With energy 1 (U spans every update), rho = p (``reliability=False`` or T = inf), beta = 0 and eta = 1 this
    is exactly FedAvg; with one client whose update spans the output space it is server momentum
    m <- beta m + dW (tests/test_baselines_aggregation.py checks both).
    """

    config: CanonicalConfig = field(default_factory=CanonicalConfig)
    momentum_buffers: dict = field(default_factory=dict)
    last: dict = field(default_factory=dict)

    def basis(self, updates: Sequence[np.ndarray], p: np.ndarray) -> np.ndarray:
        m = np.concatenate([pk * u for pk, u in zip(p, updates)], axis=1)
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        e = s ** 2
        if e.sum() <= 0:
            return u[:, :0]
        nonzero = int(np.sum(s > s[0] * max(m.shape) * np.finfo(np.float64).eps))
        frac = np.cumsum(e) / e.sum()
        r = nonzero if self.config.energy >= 1.0 else int(np.searchsorted(frac, self.config.energy - 1e-12) + 1)
        return u[:, :max(1, min(r, nonzero))]

    def reliability(self, coeffs: Sequence[np.ndarray], updates: Sequence[np.ndarray], basis: np.ndarray,
                    p: np.ndarray) -> np.ndarray:
        cfg = self.config
        if not cfg.reliability or np.isinf(cfg.temperature):
            return p.copy()
        cbar = sum(pk * c for pk, c in zip(p, coeffs))
        scores = []
        for c, u in zip(coeffs, updates):
            tot = float(np.sum(u ** 2))
            e = float(np.sum((basis @ c) ** 2)) / tot if tot > 0 else 0.0
            den = float(np.linalg.norm(c) * np.linalg.norm(cbar))
            a = float(np.sum(c * cbar)) / den if den > 0 else 0.0
            scores.append(e + a)
        z = np.asarray(scores) / cfg.temperature
        w = p * np.exp(z - z.max())
        return w / w.sum()

    def step(self, weights: Mapping[str, np.ndarray], updates: Sequence[Update],
             sample_counts: Sequence[float]) -> dict[str, np.ndarray]:
        """Aggregate one round: returns the new weights (and records per-matrix rank and rho in ``last``).
        1-D tensors (biases) are averaged by sample share with the same momentum."""
        names = _check_same_keys(updates)
        missing = sorted(set(names) - set(weights))
        if missing:
            raise AggregationError(f"weights: no current value for updated tensor {missing[0]!r}")
        p = sample_shares(sample_counts)
        if len(p) != len(updates):
            raise AggregationError(f"sample_counts: {len(p)} counts for {len(updates)} updates")
        cfg = self.config
        new, self.last = {}, {}
        for n in names:
            dws = [np.asarray(u[n], np.float64) for u in updates]
            w = np.asarray(weights[n], np.float64)
            if w.ndim == 2:
                basis = self.basis(dws, p)
                coeffs = [basis.T @ d for d in dws]
                rho = self.reliability(coeffs, dws, basis, p)
                fused = basis @ sum(r * c for r, c in zip(rho, coeffs))
                prev = self.momentum_buffers.get(n)
                prev = basis @ (basis.T @ prev) if prev is not None else np.zeros_like(w)
                self.last[n] = {"rank": int(basis.shape[1]), "rho": rho.tolist()}
            else:
                fused = sum(pk * d for pk, d in zip(p, dws))
                prev = self.momentum_buffers.get(n, np.zeros_like(w))
            mom = cfg.momentum * prev + fused
            self.momentum_buffers[n] = mom
            new[n] = w + cfg.server_lr * mom
        return new
