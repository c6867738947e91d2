"""Mixture-of-Rewards router: g(x, objective) -> softmax weights over the registered clients.

The router is a small MLP over input features (:mod:`mor_server.alignment.features`) plus a learned embedding of the
alignment objective. It is calibrated on the objective it is used for: on the server's labelled public
examples, each with its candidate answers (every answer valid for the question, as GRPO's ``answer_softmax``
reward scores them), by maximising the likelihood of the right answer under the softmax of the *mixed* reward
(plus a ranking-error term, below)::

    P(answer a | x) = softmax_a(alpha * sum_k w_k(x) * s_k(x, a))

with per-client scores s_k released in a ``plain`` or ``dp`` round and a learned scale alpha > 0 (the weights
stay on the simplex, because in secagg mode clients multiply their own scores by them). With two candidates this
is the Bradley-Terry likelihood of a preference pair, ``sigmoid(alpha * sum_k w_k (s_k(chosen) - s_k(rejected)))``;
:meth:`MoRRouter.calibrate` also takes pairs as score differences.

The likelihood alone is nearly indifferent to a client that ranks answers the wrong way round: once the mixture
ranks an item right it saturates, and a client whose scores spread a few times less than the expert's changes the
likelihood by a hundredth whether it gets 0 or 0.3 of the weight (measured on the flipped-client scenario,
docs/alignment.md), so such a client keeps much of the share it started with. The fit therefore adds the *expected
ranking error of the routed clients*, ``rank_weight * mean_i sum_k w_k(x_i) * r_k(i)``, where ``r_k(i)`` is the
fraction of item i's wrong candidates client k scores at least as high as the right one: linear in the weights,
free of the clients' score scales, and it does not saturate, so weight moves to the clients that rank each item
right.

The router may also route a question to *no* client. A mixture that ranks a type of question (all questions with
the same valid answers) no better than chance on the calibration items carries no signal for it, and GRPO's
per-group normalisation would blow that noise up to unit-variance advantages: with the colour client replaced by
one trained on flipped preferences, the router shut it out (weight 0.001) and the other clients' opinions of colour
answers still took colour from 97-100% to 37-86% (docs/alignment.md, "A noisy client with no honest twin").
:func:`answer_set_trust` tests each answer set; the untrusted ones are listed in :attr:`MoRRouter.abstain`, and
:class:`~mor_server.alignment.rewards.MoRReward` gives their completions a constant reward and sends them to no
client (GRPO's KL term then keeps the reference's answers there). The test is run on *out-of-fold* weights (each
calibration item weighted by a router fitted without it): a router over per-item features (image, question) can
otherwise pick, item by item, whichever client's noise happened to rank it right, and pass a type no client knows.
The evidence (out-of-fold weights, the clients' calibration scores) stays with the router, so when clients go
offline :meth:`MoRRouter.abstain_for` runs the test again for the live ones: a type whose only expert has left is
then abstained on rather than handed to the remaining clients' noise.

Clients that join or leave are handled at routing time: weights are renormalised over the live clients the
router knows; live clients it does not know get weight 0 until :meth:`MoRRouter.calibrate` is run again
(:meth:`MoRRouter.needs_recalibration` says when). Optional top-k keeps the k largest weights per item.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn


class _RouterNet(nn.Module):
    def __init__(self, feature_dim: int, n_clients: int, n_objectives: int, hidden: int):
        super().__init__()
        self.objective = nn.Embedding(n_objectives, hidden)
        self.inp = nn.Linear(feature_dim, hidden)
        self.out = nn.Linear(hidden, n_clients)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # starts uniform
        nn.init.zeros_(self.objective.weight)

    def forward(self, x: torch.Tensor, objective: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x) + self.objective(objective))
        return self.out(h)


class MoRRouter:
    """Router over a fixed list of known clients; see the module docstring for the model.

    client_ids: the clients the router is (to be) calibrated for, in column order.
    feature_dim: length of the feature vectors (``FeatureExtractor.dim``).
    n_objectives: number of alignment-objective ids (0 .. n_objectives-1).
    top_k: keep only the k largest weights per item (None: all live clients).
    routing: ``"learned"`` (the Mixture of Rewards) or ``"uniform"``, the ablation without a router: every item's
        weights are uniform over the live clients and calibration fits only the scale alpha, on the same objective.
    """

    ROUTINGS = ("learned", "uniform")

    def __init__(self, client_ids: Sequence[str], feature_dim: int, *, n_objectives: int = 1, hidden: int = 32,
                 top_k: int | None = None, seed: int = 0, feature_config: dict | None = None,
                 routing: str = "learned"):
        client_ids = list(client_ids)
        if not client_ids:
            raise ValueError("MoRRouter: client_ids is empty; register at least one client before building a router")
        if len(set(client_ids)) != len(client_ids):
            raise ValueError(f"MoRRouter: client_ids has duplicates: {client_ids}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"MoRRouter: top_k must be >= 1 or None, got {top_k}")
        if routing not in self.ROUTINGS:
            raise ValueError(f"MoRRouter: routing must be one of {', '.join(self.ROUTINGS)}, got {routing!r}")
        self.routing = routing
        self.client_ids = client_ids
        self.feature_dim = int(feature_dim)
        self.n_objectives = int(n_objectives)
        self.hidden = int(hidden)
        self.top_k = top_k
        self.seed = seed
        self.feature_config = dict(feature_config or {})
        self.calibration: dict = {}
        torch.manual_seed(seed)
        self.net = _RouterNet(self.feature_dim, len(client_ids), self.n_objectives, self.hidden)
        self.mean = np.zeros(self.feature_dim, dtype=np.float32)
        self.std = np.ones(self.feature_dim, dtype=np.float32)
        self.abstain: list[tuple[str, ...]] = []
        """Answer sets (sorted tuples of the answers valid for a question) the router routes to no client with every
        client it knows live: set by :func:`~mor_server.alignment.calibration.calibrate_router` from
        :func:`answer_set_trust`."""
        self.trust_evidence: dict | None = None
        """What :meth:`abstain_for` re-tests when clients are offline (set by calibrate_router with abstention on):
        ``w`` (n, clients) out-of-fold weights, ``S``/``mask``/``truth`` (:func:`candidate_tensor`) of the
        calibration items, ``keys`` (each item's answer set), ``z`` and ``min_items``. None: no re-test (the
        static :attr:`abstain` holds whoever is live)."""
        self._abstain_cache: dict = {}

    # ------------------------------------------------------------------ routing
    def abstains(self, answers: Sequence[str], live: Sequence[str] | None = None) -> bool:
        """Whether questions whose valid answers are ``answers`` get no client's reward when ``live`` clients are
        online (None: every client the router knows; :meth:`abstain_for`)."""
        if not self.abstain and self.trust_evidence is None:
            return False
        return tuple(sorted(str(a) for a in answers)) in self.abstain_for(live)

    def abstain_for(self, live: Sequence[str] | None = None) -> frozenset:
        """The answer sets routed to no client when ``live`` clients are online. With every known client live, none
        of them live, or no evidence kept: :attr:`abstain`. Otherwise :func:`answer_set_trust` again on the
        calibration items, with the out-of-fold weights restricted to the live clients it knows as :meth:`weights`
        does it (renormalised, then top-k among them: :func:`live_weights`)."""
        online = None if live is None else set(live)
        known = tuple(c for c in self.client_ids if online is None or c in online)
        ev = self.trust_evidence
        # none of the clients it knows live: no evidence either way; the round goes ahead as weights() routes it
        # (uniform over newcomers) or fails when no client is live at all, which is what an outage must look like
        if ev is None or not known or known == tuple(self.client_ids):
            return frozenset(tuple(k) for k in self.abstain)
        if known not in self._abstain_cache:
            idx = [self.client_ids.index(c) for c in known]
            w = live_weights(ev["w"], idx, self.top_k)
            trust = answer_set_trust(w, ev["S"][:, idx], ev["mask"], ev["truth"], ev["keys"], z=ev["z"],
                                     min_items=ev["min_items"])
            self._abstain_cache[known] = frozenset(k for k, v in trust.items() if not v["trusted"])
        return self._abstain_cache[known]

    def _tensor(self, features: np.ndarray) -> torch.Tensor:
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise ValueError(f"MoRRouter: features must have shape (n, {self.feature_dim}), got {f.shape}")
        return torch.from_numpy((f - self.mean) / self.std)

    def _objectives(self, objective, n: int) -> torch.Tensor:
        obj = torch.as_tensor(objective, dtype=torch.long)
        if obj.ndim == 0:
            obj = obj.expand(n)
        if obj.shape != (n,) or (obj.numel() and (int(obj.min()) < 0 or int(obj.max()) >= self.n_objectives)):
            raise ValueError(f"MoRRouter: objective must be an id in [0, {self.n_objectives}) or one per item")
        return obj

    def logits(self, features: np.ndarray, objective=0) -> np.ndarray:
        """Raw router logits, shape (n, n_known_clients)."""
        x = self._tensor(features)
        with torch.no_grad():
            return self.net(x, self._objectives(objective, x.shape[0])).numpy()

    def needs_recalibration(self, live: Sequence[str]) -> bool:
        """True when a live client is unknown to the router (it would get weight 0 until recalibration)."""
        return any(c not in self.client_ids for c in live)

    def weights(self, features: np.ndarray, live: Sequence[str] | None = None, objective=0) -> dict[str, list[float]]:
        """Per-item weights over the live clients: ``{client: [w_item0, w_item1, ...]}``; each item sums to 1.

        Known clients that are not live are dropped and the rest renormalised; live clients the router does not
        know get 0 (if no live client is known, the weights are uniform over the live ones). Top-k applies after.
        """
        live = list(self.client_ids if live is None else live)
        if not live:
            raise ValueError("MoRRouter.weights: no live clients to route to")
        f = np.asarray(features, dtype=np.float32)
        n = f.shape[0] if f.ndim == 2 else 0
        known = [c for c in self.client_ids if c in live]  # the router's order: the sums' last bits do not follow live's
        if not known:
            return {c: [1.0 / len(live)] * n for c in live}
        if self.routing == "uniform":
            return {c: [1.0 / len(known) if c in known else 0.0] * n for c in live}
        # one row at a time: a batched matmul's last bits depend on the batch's size and make-up, and an item's
        # weights must be a function of that item alone (the same prompt asked again in another GRPO batch must get
        # bit-identical weights, or the clients' query audit refuses the second sum as a differencing attempt)
        lg = (np.concatenate([self.logits(f[i:i + 1], objective) for i in range(n)]) if n else
              self.logits(f, objective))[:, [self.client_ids.index(c) for c in known]]
        if self.top_k is not None and self.top_k < len(known):
            kth = np.sort(lg, axis=1)[:, -self.top_k][:, None]
            lg = np.where(lg >= kth, lg, -np.inf)
        lg = lg - lg.max(axis=1, keepdims=True)
        w = np.exp(lg)
        w = w / w.sum(axis=1, keepdims=True)
        out = {c: [0.0] * n for c in live}
        for j, c in enumerate(known):
            out[c] = [float(v) for v in w[:, j]]
        return out

    # ------------------------------------------------------------------ calibration
    def calibrate(self, features: np.ndarray, scores: Mapping[str, Sequence], truth: Sequence[int] | None = None,
                  *, objective=0, steps: int = 300, lr: float = 0.05, l2: float = 1e-3, rank_weight: float = 1.0,
                  progress: bool = False) -> dict:
        """Fit the router: maximise the likelihood of the right candidate under softmax(alpha * mixed scores), plus
        ``rank_weight`` times the routed clients' expected ranking error (module docstring; 0: the likelihood alone).

        features: (n, feature_dim) features of the n calibration items.
        scores: ``{client: [[s(candidate 0), s(candidate 1), ...] for each item]}`` (items may have different
            numbers of candidates), with ``truth[i]`` the index of item i's right candidate; or, for preference
            pairs, ``{client: [s(chosen) - s(rejected) for each pair]}`` with ``truth`` None. This (re)defines
            ``client_ids`` when it names a different set of clients.
        Returns a summary on the calibration items (top-1 accuracy and mean log-likelihood of the mixture, the
        uniform mixture and each client).
        """
        from tqdm.auto import tqdm

        clients = list(scores)
        if not clients:
            raise ValueError("MoRRouter.calibrate: score_diffs is empty; run a calibration scoring round first")
        f = np.asarray(features, dtype=np.float32)
        n = f.shape[0]
        if n == 0:
            raise ValueError("MoRRouter.calibrate: no calibration pairs")
        rank_weight = check_rank_weight(rank_weight, "MoRRouter.calibrate: rank_weight")
        S, mask, t = candidate_tensor(scores, truth, n)
        if clients != self.client_ids:
            self.client_ids = clients
            torch.manual_seed(self.seed)
            self.net = _RouterNet(self.feature_dim, len(clients), self.n_objectives, self.hidden)
        self.abstain = []  # a new fit: calibrate_router decides again which answer sets to route to no client
        self.trust_evidence, self._abstain_cache = None, {}
        self.mean = f.mean(axis=0)
        self.std = f.std(axis=0) + 1e-6
        x = self._tensor(f)
        obj = self._objectives(objective, n)
        St, neg, tt = torch.from_numpy(S), torch.from_numpy(np.where(mask, 0.0, -np.inf).astype(np.float32)), \
            torch.from_numpy(t)
        R = torch.from_numpy(rank_errors(S, mask, t))
        # uniform routing: the network's output layer stays at its zero init (logits 0, weights uniform); only alpha
        params = [self.net.log_alpha] if self.routing == "uniform" else list(self.net.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        self.net.train()
        for _ in tqdm(range(steps), desc="router calibration", disable=not progress, leave=False):
            w = torch.softmax(self.net(x, obj), dim=1)
            mixed = torch.einsum("nk,nkm->nm", w, St)
            loss = torch.nn.functional.cross_entropy(torch.exp(self.net.log_alpha) * mixed + neg, tt)
            if rank_weight:
                loss = loss + rank_weight * (w * R).sum(dim=1).mean()
            reg = sum((p ** 2).sum() for name, p in self.net.named_parameters() if "weight" in name)
            opt.zero_grad()
            (loss + l2 * reg).backward()
            opt.step()
        self.net.eval()
        with torch.no_grad():
            w = torch.softmax(self.net(x, obj), dim=1).numpy()
        alpha = float(torch.exp(self.net.log_alpha.detach()))
        k = len(clients)
        self.calibration = {
            "items": n, "pairs": n, "alpha": alpha, "objective": "softmax over each item's candidates",
            "rank_weight": rank_weight,
            "routing": self.routing,
            "mixture": ranking_quality(w, S, mask, t, alpha),
            "uniform": ranking_quality(np.full((n, k), 1.0 / k), S, mask, t, alpha),
            "clients": {c: {**ranking_quality(np.eye(k)[[j] * n], S, mask, t, alpha),
                            "mean_weight": float(w[:, j].mean())} for j, c in enumerate(clients)},
        }
        return self.calibration

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Save to a directory: ``router.json`` (config, normalisation, calibration summary) + ``router.safetensors``
        (the weights; no pickle)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"client_ids": self.client_ids, "feature_dim": self.feature_dim, "n_objectives": self.n_objectives,
                "hidden": self.hidden, "top_k": self.top_k, "seed": self.seed, "feature_config": self.feature_config,
                "routing": self.routing, "abstain": [list(k) for k in self.abstain],
                "mean": self.mean.tolist(), "std": self.std.tolist(), "calibration": self.calibration}
        (path / "router.json").write_text(json.dumps(meta))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path / "router.safetensors"))
        ev = self.trust_evidence
        if ev is not None:  # the calibration round's scores and the out-of-fold weights (abstain_for's re-test)
            from safetensors.numpy import save_file as save_np

            sets = list(dict.fromkeys(ev["keys"]))
            save_np({"w": np.asarray(ev["w"], dtype=np.float64), "S": np.asarray(ev["S"], dtype=np.float32),
                     "mask": np.asarray(ev["mask"], dtype=np.uint8), "truth": np.asarray(ev["truth"], dtype=np.int64),
                     "key_index": np.asarray([sets.index(k) for k in ev["keys"]], dtype=np.int64)},
                    str(path / "trust.safetensors"))
            (path / "trust.json").write_text(json.dumps({"answer_sets": [list(k) for k in sets], "z": ev["z"],
                                                         "min_items": ev["min_items"]}))
        else:
            for name in ("trust.safetensors", "trust.json"):
                (path / name).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MoRRouter":
        """Load a router saved with :meth:`save`."""
        path = Path(path)
        if not (path / "router.json").is_file():
            raise FileNotFoundError(f"MoRRouter.load: {str(path)!r} has no router.json; pass the directory given "
                                    f"to MoRRouter.save")
        meta = json.loads((path / "router.json").read_text())
        r = cls(meta["client_ids"], meta["feature_dim"], n_objectives=meta["n_objectives"], hidden=meta["hidden"],
                top_k=meta["top_k"], seed=meta["seed"], feature_config=meta.get("feature_config"),
                routing=meta.get("routing", "learned"))
        if (path / "router.safetensors").is_file():
            from safetensors.torch import load_file

            r.net.load_state_dict(load_file(str(path / "router.safetensors")))
        else:  # saved by a version before 0.1.0's safetensors switch
            r.net.load_state_dict(torch.load(path / "router.pt", weights_only=True))
        r.net.eval()
        r.mean = np.asarray(meta["mean"], dtype=np.float32)
        r.std = np.asarray(meta["std"], dtype=np.float32)
        r.calibration = meta.get("calibration", {})
        # routers saved before 2026-12-06 have no abstain list: none
        r.abstain = sorted(_answer_sets(meta.get("abstain", []), path / "router.json", "abstain"))
        if (path / "trust.safetensors").is_file() and (path / "trust.json").is_file():
            from safetensors.numpy import load_file as load_np

            arr, tj = load_np(str(path / "trust.safetensors")), json.loads((path / "trust.json").read_text())
            sets = _answer_sets(tj.get("answer_sets"), path / "trust.json", "answer_sets")
            n, k = len(arr["truth"]), len(r.client_ids)
            if arr["w"].shape != (n, k) or arr["S"].ndim != 3 or arr["S"].shape[:2] != (n, k) or \
                    arr["mask"].shape != (n, arr["S"].shape[2]) or arr["key_index"].shape != (n,) or \
                    int(arr["key_index"].min(initial=0)) < 0 or int(arr["key_index"].max(initial=-1)) >= len(sets) \
                    or ((arr["truth"] < 0) | (arr["truth"] >= arr["S"].shape[2])).any():
                raise ValueError(f"MoRRouter.load: {path / 'trust.safetensors'} is not consistent (shapes, indices) "
                                 f"with itself or router.json's {k} clients; calibrate the router again")
            r.trust_evidence = {"w": arr["w"], "S": arr["S"], "mask": arr["mask"].astype(bool), "truth": arr["truth"],
                                "keys": [sets[i] for i in arr["key_index"]],
                                "z": check_abstain_z(tj.get("z"), f"{path / 'trust.json'}: z"),
                                "min_items": int(tj.get("min_items", 5))}
        return r


def live_weights(w: np.ndarray, idx: Sequence[int], top_k: int | None) -> np.ndarray:
    """Routing weights (n, clients; a softmax before any top-k) restricted to the clients ``idx`` as
    :meth:`MoRRouter.weights` restricts them: renormalised over those clients (a softmax over their logits), then
    the ``top_k`` largest per item kept (ties kept) and renormalised."""
    w = np.asarray(w, dtype=np.float64)[:, list(idx)]
    tot = w.sum(axis=1, keepdims=True)
    w = np.where(tot > 0, w / np.where(tot > 0, tot, 1.0), 1.0 / max(len(idx), 1))
    if top_k is not None and top_k < w.shape[1]:
        kth = np.sort(w, axis=1)[:, -top_k][:, None]
        w = np.where(w >= kth, w, 0.0)
        w = w / w.sum(axis=1, keepdims=True)
    return w


def _answer_sets(value, where: Path, field: str) -> list[tuple[str, ...]]:
    """``value`` from a saved router as answer-set tuples (each sorted; the list in its order), or ValueError naming
    the file and field."""
    if not isinstance(value, list) or not all(isinstance(k, list) and k and all(isinstance(a, str) for a in k)
                                              for k in value):
        raise ValueError(f"MoRRouter.load: {where}: {field} must be a list of answer lists (e.g. [[\"no\", \"yes\"]]), "
                         f"got {value!r}; calibrate the router again")
    return [tuple(sorted(k)) for k in value]


def candidate_tensor(scores: Mapping[str, Sequence], truth: Sequence[int] | None, n: int) \
        -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-client candidate scores as one padded array: ``S`` (n, clients, max candidates), ``mask`` (n, max
    candidates: True where a candidate exists) and ``truth`` (n,). Pairs given as score differences (``truth`` None)
    become two candidates ``[diff, 0]`` with the right one first. Raises ValueError on ragged or non-finite input."""
    clients = list(scores)
    pairs = truth is None
    rows = {c: [[float(v), 0.0] for v in scores[c]] if pairs else [list(map(float, r)) for r in scores[c]]
            for c in clients}
    t = np.zeros(n, dtype=np.int64) if pairs else np.asarray(list(truth), dtype=np.int64)
    if any(len(rows[c]) != n for c in clients) or t.shape != (n,):
        raise ValueError(f"MoRRouter.calibrate: every client needs {n} finite score differences" if pairs else
                         f"MoRRouter.calibrate: every client needs scores for {n} items, and truth {n} indices")
    sizes = [len(r) for r in rows[clients[0]]]
    if any([len(r) for r in rows[c]] != sizes for c in clients) or min(sizes, default=0) < 2:
        raise ValueError("MoRRouter.calibrate: every client must score the same candidates, at least 2 per item")
    if ((t < 0) | (t >= np.asarray(sizes))).any():
        raise ValueError("MoRRouter.calibrate: a truth index is outside its item's candidates")
    m = max(sizes)
    S = np.zeros((n, len(clients), m), dtype=np.float32)
    mask = np.zeros((n, m), dtype=bool)
    for i, size in enumerate(sizes):
        mask[i, :size] = True
        for j, c in enumerate(clients):
            S[i, j, :size] = rows[c][i]
    if not np.isfinite(S).all():
        raise ValueError(f"MoRRouter.calibrate: every client needs {n} finite score differences" if pairs else
                         "MoRRouter.calibrate: scores must be finite")
    return S, mask, t


def check_rank_weight(value, name: str = "rank_weight") -> float:
    """``value`` as the router's ranking-error weight (:meth:`MoRRouter.calibrate`), or ValueError naming ``name``:
    it must be a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (default 1.0; 0: the router fitted on the likelihood "
                         f"alone), got {value!r}")
    return float(value)


def rank_errors(S: np.ndarray, mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each client's ranking error on each item, shape (n, clients): the fraction of the item's wrong candidates the
    client scores at least as high as the right one (0: ranked first, 1: ranked last; a tie counts as an error, as in
    :func:`ranking_quality`). Scale-free: a client's score unit does not change it."""
    n = len(truth)
    right = S[np.arange(n), :, truth][:, :, None]  # (n, clients, 1)
    wrong = mask.copy()
    wrong[np.arange(n), truth] = False
    above = ((S >= right) & wrong[:, None, :]).sum(axis=2)
    return (above / np.maximum(wrong.sum(axis=1), 1)[:, None]).astype(np.float32)


def ranking_quality(w: np.ndarray, S: np.ndarray, mask: np.ndarray, truth: np.ndarray, alpha: float) -> dict:
    """How well the mixture ``sum_k w[:, k] * S[:, k]`` ranks each item's right candidate: top-1 accuracy (a tie
    counts as wrong) and mean log-likelihood of the right candidate under softmax(alpha * mixture)."""
    mixed = np.einsum("nk,nkm->nm", np.asarray(w, dtype=np.float64), S.astype(np.float64))
    z = np.where(mask, alpha * mixed, -np.inf)
    n = len(truth)
    right = z[np.arange(n), truth]
    others = np.where(np.arange(z.shape[1])[None, :] == truth[:, None], -np.inf, z)
    top = z.max(axis=1, keepdims=True)
    loglik = right - (top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))
    return {"accuracy": float(np.mean(right > others.max(axis=1))), "loglik": float(np.mean(loglik))}


def check_abstain_z(value, name: str = "abstain_z") -> float | None:
    """``value`` as the confidence (standard errors) :func:`answer_set_trust` asks for, or ValueError naming ``name``:
    None (never abstain) or a finite number >= 0."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (default 2.0) or None (null in JSON: the router never "
                         f"abstains), got {value!r}")
    return float(value)


def answer_set_trust(w: np.ndarray, S: np.ndarray, mask: np.ndarray, truth: np.ndarray, keys: Sequence,
                     *, z: float = 2.0, min_items: int = 5) -> dict:
    """Whether the mixture ``sum_k w[:, k] * S[:, k]`` ranks the right answer of each answer set's items better than
    chance. ``keys[i]`` is item i's answer set (any hashable). Per item, the *win rate* is the share of its wrong
    candidates the mixture scores below the right one, a tie counting half (0.5 is chance for any number of
    candidates, and it does not depend on the clients' score scales). An answer set is trusted when its mean win rate
    minus ``z`` standard errors is above 0.5, or when it has fewer than ``min_items`` items (too few to judge: the
    router keeps routing it). Returns ``{key: {"items", "win_rate", "se", "trusted"}}``."""
    n = len(truth)
    if len(keys) != n:
        raise ValueError(f"answer_set_trust: {len(keys)} keys for {n} items")
    mixed = np.einsum("nk,nkm->nm", np.asarray(w, dtype=np.float64), S.astype(np.float64))
    right = mixed[np.arange(n), truth][:, None]
    wrong = mask.copy()
    wrong[np.arange(n), truth] = False
    wins = (((mixed < right) + 0.5 * (mixed == right)) * wrong).sum(axis=1) / np.maximum(wrong.sum(axis=1), 1)
    out = {}
    for key in dict.fromkeys(keys):
        v = wins[[i for i, k in enumerate(keys) if k == key]]
        se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
        mean = float(v.mean())
        out[key] = {"items": int(len(v)), "win_rate": mean, "se": se,
                    "trusted": bool(len(v) < min_items or mean - z * se > 0.5)}
    return out


def effective_shares(weights: Mapping[str, Sequence[float]], scores: Mapping[str, Sequence[Sequence[float]]],
                     domains: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each client's share of the mixed score, per question type: the mean over a type's items of
    ``w_k * spread_k / sum_j w_j * spread_j``, where ``spread_k`` is the standard deviation of client k's scores over
    the item's candidates. A weight alone does not say who decides the ranking: a client whose scores spread ten
    times wider than another's outweighs it with a tenth of the weight. Items where every weighted spread is 0 are
    skipped; a type with no such item gets no entry. Raises ValueError unless ``weights`` and ``scores`` name the
    same clients, each with one finite entry per item of ``domains``."""
    clients = list(weights)
    n = len(domains)
    if set(clients) != set(scores) or any(len(weights[c]) != n or len(scores[c]) != n for c in clients):
        raise ValueError(f"effective_shares: weights and scores must name the same clients, each with {n} items")
    if not all(np.isfinite(weights[c]).all() and all(np.isfinite(r).all() for r in scores[c]) for c in clients):
        raise ValueError("effective_shares: weights and scores must be finite")
    out: dict[str, dict[str, float]] = {}
    for d in sorted(set(domains)):
        rows = []
        for i, dd in enumerate(domains):
            if dd != d:
                continue
            v = np.array([weights[c][i] * float(np.std(scores[c][i])) for c in clients])
            if v.sum() > 0:
                rows.append(v / v.sum())
        if rows:
            out[d] = {c: float(x) for c, x in zip(clients, np.mean(rows, axis=0))}
    return out


def entropy(weights: Mapping[str, Sequence[float]]) -> float:
    """Mean entropy (nats) of per-item routing weights (a metric: log K is uniform, 0 is one client)."""
    w = np.array([list(v) for v in weights.values()], dtype=np.float64).T
    if w.size == 0:
        return 0.0
    w = np.clip(w, 1e-12, 1.0)
    return float(np.mean(-(w * np.log(w)).sum(axis=1)))


__all__ = ["MoRRouter", "answer_set_trust", "candidate_tensor", "check_abstain_z", "check_rank_weight",
           "effective_shares", "entropy", "live_weights", "rank_errors", "ranking_quality"]
