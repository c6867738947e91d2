"""In-memory driver: one SecAgg+ round between a server and n clients, with optional dropouts at each stage.

The gRPC transport mirrors this loop: for each stage, send the server's messages, collect the replies that
arrive before the deadline, hand them to the server's next method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import keys
from .client import SecAggClient
from .errors import SecAggAbort, SecAggError
from .server import SecAggResult, SecAggServer
from .stages import StageLoop


@dataclass
class RoundStats:
    """Wall time (s) per party and bytes per client (sent + received), measured by the driver."""

    server_s: float = 0.0
    client_s: dict = field(default_factory=dict)
    bytes_sent: dict = field(default_factory=dict)
    bytes_received: dict = field(default_factory=dict)
    client_errors: dict = field(default_factory=dict)

    @property
    def client_s_mean(self) -> float:
        return float(np.mean(list(self.client_s.values()))) if self.client_s else 0.0

    @property
    def bytes_per_client(self) -> float:
        ids = set(self.bytes_sent) | set(self.bytes_received)
        return float(np.mean([self.bytes_sent.get(c, 0) + self.bytes_received.get(c, 0) for c in ids])) if ids else 0.0


def make_identities(client_ids):
    """Fresh Ed25519 identities and a ``verify_peer`` that accepts exactly their raw public keys (tests/benchmarks;
    the federation uses CA-issued certificates instead)."""
    sks = {c: Ed25519PrivateKey.generate() for c in client_ids}
    registry = {c: keys.ed25519_raw_public(sk.public_key()) for c, sk in sks.items()}

    def verify_peer(cid: str, proof: bytes) -> Ed25519PublicKey:
        if registry.get(cid) != proof:
            raise SecAggError(f"unknown identity for {cid}")
        return Ed25519PublicKey.from_public_bytes(proof)

    return sks, verify_peer


def run_secagg_round(inputs: dict, *, round_id: str = "round-0", weights=None, dropouts: dict | None = None,
                     client_kwargs: dict | None = None, identities=None, tamper=None, server: SecAggServer | None = None,
                     **server_kwargs) -> tuple[SecAggResult, RoundStats]:
    """Run one round. inputs: {client_id: m scores}. weights: routing weights in sorted-id order (see
    SecAggServer). dropouts: {stage: iterable of client ids that go silent at that stage (and after)}.
    client_kwargs: {client_id: kwargs for SecAggClient} or one dict for all (e.g. ledger, max_weight).
    tamper(stage, to_client_id, payload) -> payload lets tests play a malicious server/network.
    Returns (result, stats); an abort returns ``result.ok == False`` with the reason."""
    ids = sorted(inputs)
    m = len(np.asarray(next(iter(inputs.values()))).reshape(-1))
    sks, verify = identities or make_identities(ids)
    srv = server or SecAggServer(round_id, ids, vector_length=m, weights=weights, **server_kwargs)
    ck = client_kwargs or {}
    per_client = all(isinstance(v, dict) for v in ck.values()) and set(ck) <= set(ids) and ck
    clients = {c: SecAggClient(round_id, c, identity_key=sks[c], verify_peer=verify,
                               **(ck.get(c, {}) if per_client else ck)) for c in ids}
    for c in ids:
        clients[c].set_input(inputs[c])
    stats = RoundStats(client_s={c: 0.0 for c in ids}, bytes_sent={c: 0 for c in ids},
                       bytes_received={c: 0 for c in ids})
    gone: set = set()
    drop = {s: set(v) for s, v in (dropouts or {}).items()}
    try:
        t0 = time.perf_counter()
        loop = StageLoop(srv)
        stats.server_s += time.perf_counter() - t0
        while not loop.done:
            stage = loop.stage
            gone |= drop.get(stage, set())
            replies = {}
            for c, payload in loop.outgoing.items():
                if c in gone:
                    continue
                if tamper is not None:
                    payload = tamper(stage, c, payload)
                stats.bytes_received[c] += len(payload)
                t0 = time.perf_counter()
                try:
                    _, rep = clients[c].handle(stage, payload)
                except SecAggError as e:  # the client refuses / detects an attack: it drops out
                    stats.client_errors[c] = e
                    gone.add(c)
                    continue
                finally:
                    stats.client_s[c] += time.perf_counter() - t0
                stats.bytes_sent[c] += len(rep)
                replies[c] = rep
            t0 = time.perf_counter()
            loop.advance(replies)
            stats.server_s += time.perf_counter() - t0
    except SecAggAbort:
        pass
    return srv.result(), stats
