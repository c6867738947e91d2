"""SecAgg+ client state machine (pure: bytes in, bytes out, no network).

Usage (the transport calls ``handle`` once per stage, in order)::

    c = SecAggClient(round_id, "alice", identity_key=sk, verify_peer=verify, identity_proof=cert_bytes,
                     max_weight=0.5, min_contributors=3, ledger=ledger)
    c.set_input(scores)                       # this client's m raw scores (floats); or handle(..., values=scores)
    stage, reply = c.handle(STAGE_SETUP, cfg)  # the routing weight comes in the server's SetupConfig
    ...                                       # handle(stage, payload) for share_keys, collect_masked, consistency,
                                              # unmask; the reply to unmask is the client's last message

The client multiplies its scores by its routing weight(s) from the config (scalar or per item), encodes them in
fixed point, adds its discrete-Gaussian share of noise in ``secagg+dp`` mode, and masks them. It refuses
(``WeightIsolationError``) weights above ``max_weight`` or fewer than ``min_contributors`` *effective*
contributors on an item it contributes to (a client counts only if its weight on that item is at least
``min_weight_grid_steps`` fixed-point steps and at least ``min_weight_fraction`` of this client's own weight; in
``secagg+dp``, where the noise covers an isolated client, any non-zero weight counts), both at setup and again
against the final survivor set. It refuses a round whose signed config tolerates fewer
colluders than ``min_collusion_tolerance`` or whose threshold does not resist the colluders it names
(``2t > degree + 1 + c``). With a ``query_audit`` it refuses a round id it has seen before and, in plain
``secagg``, a sum over an item it already helped sum with another cohort or other weights. Every stage is
accepted once, in order, for this round id only (replays raise ``ProtocolViolation``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import ddp, graph, keys, prg, quantization, shamir
from .errors import ParameterError, ProtocolViolation, SecAggError, WeightIsolationError
from .query_audit import cohort_keys
from .messages import (AdvertiseKeys, ConsistencySig, EncryptedShares, MaskedInput, NonceReveal, NonceReveals,
                       PeerKeys, SetupConfig, SurvivorSet, UnmaskRequest, UnmaskShares)
from .stages import (STAGE_COLLECT_MASKED, STAGE_CONSISTENCY, STAGE_REVEAL, STAGE_SETUP, STAGE_SHARE_KEYS,
                     STAGE_UNMASK, STAGES)


def check_round_params(cfg: SetupConfig) -> None:
    """Threshold/degree/modulus checks shared by client and server (ParameterError naming the field)."""
    n = len(cfg.client_ids)
    if len(set(cfg.client_ids)) != n or list(cfg.client_ids) != sorted(cfg.client_ids):
        raise ParameterError("client_ids must be unique and sorted")
    k = min(cfg.degree, n - 1)
    c = cfg.max_colluders
    if c > k:
        raise ParameterError(f"max_colluders {c} exceeds the degree {k}: no threshold <= degree+1 can resist it")
    if not graph.threshold_ok(k, c, cfg.threshold):
        lo = graph.threshold_for(k, c)
        raise ParameterError(f"threshold {cfg.threshold} does not resist {c} colluding share holders: need "
                             f"(degree+1+max_colluders)/2 < t <= degree+1, i.e. t in [{lo}, {k + 1}] for degree "
                             f"{k}; raise the threshold or lower max_colluders")
    if cfg.out_of_range not in ("error", "clip"):
        raise ParameterError(f"out_of_range must be 'error' or 'clip', got {cfg.out_of_range!r}")
    w = cfg.weight_matrix()
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ParameterError("weights must be finite and non-negative")
    if np.max(w) > cfg.weight_cap + 1e-12:
        raise ParameterError(f"a weight {np.max(w):.4g} exceeds the round's weight_cap {cfg.weight_cap}")
    if cfg.dp_sigma > 0 and not (1 <= cfg.dp_min_survivors <= n):
        raise ParameterError(f"dp_min_survivors must be in [1, {n}] in secagg+dp mode")
    got = quantization.check_modulus(n, cfg.value_range, cfg.weight_cap, cfg.frac_bits, cfg.mod_bits, cfg.dp_sigma,
                                     count_max=cfg.vector_length)
    if got != cfg.mod_bits:
        raise ParameterError(f"mod_bits {cfg.mod_bits} is too small for this round")


class SecAggClient:
    """One client's side of one SecAgg+ round (Bell et al. 2020 over Bonawitz et al. 2017, active-server model).

    identity_key: this client's long-term Ed25519 key (signs its ephemeral keys and the survivor set).
    verify_peer(client_id, identity_proof) -> Ed25519PublicKey: raises if the proof is not valid for client_id.
    identity_proof: bytes peers verify (a certificate); defaults to the raw Ed25519 public key.
    max_weight / min_contributors / min_weight_fraction / min_weight_grid_steps: this client's isolation policy
    (see the module docstring). min_collusion_tolerance: the fewest colluders (per neighbourhood) a round must
    tolerate; a config naming fewer is refused, so the server cannot lower it. ledger: a ``PrivacyLedger`` charged
    (unit client, mechanism ``secagg+dp``) before the masked input leaves, in ``secagg+dp`` rounds; required there.
    query_audit: a :class:`~privacy.secagg.query_audit.QueryAudit` (round ids never reused; differencing guard in
    plain ``secagg``, which also needs ``item_digests``: one content digest per coordinate).
    """

    def __init__(self, round_id: str, client_id: str, *, identity_key: Ed25519PrivateKey,
                 verify_peer: Callable[[str, bytes], Ed25519PublicKey], identity_proof: bytes | None = None,
                 max_weight: float = 1.0, min_contributors: int = 2, min_weight_fraction: float = 0.1,
                 min_weight_grid_steps: float = 16.0, min_collusion_tolerance: int = 1, ledger=None, rng=None,
                 query_audit=None, item_digests=None):
        self.round_id, self.client_id = round_id, client_id
        self._id_key = identity_key
        self._verify_peer = verify_peer
        self._proof = identity_proof if identity_proof is not None else keys.ed25519_raw_public(
            identity_key.public_key())
        if not (0.0 <= min_weight_fraction <= 1.0):
            raise ParameterError(f"min_weight_fraction must be in [0, 1], got {min_weight_fraction!r}")
        if not (min_weight_grid_steps >= 0):
            raise ParameterError(f"min_weight_grid_steps must be >= 0, got {min_weight_grid_steps!r}")
        if int(min_collusion_tolerance) < 0:
            raise ParameterError(f"min_collusion_tolerance must be >= 0, got {min_collusion_tolerance!r}")
        self.max_weight, self.min_contributors = float(max_weight), int(min_contributors)
        self.min_weight_fraction, self.min_weight_grid_steps = float(min_weight_fraction), float(min_weight_grid_steps)
        self.min_collusion_tolerance = int(min_collusion_tolerance)
        self.query_audit = query_audit
        self._item_digests = None if item_digests is None else [bytes(d) for d in item_digests]
        self.ledger = ledger
        self._rng = rng
        self._values: np.ndarray | None = None
        self._next = 0
        self.charge = None
        self.dp_rho: float | None = None

    # ------------------------------------------------------------------ API
    def set_input(self, values) -> None:
        """This client's raw scores (length = the round's vector_length); weighting happens inside."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        self._values = v

    @property
    def done(self) -> bool:
        return self._next >= len(STAGES)

    def handle(self, stage: str, payload: bytes, *, values=None) -> tuple[str, bytes]:
        """Consume the server's message for ``stage``; return ``(stage, reply bytes)``."""
        if values is not None:
            self.set_input(values)
        if self._next >= len(STAGES) or stage != STAGES[self._next]:
            exp = STAGES[self._next] if self._next < len(STAGES) else "nothing (round finished)"
            raise ProtocolViolation(f"client {self.client_id}: got stage {stage!r}, expected {exp} (replay or "
                                    "out-of-order message refused)")
        fn = {STAGE_SETUP: self._setup, STAGE_REVEAL: self._reveal, STAGE_SHARE_KEYS: self._share_keys,
              STAGE_COLLECT_MASKED: self._collect_masked, STAGE_CONSISTENCY: self._consistency,
              STAGE_UNMASK: self._unmask}[stage]
        self._next = len(STAGES)  # any failure ends this client's round
        out = fn(payload)
        self._next = STAGES.index(stage) + 1
        return stage, out

    # ------------------------------------------------------------------ stages
    def _x(self, cid: str) -> int:
        return self._index[cid] + 1

    def _setup(self, payload: bytes) -> bytes:
        cfg = SetupConfig.from_bytes(payload, round_id=self.round_id)
        if self.client_id not in cfg.client_ids:
            raise ProtocolViolation(f"client {self.client_id} is not in this round's client list")
        check_round_params(cfg)
        if cfg.max_colluders < self.min_collusion_tolerance:
            raise ParameterError(f"the round tolerates max_colluders={cfg.max_colluders} colluding clients; this "
                                 f"client requires at least {self.min_collusion_tolerance} (min_collusion_tolerance)")
        if self._item_digests is not None and len(self._item_digests) != cfg.vector_length:
            raise SecAggError(f"{len(self._item_digests)} item digests for {cfg.vector_length} scores")
        if self._values is None:
            raise SecAggError("no input: call set_input(values) or pass values= with the setup stage")
        if self._values.size != cfg.vector_length:
            raise SecAggError(f"input has {self._values.size} values, the round expects {cfg.vector_length}")
        self.cfg = cfg
        self._digest = cfg.digest()
        self._index = {c: i for i, c in enumerate(cfg.client_ids)}
        self._w = cfg.weight_matrix()
        self._check_isolation(cfg.client_ids, "setup")
        if self.query_audit is not None:  # persisted before anything leaves: a round id is used once, ever
            self.query_audit.claim_round(self.round_id)
        self._dtype = quantization.word_dtype(cfg.mod_bits)
        self._enc_sk, _, enc_pk = keys.new_x25519()
        self._mask_sk, self._mask_sk_raw, mask_pk = keys.new_x25519()
        self._nonce = __import__("os").urandom(32)
        adv = AdvertiseKeys(self.round_id, self.client_id, self._proof, enc_pk, mask_pk, self._digest,
                            graph.commit_nonce(self.round_id, self.client_id, self._nonce), b"")
        adv.signature = keys.sign(self._id_key, adv.signed_bytes())
        self._advert = adv.to_bytes()
        return self._advert

    def _check_isolation(self, present, when: str) -> None:
        row = self._w[self._index[self.client_id]]
        if np.max(row) > self.max_weight + 1e-12:
            raise WeightIsolationError(f"{when}: routing weight {np.max(row):.4g} for {self.client_id} exceeds this "
                                       f"client's cap max_weight={self.max_weight}")
        mine = row > 0
        if not np.any(mine):
            return
        # a peer is an effective contributor on an item only if its weight moves the sum by several fixed-point
        # steps and is not negligible next to this client's own weight (else the sum is ~ this client's score)
        floor = np.maximum(self.min_weight_grid_steps * 2.0 ** -self.cfg.frac_bits, self.min_weight_fraction * row)
        if self.cfg.dp_sigma > 0:
            # secagg+dp: the sum carries noise calibrated to weight_cap whatever the others' weights, so the ledger's
            # epsilon covers an isolated client too; a peer counts with any non-zero weight (as before)
            floor = np.full(row.shape, np.finfo(np.float64).tiny)
        others = [self._index[c] for c in present if c != self.client_id]
        eff = 1 + np.count_nonzero(self._w[others] >= floor, axis=0) if others else np.ones(row.size, dtype=int)
        worst = int(np.argmin(np.where(mine, eff, np.iinfo(np.int64).max)))
        if int(eff[worst]) < self.min_contributors:
            raise WeightIsolationError(f"{when}: only {int(eff[worst])} effective contributor(s) (this client "
                                       f"included) on item coordinate {worst}: a peer counts only with weight >= "
                                       f"{floor[worst]:.3g} (min_weight_grid_steps={self.min_weight_grid_steps:g} "
                                       f"fixed-point steps, min_weight_fraction={self.min_weight_fraction:g} of this "
                                       f"client's {row[worst]:.3g}); min_contributors={self.min_contributors}: "
                                       "refusing to be isolated")

    def _reveal(self, payload: bytes) -> bytes:
        """Verify every participant's signed advertisement (keys + nonce commitment), then reveal our nonce."""
        msg = PeerKeys.from_bytes(payload, round_id=self.round_id)
        if msg.adverts.get(self.client_id) != self._advert:
            raise ProtocolViolation("the server altered or omitted this client's own key advertisement")
        members = set(self.cfg.client_ids)
        verified = {}
        for cid, blob in msg.adverts.items():
            if cid == self.client_id:
                continue
            if cid not in members:
                raise ProtocolViolation(f"server forwarded keys of {cid}, who is not in this round's client list")
            adv = AdvertiseKeys.from_bytes(blob, round_id=self.round_id)
            if adv.client_id != cid:
                raise ProtocolViolation(f"key advertisement of {adv.client_id} presented as {cid}")
            try:
                pk = self._verify_peer(cid, adv.identity_proof)
            except Exception as e:
                raise ProtocolViolation(f"identity proof of {cid} rejected: {e}") from None
            keys.verify(pk, adv.signature, adv.signed_bytes(), f"key advertisement of {cid} (forged key?)")
            if adv.config_digest != self._digest:
                raise ProtocolViolation(f"{cid} received a different round config (server equivocation)")
            if len(adv.nonce_commit) != 32:
                raise ProtocolViolation(f"nonce commitment of {cid} is not 32 bytes")
            verified[cid] = (pk, adv)
        self._verified = verified
        return NonceReveal(self.round_id, self.client_id, self._nonce).to_bytes()

    def _share_keys(self, payload: bytes) -> bytes:
        msg = NonceReveals.from_bytes(payload, round_id=self.round_id)
        if msg.nonces.get(self.client_id) != self._nonce:
            raise ProtocolViolation("the server altered or omitted this client's graph nonce")
        for cid, nonce in msg.nonces.items():
            if cid == self.client_id:
                continue
            if cid not in self._verified:
                raise ProtocolViolation(f"nonce of {cid}, who did not advertise keys in this round")
            if graph.commit_nonce(self.round_id, cid, nonce) != self._verified[cid][1].nonce_commit:
                raise ProtocolViolation(f"nonce of {cid} does not match its signed commitment (graph grinding?)")
        # the graph seed hashes every revealed nonce, each fixed by a signed commitment made before any was known
        self.graph_seed = graph.derive_seed(self._digest, msg.nonces)
        self._nbrs = graph.neighbours(list(self.cfg.client_ids), self.cfg.degree, self.graph_seed)[self.client_id]
        self._peers = {c: v for c, v in self._verified.items() if c in self._nbrs and c in msg.nonces}
        holders = sorted(set(self._peers) | {self.client_id})
        if len(holders) < self.cfg.threshold:
            raise SecAggError(f"only {len(holders)} share holders alive, threshold {self.cfg.threshold}")
        self._b = __import__("os").urandom(32)
        xs = [self._x(c) for c in holders]
        b_sh = shamir.split(self._b, xs, self.cfg.threshold)
        sk_sh = shamir.split(self._mask_sk_raw, xs, self.cfg.threshold)
        self._received = {}
        out = {}
        for c, bs, ss in zip(holders, b_sh, sk_sh):
            if c == self.client_id:
                self._received[c] = (bs, ss)
                continue
            key = keys.derive(self._enc_sk, self._peers[c][1].enc_pk, round_id=self.round_id, purpose=b"enc",
                              a=self.client_id, b=c)
            out[c] = keys.encrypt(key, shamir.share_to_bytes(bs) + shamir.share_to_bytes(ss),
                                  self._aad(self.client_id, c))
        return EncryptedShares(self.round_id, self.client_id, out).to_bytes()

    def _aad(self, frm: str, to: str) -> bytes:
        return b"|".join([b"mor-secagg/share", self.round_id.encode(), frm.encode(), to.encode()])

    def _collect_masked(self, payload: bytes) -> bytes:
        msg = EncryptedShares.from_bytes(payload, round_id=self.round_id)
        if msg.client_id != self.client_id:
            raise ProtocolViolation("shares addressed to another client")
        for frm, blob in msg.shares.items():
            if frm not in self._peers:
                raise ProtocolViolation(f"share from {frm}, who is not a verified neighbour")
            key = keys.derive(self._enc_sk, self._peers[frm][1].enc_pk, round_id=self.round_id, purpose=b"enc",
                              a=self.client_id, b=frm)
            pt = keys.decrypt(key, blob, self._aad(frm, self.client_id))
            if len(pt) != 2 * shamir.SHARE_BYTES:
                raise ProtocolViolation(f"share from {frm} has the wrong length")
            try:
                self._received[frm] = (shamir.share_from_bytes(pt[:33]), shamir.share_from_bytes(pt[33:]))
            except ValueError as e:
                raise ProtocolViolation(f"share from {frm}: {e}") from None
        self._u2 = set(msg.shares) | {self.client_id}
        cfg = self.cfg
        # range check on the raw scores (DP mode always clips: that is the DP clip), then weight, then round
        q, bad = quantization.encode(self._values, value_range=cfg.value_range, frac_bits=cfg.frac_bits,
                                     policy="clip" if cfg.dp_sigma > 0 else cfg.out_of_range,
                                     weight=self._w[self._index[self.client_id]])
        if cfg.dp_sigma == 0 and self.query_audit is not None and self._item_digests is not None:
            # plain secagg reveals the exact sum: refuse a sum that differs from an earlier one on the same item
            self.query_audit.check_and_record(self.round_id, self._item_digests,
                                              cohort_keys(list(cfg.client_ids), self._w))
        if cfg.dp_sigma > 0:
            from .. import dp as _dp  # lazy: keeps `import privacy.secagg` free of the accounting stack
            self.dp_rho = ddp.rho(cfg.dp_sigma, value_range=cfg.value_range, weight_cap=cfg.weight_cap,
                                  frac_bits=cfg.frac_bits, m=cfg.vector_length, survivors=cfg.dp_min_survivors)
            if self.ledger is None:
                raise SecAggError("secagg+dp needs a privacy ledger on the client to charge the release")
            # charged before the masked (noisy) input leaves; raises BudgetExceeded to refuse
            self.charge = self.ledger.charge_release(round_id=self.round_id, noise_multiplier=0.0,
                                                     mechanism="secagg+dp",
                                                     meta={"rho": self.dp_rho, "sigma_int": cfg.dp_sigma,
                                                           "min_survivors": cfg.dp_min_survivors,
                                                           "m": cfg.vector_length})
            q = q + _dp.discrete_gaussian(cfg.dp_sigma, q.size, self._rng)
        else:  # the clipped-score count rides as one more masked coordinate: the server sees only the total
            q = np.concatenate([q, np.array([bad], dtype=np.int64)])
        y = quantization.to_ring(q, cfg.mod_bits)
        m = cfg.masked_length()
        y = y + prg.expand(self._b, m, self._dtype, prg.NONCE_SELF)
        for j in sorted(self._u2 - {self.client_id}):
            s = keys.derive(self._mask_sk, self._peers[j][1].mask_pk, round_id=self.round_id, purpose=b"mask",
                            a=self.client_id, b=j)
            mask = prg.expand(s, m, self._dtype)
            y = y + mask if self.client_id < j else y - mask
        return MaskedInput(self.round_id, self.client_id, y.astype(self._dtype).tobytes()).to_bytes()

    def _consistency(self, payload: bytes) -> bytes:
        msg = SurvivorSet.from_bytes(payload, round_id=self.round_id)
        u3 = set(msg.survivors)
        if len(u3) != len(msg.survivors) or not u3 <= set(self.cfg.client_ids):
            raise ProtocolViolation("survivor set has duplicates or unknown clients")
        if self.client_id not in u3:
            raise ProtocolViolation("survivor set omits this client, which sent its masked input")
        if (u3 & set(self._nbrs)) - self._u2:
            raise ProtocolViolation("survivor set contains neighbours that never sent shares")
        if len(u3) < self.cfg.threshold:
            raise SecAggError(f"only {len(u3)} survivors, threshold {self.cfg.threshold}: refusing to continue")
        if self.cfg.dp_sigma > 0 and len(u3) < self.cfg.dp_min_survivors:
            raise SecAggError(f"only {len(u3)} survivors, secagg+dp noise was calibrated for at least "
                              f"{self.cfg.dp_min_survivors}: refusing to unmask")
        self._check_isolation(sorted(u3), "consistency")
        if self.cfg.dp_sigma == 0 and self.query_audit is not None and self._item_digests is not None:
            effective = cohort_keys(list(self.cfg.client_ids), self._w, present=u3)
            if effective != cohort_keys(list(self.cfg.client_ids), self._w):
                # the survivors differ from the requested cohort: the sum that would be unmasked is another query
                self.query_audit.check_and_record(self.round_id, self._item_digests, effective)
        self._u3 = msg
        return ConsistencySig(self.round_id, self.client_id,
                              keys.sign(self._id_key, msg.signed_bytes(self.client_id))).to_bytes()

    def _unmask(self, payload: bytes) -> bytes:
        msg = UnmaskRequest.from_bytes(payload, round_id=self.round_id)
        if sorted(msg.survivors) != sorted(self._u3.survivors):
            raise ProtocolViolation("unmask request names a different survivor set than the one signed")
        valid = 0
        for cid, sig in msg.signatures.items():
            if cid == self.client_id:
                keys.verify(self._id_key.public_key(), sig, self._u3.signed_bytes(cid), "own consistency signature")
                valid += 1
            elif cid in self._peers:
                keys.verify(self._peers[cid][0], sig, self._u3.signed_bytes(cid),
                            f"survivor set signed by {cid} (the server told clients different survivor sets)")
                valid += 1
        if valid < self.cfg.threshold:
            raise SecAggError(f"only {valid} valid consistency signatures from share holders, threshold "
                              f"{self.cfg.threshold}: refusing to unmask")
        u3 = set(self._u3.survivors)
        b_out, sk_out = {}, {}
        for j, (bs, ss) in self._received.items():
            if j in u3:
                b_out[j] = shamir.share_to_bytes(bs)
            elif j in self._u2:
                sk_out[j] = shamir.share_to_bytes(ss)
        return UnmaskShares(self.round_id, self.client_id, b_out, sk_out).to_bytes()
