"""Audit-log writer: chaining, checkpoints, Merkle proofs, payload policy, secrets, crash safety."""

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.audit import (AuditError, AuditLog, LogCorruptError, SecretPayloadError, TornTailError, read_entries,
                           value_digest, verify_inclusion, verify_log)
from privacy.audit import merkle


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def _round(i, mode="dp", **kw):
    return {"round_id": f"r{i}", "mode": mode, "participants": ["alice", "bob"], "dropouts": [],
            "task_digest": f"{i:064x}", "weights_digest": f"{i + 1:064x}", "aggregate": {"mean": 0.5, "n": 64},
            "epsilon_charged": {"alice": 0.25, "bob": 0.25}, **kw}


def test_roundtrip_chain_and_checkpoints(tmp_path):
    p = tmp_path / "server.jsonl"
    key = _key(1)
    with AuditLog(p, signing_key=key, actor="server", checkpoint_every=4) as log:
        entries = [log.append("round", _round(i)) for i in range(10)]
    assert [e.seq for e in entries] == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12]  # a checkpoint after every 4 entries
    stored = read_entries(p)
    assert stored[0].event == "genesis" and stored[-1].event == "checkpoint" and stored[-1].payload["final"]
    assert all(b.prev == a.hash for a, b in zip(stored, stored[1:]))
    assert [e.seq for e in stored if e.event == "checkpoint"] == [5, 10, 13]
    res = verify_log(p, key.public_key())
    assert res.ok and res.sealed and res.key_pinned and res.n == 14 and res.checkpoints == 3, res.reason
    # reopening a sealed log continues the same chain without a recovery entry
    with AuditLog(p, signing_key=key, actor="server") as log:
        assert log.recovered is None and log.size == 14
        log.append("config", {"checkpoint_every": 4})
    assert verify_log(p, key.public_key()).n == 16


def test_merkle_inclusion_proofs_against_signed_checkpoints(tmp_path):
    p = tmp_path / "a.jsonl"
    with AuditLog(p, signing_key=_key(2), actor="alice", checkpoint_every=5) as log:
        for i in range(12):
            log.append("release", {"round_id": f"r{i}", "mode": "dp", "released": 8, "epsilon_charged": 0.1,
                                   "epsilon_total": 0.1 * (i + 1)})
        proofs = {}
        entries = read_entries(p)
        ckpts = [e for e in entries if e.event == "checkpoint"]
        for c in ckpts:
            for seq in range(c.payload["count"]):
                proofs[(seq, c.seq)] = log.inclusion_proof(seq, c.payload["count"])
    for (seq, cseq), proof in proofs.items():
        c = entries[cseq]
        leaf = merkle.leaf_hash(bytes.fromhex(entries[seq].hash))
        root = bytes.fromhex(c.payload["root"])
        assert verify_inclusion(leaf, seq, c.payload["count"], [bytes.fromhex(h) for h in proof], root)
        other = merkle.leaf_hash(bytes.fromhex(entries[(seq + 1) % c.payload["count"]].hash))
        assert c.payload["count"] == 1 or not verify_inclusion(other, seq, c.payload["count"],
                                                               [bytes.fromhex(h) for h in proof], root)


def _mth(leaves):  # RFC 9162 §2.1.1, literally
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 70), data=st.data())
def test_merkle_matches_rfc9162_definition(n, data):
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    assert merkle.root_from_leaves(leaves) == _mth(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = merkle.inclusion_proof(leaves, i)
    assert merkle.verify_inclusion(leaves[i], i, n, proof, _mth(leaves))
    assert not merkle.verify_inclusion(leaves[i], i, n, proof, merkle.leaf_hash(b"other"))
    if n > 1:
        assert not merkle.verify_inclusion(leaves[i], (i + 1) % n, n, proof, _mth(leaves))


def test_payload_policy_refuses_secrets_and_secagg_scores(tmp_path):
    log = AuditLog(tmp_path / "c.jsonl", signing_key=_key(3), actor="carol")
    for bad in ({"mask_seed": 7}, {"round_id": 1, "pairwise": {"shares": [1, 2]}}, {"secretKey": "x"},
                {"token": "abc"}, {"private": True}, {"nested": [{"key": "v"}]},
                {"cert": _key(9).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()).decode()}):
        with pytest.raises(SecretPayloadError, match="payload"):
            log.append("config", bad)
    with pytest.raises(SecretPayloadError, match="secagg"):
        log.append("release", {"round_id": "r1", "mode": "secagg", "scores": [0.1, 0.2]})
    with pytest.raises(SecretPayloadError, match="secagg"):
        log.append("round", {"round_id": "r1", "mode": "secagg+dp", "per_client": {"alice": {"raw_scores": [1.0]}}})
    # public material, counts, aggregates and dp/plain scores are fine
    log.append("registration", {"client": "alice", "public_key": "ab" * 32, "key_id": "k1", "n_shares": 3})
    log.append("round", {"round_id": "r1", "mode": "secagg", "aggregate": {"weighted_scores_sum": [0.5, 0.25]}})
    e = log.append("release", {"round_id": "r2", "mode": "dp", "scores": [0.125] * 1000, "blob": b"\x00" * 10})
    assert e.payload["scores"] == value_digest([0.125] * 1000)  # bulky: stored as its digest
    assert e.payload["blob"] == value_digest(b"\x00" * 10)
    with pytest.raises(ValueError, match="unknown audit event"):
        log.append("checkpoint", {})
    with pytest.raises(AuditError, match="NaN"):
        log.append("note", {"x": float("nan")})
    log.close()
    assert verify_log(tmp_path / "c.jsonl", _key(3).public_key()).ok


def test_secrets_never_appear_in_any_log(tmp_path, pki_dir):
    """Plant real secret material around a run, log everything the protocol logs, then scan every byte written."""
    from privacy import pki

    creds = pki.ClientCredentials.from_dir(pki_dir / "clients" / "alice")
    ident = creds.identity_key()
    rng_bytes = bytes(range(7, 39))
    planted = {
        "identity key PEM body": creds.identity_key_pem.decode().split("\n")[1],
        "identity key raw": ident.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                serialization.NoEncryption()).hex(),
        "tls key PEM body": creds.tls_key_pem.decode().split("\n")[1],
        "mask seed hex": rng_bytes.hex(),
        "mask seed b64": base64.b64encode(rng_bytes).decode(),
        "raw secagg score": "0.7316958291",
    }
    raw_scores = [0.7316958291, -0.1171717171]
    server = AuditLog(tmp_path / "server.jsonl", signing_key=_key(4), actor="server", checkpoint_every=3)
    client = AuditLog(tmp_path / "alice.jsonl", signing_key=ident, actor="alice", checkpoint_every=3)
    attempts = [
        (client, "registration", {"client": "alice", "identity_key": creds.identity_key_pem.decode()}),
        (client, "config", {"secagg": {"seed": rng_bytes.hex()}}),
        (client, "release", {"round_id": "r1", "mode": "secagg", "scores": raw_scores}),
        (server, "round", {"round_id": "r1", "mode": "secagg", "masked": {"alice": {"mask": rng_bytes}}}),
        (server, "note", {"text": creds.tls_key_pem.decode()}),
    ]
    for log, ev, pl in attempts:
        with pytest.raises(SecretPayloadError):
            log.append(ev, pl)
    cert = pki.common_name(__import__("cryptography.x509", fromlist=["x"]).load_pem_x509_certificate(
        creds.identity_cert_pem))
    server.append("registration", {"client": cert, "identity_cert_sha256": value_digest(creds.identity_cert_pem)})
    for r in range(5):
        server.append("round", _round(r, mode="secagg", aggregate={"mean": 0.3, "n": 2}))
        client.append("release", {"round_id": f"r{r}", "mode": "secagg", "released": 2, "epsilon_charged": 0.0,
                                  "epsilon_total": 0.0})
    server.close()
    client.close()
    written = b"".join(f.read_bytes() for f in tmp_path.iterdir() if f.is_file())
    assert len(written) > 2000
    for what, s in planted.items():
        assert s.encode() not in written, f"{what} leaked into an audit log"
    assert verify_log(tmp_path / "alice.jsonl", ident.public_key()).ok


def test_torn_tail_detected_and_recovered_with_record(tmp_path):
    p = tmp_path / "s.jsonl"
    key = _key(5)
    log = AuditLog(p, signing_key=key, actor="server", checkpoint_every=100)
    for i in range(3):
        log.append("round", _round(i))
    log.close()
    good = p.read_bytes()
    torn = b'{"v":1,"seq":5,"time":"2026-'
    p.write_bytes(good + torn)
    res = verify_log(p, key.public_key())
    assert not res.ok and res.first_bad_seq == 5 and "torn" in res.reason
    with pytest.raises(TornTailError, match="torn") as ei:
        AuditLog(p, signing_key=key, actor="server")
    assert ei.value.offset == len(good) and ei.value.data == torn
    assert p.read_bytes() == good + torn  # nothing dropped by the failed open
    with AuditLog(p, signing_key=key, actor="server", on_torn="recover") as log:
        rec = log.recovered.payload
    side = tmp_path / rec["torn_saved_to"]
    assert side.read_bytes() == torn
    assert rec["torn_offset"] == len(good) and rec["torn_bytes"] == len(torn) and rec["reason"] == "torn_tail"
    assert rec["torn_sha256"] == __import__("hashlib").sha256(torn).hexdigest()
    assert verify_log(p, key.public_key()).ok


_CHILD = textwrap.dedent("""
    import os, signal, sys
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from privacy.audit import AuditLog
    path, mode = sys.argv[1], sys.argv[2]
    log = AuditLog(path, signing_key=Ed25519PrivateKey.from_private_bytes(bytes([6]) * 32), actor="server",
                   checkpoint_every=4)
    for i in range(6):
        log.append("round", {"round_id": f"r{i}", "mode": "dp", "epsilon_charged": {"alice": 0.5}})
    if mode == "midwrite":  # the next entry's write is cut short by the crash
        line = log._make("round", {"round_id": "r6", "mode": "dp"}).line()
        os.write(log._fd, line[: len(line) // 2])
    print("acknowledged r5", flush=True)  # the action the last entry records
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("mode", ["after_entry", "midwrite"])
def test_crash_leaves_a_consistent_log(tmp_path, mode):
    p = tmp_path / "s.jsonl"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(p), mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "acknowledged r5" in proc.stdout, proc.stderr
    key = _key(6)
    res = verify_log(p, key.public_key(), allow_open=mode == "after_entry")
    if mode == "after_entry":  # every acknowledged entry is on disk and verifies; the log is open, not sealed
        assert res.ok and [e.payload.get("round_id") for e in res.entries if e.event == "round"][-1] == "r5"
        assert not verify_log(p, key.public_key()).ok  # without --allow-open the missing seal is reported
        with AuditLog(p, signing_key=key, actor="server") as log:
            rec = log.recovered.payload
        assert rec["reason"] == "unclean_shutdown" and rec["last_seq"] == res.n - 1 and rec["unsealed_entries"] == 2  # r4, r5
    else:
        assert not res.ok and res.first_bad_seq == res.n and "torn" in res.reason
        with pytest.raises(TornTailError):
            AuditLog(p, signing_key=key, actor="server")
        with AuditLog(p, signing_key=key, actor="server", on_torn="recover") as log:
            assert log.recovered.payload["reason"] == "torn_tail"
    final = verify_log(p, key.public_key())
    assert final.ok and final.sealed
    assert sum(e.event == "round" for e in final.entries) == 6


def test_writer_refuses_tampered_foreign_or_locked_logs(tmp_path):
    p = tmp_path / "s.jsonl"
    key = _key(7)
    log = AuditLog(p, signing_key=key, actor="server")
    with pytest.raises(AuditError, match="already open"):
        AuditLog(p, signing_key=key, actor="server")
    log.append("config", {"mode": "dp"})
    log.close()
    with pytest.raises(LogCorruptError, match="signing key"):
        AuditLog(p, signing_key=_key(8), actor="server")
    with pytest.raises(LogCorruptError, match="actor"):
        AuditLog(p, signing_key=key, actor="alice")
    lines = p.read_bytes().splitlines(keepends=True)
    d = json.loads(lines[1])
    d["payload"]["mode"] = "plain"
    p.write_bytes(lines[0] + json.dumps(d).encode() + b"\n" + b"".join(lines[2:]))
    with pytest.raises(LogCorruptError, match="seq 1"):
        AuditLog(p, signing_key=key, actor="server")
    with pytest.raises(ValueError, match="checkpoint_every"):
        AuditLog(tmp_path / "x.jsonl", signing_key=key, actor="server", checkpoint_every=0)
    assert os.path.exists(p)
