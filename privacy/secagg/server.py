"""SecAgg+ server state machine (pure: bytes in, bytes out, no network). It routes ciphertexts and sums masked
vectors; it never sees an individual client's (weighted) scores, only the unmasked sum.

One method per stage, called with the payloads received before that stage's deadline (``{client_id: bytes}``; a
client missing from the dict is a dropout), each returning ``{client_id: bytes}`` to send at the next stage::

    srv = SecAggServer(round_id, ids, vector_length=m, weights=w)
    out = srv.setup()                      # -> STAGE_SETUP messages
    out = srv.reveal(adverts)              # adverts: replies to setup           -> STAGE_REVEAL messages
    out = srv.share_keys(reveals)          # nonce reveals: replies to reveal    -> STAGE_SHARE_KEYS messages
    out = srv.collect_masked(shares)       # replies to share_keys               -> STAGE_COLLECT_MASKED messages
    out = srv.consistency(masked)          # replies to collect_masked           -> STAGE_CONSISTENCY messages
    out = srv.unmask(signatures)           # replies to consistency              -> STAGE_UNMASK messages
    res = srv.finish(unmask_shares)        # replies to unmask                   -> SecAggResult

``srv.stage_steps()`` lists the methods after ``setup`` in order (one per stage of ``STAGES``, then ``finish``).

Any stage may raise :class:`SecAggAbort` (also recorded in ``result()``); ``stage_timeouts`` holds the deadlines a
transport should apply. A payload that fails to decode, is for another round, or repeats a client is dropped and
recorded in ``rejected``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from . import graph, keys, prg, quantization, shamir
from .client import check_round_params
from .errors import ParameterError, SecAggAbort, SecAggError
from .messages import (AdvertiseKeys, ConsistencySig, EncryptedShares, MaskedInput, NonceReveal, NonceReveals,
                       PeerKeys, SetupConfig, SurvivorSet, UnmaskRequest, UnmaskShares)
from .stages import DEFAULT_STAGE_TIMEOUT_S, STAGES


@dataclass
class SecAggResult:
    """ok: whether the sum was recovered. total: the weighted sum (floats, length m) or None. survivors: clients
    whose inputs are in the sum. dropped: {client_id: stage at which it dropped}. out_of_range: values clipped
    by clients under policy 'clip' (total count over survivors, recovered from a masked coordinate; None in
    secagg+dp, where no count is sent). reason: why the round aborted."""

    ok: bool
    total: np.ndarray | None
    survivors: list = field(default_factory=list)
    dropped: dict = field(default_factory=dict)
    out_of_range: int | None = 0
    reason: str = ""


class SecAggServer:
    """The aggregation server of one round.

    client_ids: the selected clients. vector_length: m. weights: routing weights, shape (n,) or (n, m) in the
    order of ``sorted(client_ids)`` (default all 1; their max must be <= weight_cap). max_colluders: c, the
    colluding clients per neighbourhood the round tolerates (default ``graph.default_colluders(degree)`` =
    max(1, floor((degree+1)/6)); clients refuse a c below their own minimum). threshold: Shamir threshold t with
    (degree+1+c)/2 < t <= degree+1 (default: the smallest allowed). degree: neighbours per client (default
    ~2 log2 n, even; complete graph for small n). The graph seed is not chosen here: it is derived from the
    nonces every client signs into its key advertisement (``graph.derive_seed``). value_range: inputs (scores) must lie in [-range, range];
    out_of_range: 'error' (client refuses) or 'clip' (clipped and counted; the count is summed under the mask, and
    not sent at all in secagg+dp). frac_bits: fixed-point fraction bits.
    mod_bits: 32 or 64 (default: the smallest that cannot wrap). dp_sigma: per-client discrete-Gaussian std in
    integer units (secagg+dp; see ``ddp.calibrate_sigma``) with dp_min_survivors the survivors it assumes.
    """

    def __init__(self, round_id: str, client_ids, *, vector_length: int, weights=None, threshold: int | None = None,
                 degree: int | None = None, max_colluders: int | None = None, value_range: float = 1.0,
                 frac_bits: int = 16,
                 mod_bits: int | None = None, weight_cap: float = 1.0, out_of_range: str = "error",
                 dp_sigma: float = 0.0, dp_min_survivors: int = 0, stage_timeouts: dict | None = None,
                 keep_transcript: bool = False):
        ids = sorted(set(client_ids))
        if len(ids) != len(list(client_ids)):
            raise ParameterError("client_ids contains duplicates")
        n = len(ids)
        if n < 1 or vector_length < 1:
            raise ParameterError("need at least one client and vector_length >= 1")
        deg = graph.default_degree(n) if degree is None else min(int(degree), n - 1)
        if deg < n - 1 and deg % 2:
            raise ParameterError(f"degree must be even for a sparse graph, got {deg}")
        c = graph.default_colluders(deg) if max_colluders is None else int(max_colluders)
        if c < 0:
            raise ParameterError(f"max_colluders must be >= 0, got {c}")
        t = graph.threshold_for(deg, c) if threshold is None else int(threshold)
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.size not in (n, n * vector_length):
            raise ParameterError(f"weights must have shape ({n},) or ({n}, {vector_length}), got {w.shape}")
        if not (value_range > 0 and math.isfinite(value_range)):
            raise ParameterError(f"value_range must be positive and finite, got {value_range!r}")
        mb = quantization.check_modulus(n, value_range, weight_cap, frac_bits, mod_bits, dp_sigma,
                                        count_max=int(vector_length))
        self.cfg = SetupConfig(round_id, ids, t, deg, c, int(vector_length), w.reshape(-1),
                               int(frac_bits), float(value_range), mb, float(weight_cap), out_of_range,
                               float(dp_sigma), int(dp_min_survivors))
        check_round_params(self.cfg)
        self.round_id, self.client_ids, self.threshold, self.degree = round_id, ids, t, deg
        self.max_colluders = c
        self.stage_timeouts = dict(DEFAULT_STAGE_TIMEOUT_S, **(stage_timeouts or {}))
        self.graph_seed: bytes | None = None  # known once the key advertisements (and their nonces) are in
        self._nbrs: dict = {}
        self._dtype = quantization.word_dtype(mb)
        self._index = {c: i for i, c in enumerate(ids)}
        self.dropped: dict[str, str] = {}
        self.rejected: dict[str, str] = {}
        self._result: SecAggResult | None = None
        self._next = 0
        self.transcript: list[tuple[str, str, str, bytes]] | None = [] if keep_transcript else None

    # ------------------------------------------------------------------ helpers
    def mark_dropout(self, client_id: str, stage: str | None = None) -> None:
        """Record a client as dropped (missed a deadline); it takes no further part in the round."""
        self.dropped.setdefault(client_id, stage or STAGES[max(self._next - 1, 0)])

    def _alive(self) -> list[str]:
        return [c for c in self.client_ids if c not in self.dropped]

    def _stage(self, name: str):
        if self._result is not None and not self._result.ok:
            raise SecAggAbort(self._result.reason)
        if self._next >= len(STAGES) + 1 or (STAGES + ("finish",))[self._next] != name:
            raise SecAggError(f"server stage {name!r} called out of order")
        self._next += 1

    def _collect(self, stage: str, replies: dict, cls):
        """Decode replies of alive clients; missing ones are dropouts, bad ones are rejected (and dropped)."""
        out = {}
        for cid in self._alive():
            blob = replies.get(cid)
            if blob is None:
                self.mark_dropout(cid, stage)
                continue
            if self.transcript is not None:
                self.transcript.append(("in", stage, cid, bytes(blob)))
            try:
                msg = cls.from_bytes(blob, round_id=self.round_id)
                if getattr(msg, "client_id", cid) != cid:
                    raise SecAggError(f"message claims to be from {msg.client_id}")
            except SecAggError as e:
                self.rejected[cid] = f"{stage}: {e}"
                self.mark_dropout(cid, stage)
                continue
            out[cid] = msg
        return out

    def _send(self, stage: str, out: dict) -> dict:
        if self.transcript is not None:
            for cid, b in out.items():
                self.transcript.append(("out", stage, cid, b))
        return out

    def _abort(self, reason: str):
        self._result = SecAggResult(False, None, [], dict(self.dropped), 0, reason)
        raise SecAggAbort(reason)

    def _need(self, alive, what: str):
        if len(alive) < self.threshold:
            self._abort(f"{what}: only {len(alive)} clients left, threshold {self.threshold}")

    # ------------------------------------------------------------------ stages
    def setup(self) -> dict[str, bytes]:
        self._stage("setup")
        b = self.cfg.to_bytes()
        return self._send("setup", {c: b for c in self.client_ids})

    def stage_steps(self) -> list:
        """The methods to call after ``setup()``, in stage order, each with the replies to the previous stage."""
        return [self.reveal, self.share_keys, self.collect_masked, self.consistency, self.unmask, self.finish]

    def reveal(self, adverts: dict[str, bytes]) -> dict[str, bytes]:
        """Forward every advertisement (keys + nonce commitment) to every client; they answer with their nonce."""
        self._stage("reveal")
        msgs = self._collect("setup", adverts, AdvertiseKeys)
        self._adverts = {c: adverts[c] for c in msgs}
        self._advert_msgs = msgs
        self._need(list(msgs), "after key advertisement")
        b = PeerKeys(self.round_id, self._adverts).to_bytes()
        return self._send("reveal", {c: b for c in msgs})

    def share_keys(self, reveals: dict[str, bytes]) -> dict[str, bytes]:
        """Check each nonce against its signed commitment, derive the graph, forward every nonce to everyone."""
        self._stage("share_keys")
        msgs = self._collect("reveal", reveals, NonceReveal)
        nonces = {}
        for c, m in msgs.items():
            if graph.commit_nonce(self.round_id, c, m.nonce) != self._advert_msgs[c].nonce_commit:
                self.rejected[c] = "reveal: nonce does not match its signed commitment"
                self.mark_dropout(c, "reveal")
                continue
            nonces[c] = m.nonce
        self._need(list(nonces), "after nonce reveal")
        self._adverts = {c: b for c, b in self._adverts.items() if c in nonces}
        self.graph_seed = graph.derive_seed(self.cfg.digest(), nonces)
        self._nbrs = graph.neighbours(self.client_ids, self.degree, self.graph_seed)
        b = NonceReveals(self.round_id, nonces).to_bytes()
        return self._send("share_keys", {c: b for c in nonces})

    def collect_masked(self, shares: dict[str, bytes]) -> dict[str, bytes]:
        self._stage("collect_masked")
        msgs = self._collect("share_keys", shares, EncryptedShares)
        self._u2 = set(msgs)
        self._need(list(msgs), "after share distribution")
        inbox: dict[str, dict[str, bytes]] = {c: {} for c in msgs}
        for frm, m in msgs.items():
            for to, ct in m.shares.items():
                if to in inbox and to in self._nbrs[frm]:
                    inbox[to][frm] = ct
        return self._send("collect_masked", {c: EncryptedShares(self.round_id, c, inbox[c]).to_bytes()
                                             for c in msgs})

    def consistency(self, masked: dict[str, bytes]) -> dict[str, bytes]:
        self._stage("consistency")
        msgs = self._collect("collect_masked", masked, MaskedInput)
        m, isz = self.cfg.masked_length(), np.dtype(self._dtype).itemsize
        self._masked = {}
        for c, msg in msgs.items():
            if len(msg.masked) != m * isz:
                self.rejected[c] = "collect_masked: masked vector has the wrong length"
                self.mark_dropout(c, "collect_masked")
                continue
            self._masked[c] = np.frombuffer(msg.masked, dtype=self._dtype)
        self._u3 = sorted(self._masked)
        self._need(self._u3, "after masked inputs")
        b = SurvivorSet(self.round_id, self._u3).to_bytes()
        return self._send("consistency", {c: b for c in self._u3})

    def unmask(self, signatures: dict[str, bytes]) -> dict[str, bytes]:
        self._stage("unmask")
        msgs = self._collect("consistency", signatures, ConsistencySig)
        self._need(list(msgs), "after consistency check")
        b = UnmaskRequest(self.round_id, self._u3, {c: msgs[c].signature for c in msgs}).to_bytes()
        return self._send("unmask", {c: b for c in msgs})

    def finish(self, unmask_shares: dict[str, bytes]) -> SecAggResult:
        """Reconstruct the self masks of survivors and the mask keys of dropped clients; return the sum."""
        self._stage("finish")
        msgs = self._collect("unmask", unmask_shares, UnmaskShares)
        self._need(list(msgs), "after unmasking")
        u3 = set(self._u3)
        b_pts: dict[str, dict[int, int]] = {}
        sk_pts: dict[str, dict[int, int]] = {}
        for frm, msg in msgs.items():
            x = self._index[frm] + 1
            for j, blob in msg.b_shares.items():
                if j in u3 and (j == frm or j in self._nbrs[frm]):
                    b_pts.setdefault(j, {})[x] = shamir.share_from_bytes(blob)
            for j, blob in msg.sk_shares.items():
                if j in self._u2 and j not in u3 and j in self._nbrs[frm]:
                    sk_pts.setdefault(j, {})[x] = shamir.share_from_bytes(blob)
        m = self.cfg.masked_length()
        total = np.zeros(m, dtype=self._dtype)
        for c in self._u3:
            total = total + self._masked[c]
        for j in self._u3:
            pts = b_pts.get(j, {})
            if len(pts) < self.threshold:
                self._abort(f"cannot reconstruct the self mask of {j}: {len(pts)} shares < threshold")
            total = total - prg.expand(shamir.combine(list(pts.items()), self.threshold), m, self._dtype,
                                       prg.NONCE_SELF)
        for j in sorted(self._u2 - u3):
            pts = sk_pts.get(j, {})
            if len(pts) < self.threshold:
                self._abort(f"cannot reconstruct the mask key of dropped client {j}: {len(pts)} shares")
            sk = keys.x25519_from_raw(shamir.combine(list(pts.items()), self.threshold))
            adv = AdvertiseKeys.from_bytes(self._adverts[j])
            for k in self._nbrs[j] & u3:
                kadv = AdvertiseKeys.from_bytes(self._adverts[k])
                s = keys.derive(sk, kadv.mask_pk, round_id=self.round_id, purpose=b"mask", a=j, b=k)
                mask = prg.expand(s, m, self._dtype)
                # k added +mask if k < j else -mask; remove it
                total = total - mask if k < j else total + mask
            del adv
        q = quantization.from_ring(total, self.cfg.mod_bits)
        oor = None if self.cfg.dp_sigma > 0 else int(q[self.cfg.vector_length])  # summed under the mask
        self._result = SecAggResult(True, quantization.decode(q[:self.cfg.vector_length], self.cfg.frac_bits),
                                    list(self._u3), dict(self.dropped), oor, "")
        return self._result

    def result(self) -> SecAggResult:
        """The round's outcome: the unmasked sum, or ``ok=False`` with the abort reason."""
        if self._result is None:
            return SecAggResult(False, None, [], dict(self.dropped), 0, "round not finished")
        return self._result

    def config_digest(self) -> str:
        return hashlib.sha256(self.cfg.to_bytes()).hexdigest()
