"""Test vectors of the SecAgg+ payloads and primitives (docs/protocol.md, "Secure aggregation"), so the protocol can
be implemented outside Python. ``build_vectors()`` computes every vector with the production code from fixed inputs;
the test checks that the committed tests/vectors/secagg_v1.json is exactly what the code produces, and that every
encoded message parses back to its fields. Regenerate (only for an intended wire change, which needs a new protocol
revision): ``.venv/bin/python tests/test_protocol_vectors.py --write``."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import fields as dc_fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "secagg_v1.json"


def _h(b: bytes) -> str:
    return bytes(b).hex()


def _seed(tag: str) -> bytes:
    return hashlib.sha256(b"mor-test-vector/" + tag.encode()).digest()


def _field_json(kind: str, v):
    if kind == "bytes":
        return _h(v)
    if kind == "map":
        return {k: _h(v[k]) for k in sorted(v)}
    if kind == "f64arr":
        return [float(x) for x in np.asarray(v, dtype=np.float64).reshape(-1)]
    if kind == "strs":
        return list(v)
    return v


def _field_py(kind: str, v):
    if kind == "bytes":
        return bytes.fromhex(v)
    if kind == "map":
        return {k: bytes.fromhex(x) for k, x in v.items()}
    if kind == "f64arr":
        return np.asarray(v, dtype=np.float64)
    return v


def _messages():
    from privacy.secagg import messages as M

    rid = "r000001-00c0ffee"
    ids = ["alice", "bob", "carol"]
    b = lambda tag, n=32: _seed(tag)[:n]  # noqa: E731
    return [
        M.SetupConfig(rid, ids, 3, 2, 1, 2, np.array([1.0, 0.5, 0.25]), 16, 16.0, 64, 1.0, "error", 0.0, 0),
        M.SetupConfig(rid, ids, 3, 2, 1, 2, np.array([[1.0, 0.5], [0.5, 0.5], [0.25, 1.0]]), 16, 16.0, 64, 1.0,
                      "clip", 1234.5, 2),
        M.AdvertiseKeys(rid, "alice", b"-----BEGIN CERTIFICATE-----\n...", b("enc_pk"), b("mask_pk"),
                        b("config_digest"), b("nonce_commit"), _seed("sig") + _seed("sig2")),
        M.PeerKeys(rid, {"bob": b("advert-bob", 8), "alice": b("advert-alice", 8)}),
        M.NonceReveal(rid, "alice", b("nonce")),
        M.NonceReveals(rid, {"alice": b("nonce"), "bob": b("nonce-bob")}),
        M.EncryptedShares(rid, "alice", {"carol": b("ct-carol", 16), "bob": b("ct-bob", 16)}),
        M.MaskedInput(rid, "alice", np.array([1, 2, 2 ** 64 - 1], dtype=np.uint64).tobytes()),
        M.SurvivorSet(rid, ["alice", "carol"]),
        M.ConsistencySig(rid, "alice", _seed("csig") + _seed("csig2")),
        M.UnmaskRequest(rid, ["alice", "carol"], {"carol": b("s-carol"), "alice": b("s-alice")}),
        M.UnmaskShares(rid, "alice", {"carol": b("b-carol", 33)}, {"bob": b("sk-bob", 33)}),
    ]


def build_vectors() -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from privacy.secagg import graph, keys, prg, quantization, shamir
    from privacy.secagg.messages import MAGIC

    out = {"magic": MAGIC.decode(), "messages": [], "primitives": {}}
    for msg in _messages():
        out["messages"].append({
            "type": type(msg).__name__, "kind": msg.KIND,
            "fields": {name: _field_json(kind, getattr(msg, name)) for name, kind in msg.SPEC},
            "spec": [list(s) for s in msg.SPEC],
            "hex": msg.to_bytes().hex(),
        })
    setup = _messages()[0]
    out["primitives"]["setup_config_digest"] = {"of": "messages[0]", "sha256": _h(setup.digest())}
    rid = setup.round_id
    # X25519 + HKDF key derivation (both sides get the same key)
    a_sk = keys.x25519_from_raw(_seed("x25519-alice"))
    b_sk = keys.x25519_from_raw(_seed("x25519-bob"))
    raw_pub = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    a_pk, b_pk = a_sk.public_key().public_bytes(**raw_pub), b_sk.public_key().public_bytes(**raw_pub)
    k_enc = keys.derive(a_sk, b_pk, round_id=rid, purpose=b"enc", a="alice", b="bob")
    k_mask = keys.derive(b_sk, a_pk, round_id=rid, purpose=b"mask", a="bob", b="alice")
    out["primitives"]["derive"] = {"round_id": rid, "alice_sk": _h(_seed("x25519-alice")), "alice_pk": _h(a_pk),
                                   "bob_sk": _h(_seed("x25519-bob")), "bob_pk": _h(b_pk),
                                   "enc_key(alice,bob)": _h(k_enc), "mask_key(alice,bob)": _h(k_mask)}
    # PRG: the AES-256-CTR keystream of zero bytes read as little-endian unsigned words
    out["primitives"]["prg"] = {"key": _h(k_mask),
                                "pair_u64": [str(int(x)) for x in prg.expand(k_mask, 4, np.uint64, prg.NONCE_PAIR)],
                                "self_u32": [int(x) for x in prg.expand(k_mask, 4, np.uint32, prg.NONCE_SELF)]}
    # share encryption: AES-256-GCM, blob = nonce(12) | ciphertext+tag; AAD binds round, sender, recipient
    aad = b"|".join([b"mor-secagg/share", rid.encode(), b"alice", b"bob"])
    nonce = _seed("gcm-nonce")[:12]
    plain = shamir.share_to_bytes(12345) + shamir.share_to_bytes(shamir.P - 1)
    blob = nonce + AESGCM(k_enc).encrypt(nonce, plain, aad)
    out["primitives"]["share_encryption"] = {"key": _h(k_enc), "aad": _h(aad), "plaintext": _h(plain),
                                             "blob": _h(blob)}
    # Shamir over GF(2^256 + 297): shares of f(x) = secret + c1 x + c2 x^2 at x = 1..4 (x = index in client_ids + 1)
    secret = _seed("shamir-secret")
    c1, c2 = int.from_bytes(_seed("c1"), "big") % shamir.P, int.from_bytes(_seed("c2"), "big") % shamir.P
    ys = [(int.from_bytes(secret, "big") + c1 * x + c2 * x * x) % shamir.P for x in (1, 2, 3, 4)]
    out["primitives"]["shamir"] = {"p": str(shamir.P), "threshold": 3, "secret": _h(secret),
                                   "coefficients": [str(c1), str(c2)],
                                   "shares": {str(x): _h(shamir.share_to_bytes(y)) for x, y in zip((1, 2, 3, 4), ys)},
                                   "combined_from_2_3_4": _h(shamir.combine(list(zip((2, 3, 4), ys[1:])), 3))}
    # Ed25519 signatures (deterministic) over the canonical signed bytes
    id_key = Ed25519PrivateKey.from_private_bytes(_seed("ed25519-alice"))
    adv = _messages()[2]
    surv = _messages()[8]
    out["primitives"]["signatures"] = {
        "ed25519_seed": _h(_seed("ed25519-alice")), "public_key": _h(keys.ed25519_raw_public(id_key.public_key())),
        "advertise_signed_bytes": _h(adv.signed_bytes()), "advertise_signature": _h(id_key.sign(adv.signed_bytes())),
        "consistency_signed_bytes": _h(surv.signed_bytes("alice")),
        "consistency_signature": _h(id_key.sign(surv.signed_bytes("alice")))}
    # graph: nonce commitments, seed, neighbours
    nonces = {c: _seed("nonce-" + c) for c in ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"]}
    seed = graph.derive_seed(setup.digest(), nonces)
    nb = graph.neighbours(sorted(nonces), 4, seed)
    out["primitives"]["graph"] = {"commit_nonce(alice)": _h(graph.commit_nonce(rid, "alice", _seed("nonce"))),
                                  "config_digest": _h(setup.digest()), "nonces": {c: _h(n) for c, n in nonces.items()},
                                  "seed": _h(seed), "degree": 4, "neighbours": {c: sorted(v) for c, v in nb.items()},
                                  "threshold_for(k=4,c=1)": graph.threshold_for(4, 1)}
    # fixed point: round(w * clip(x, +-range) * 2^frac_bits) as two's complement words mod 2^mod_bits
    q, bad = quantization.encode(np.array([0.5, -1.25, 20.0]), value_range=16.0, frac_bits=16, policy="clip",
                                 weight=np.array([1.0, 0.5, 0.25]))
    out["primitives"]["quantization"] = {"x": [0.5, -1.25, 20.0], "weights": [1.0, 0.5, 0.25], "value_range": 16.0,
                                         "frac_bits": 16, "encoded": [int(v) for v in q], "out_of_range": bad,
                                         "words_mod_2^32": [int(v) for v in quantization.to_ring(q, 32)]}
    return out


def test_committed_vectors_are_what_the_code_produces():
    committed = json.loads(VECTORS.read_text())
    assert committed == json.loads(json.dumps(build_vectors())), \
        "SecAgg wire vectors changed: an intended wire change needs a new protocol revision (see docstring)"


def test_every_vector_message_parses_back_to_its_fields():
    from privacy.secagg import messages as M

    for v in json.loads(VECTORS.read_text())["messages"]:
        cls = getattr(M, v["type"])
        data = bytes.fromhex(v["hex"])
        assert data[:4] == b"MSA1" and data[4] == v["kind"]
        msg = cls.from_bytes(data)
        for name, kind in cls.SPEC:
            want = _field_py(kind, v["fields"][name])
            got = getattr(msg, name)
            if kind == "f64arr":
                assert np.array_equal(np.asarray(got).reshape(-1), want)
            else:
                assert got == want, (v["type"], name)
        assert [f.name for f in dc_fields(cls)] == [n for n, _ in cls.SPEC]


def test_primitives_decrypt_and_combine():
    from privacy.secagg import keys, shamir

    p = json.loads(VECTORS.read_text())["primitives"]
    enc = p["share_encryption"]
    assert keys.decrypt(bytes.fromhex(enc["key"]), bytes.fromhex(enc["blob"]), bytes.fromhex(enc["aad"])) == \
        bytes.fromhex(enc["plaintext"])
    sh = p["shamir"]
    pts = [(int(x), shamir.share_from_bytes(bytes.fromhex(y))) for x, y in sh["shares"].items()]
    assert shamir.combine(pts[:3], 3).hex() == sh["secret"] == sh["combined_from_2_3_4"]


if __name__ == "__main__":
    if "--write" in sys.argv:
        VECTORS.write_text(json.dumps(build_vectors(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {VECTORS}")


def _documented_neighbours(ids: list[str], degree: int, seed: bytes) -> dict[str, set[str]]:
    """docs/protocol.md §6.3, written from the text (no numpy): Fisher-Yates over the sorted ids, j uniform in
    [0, i] from big-endian 64-bit words of SHA-256("mor-secagg-graph-order\\0" | seed | u64 counter), rejecting
    words >= 2^64 - (2^64 mod (i+1)); neighbours = degree/2 on either side on that ring."""
    def words():
        ctr = 0
        while True:
            block = hashlib.sha256(b"mor-secagg-graph-order\x00" + seed + ctr.to_bytes(8, "big")).digest()
            for k in range(0, 32, 8):
                yield int.from_bytes(block[k:k + 8], "big")
            ctr += 1
    order, w = sorted(ids), words()
    if degree >= len(order) - 1:
        return {c: set(order) - {c} for c in order}
    for i in range(len(order) - 1, 0, -1):
        limit = (1 << 64) - ((1 << 64) % (i + 1))
        x = next(w)
        while x >= limit:
            x = next(w)
        j = x % (i + 1)
        order[i], order[j] = order[j], order[i]
    n, h = len(order), degree // 2
    return {c: {order[(order.index(c) + d) % n] for d in range(-h, h + 1) if d} for c in order}


def test_graph_is_the_documented_portable_shuffle():
    """The SecAgg+ graph must be computable outside Python: no language-specific RNG in its definition."""
    from privacy.secagg import graph

    for n, k in ((8, 4), (13, 6), (40, 12)):
        ids = [f"client-{i:02d}" for i in range(n)]
        for s in range(5):
            seed = _seed(f"graph-{n}-{s}")
            got = {c: set(v) for c, v in graph.neighbours(ids, k, seed).items()}
            assert got == _documented_neighbours(ids, k, seed), (n, k, s)
