"""Verifier: every kind of tampering is detected at the right entry; key pinning; the `mor audit verify` CLI."""

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from mor_server.apps import audit_cli
from privacy.audit import AuditLog, read_entries, verify_log
from privacy.audit.entry import make_entry

KEY = Ed25519PrivateKey.from_private_bytes(b"\x11" * 32)
EVIL = Ed25519PrivateKey.from_private_bytes(b"\x66" * 32)
N_ROUNDS = 30


@pytest.fixture(scope="module")
def sealed_log(tmp_path_factory):
    p = tmp_path_factory.mktemp("audit") / "server.jsonl"
    with AuditLog(p, signing_key=KEY, actor="server", checkpoint_every=8) as log:
        for i in range(N_ROUNDS):
            log.append("round", {"round_id": f"r{i}", "mode": "dp", "participants": ["alice", "bob"],
                                 "epsilon_charged": {"alice": 0.1, "bob": 0.2}})
    return p.read_bytes().splitlines(keepends=True)


def _write(tmp_path, lines):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"".join(lines))
    return p


def _edit(line: bytes, fn) -> bytes:
    d = json.loads(line)
    fn(d)
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _resign_with(key, d):  # an attacker re-hashes (and re-signs with a key they hold) after editing
    e = make_entry(key, seq=d["seq"], time=d["time"], actor=d["actor"], event=d["event"], payload=d["payload"],
                   prev=d["prev"])
    d.clear()
    d.update(e.to_dict())


def _rehash_keep_sig(d):
    sig = d["sig"]
    _resign_with(EVIL, d)
    d["sig"] = sig


K = 13  # the entry we attack (a round entry, not a checkpoint)


def _tamper(lines, kind, k=K):
    L = list(lines)
    if kind == "payload":
        L[k] = _edit(L[k], lambda d: d["payload"].update(epsilon_charged={"alice": 0.0}))
    elif kind == "payload_and_digest":
        L[k] = _edit(L[k], lambda d: (d["payload"].update(mode="plain"), _rehash_keep_sig(d)))
    elif kind == "time":
        L[k] = _edit(L[k], lambda d: d.update(time="2020-01-01T00:00:00.000000Z"))
    elif kind == "resigned_foreign_key":
        L[k] = _edit(L[k], lambda d: (d["payload"].update(mode="plain"), _resign_with(EVIL, d)))
    elif kind == "delete":
        del L[k]
    elif kind == "delete_renumber":
        del L[k]
        for j in range(k, len(L)):
            L[j] = _edit(L[j], lambda d: d.update(seq=d["seq"] - 1))
    elif kind == "insert_forged":
        prev = json.loads(L[k - 1])
        forged = make_entry(EVIL, seq=k, time=prev["time"], actor="server", event="round",
                            payload={"round_id": "fake", "mode": "plain"}, prev=prev["hash"])
        L.insert(k, forged.line() + b"\n")
    elif kind == "duplicate":
        L.insert(k, L[k - 1])
    elif kind == "swap":
        L[k], L[k + 1] = L[k + 1], L[k]
    elif kind == "garbage_line":
        L[k] = b"not json at all\n"
    else:
        raise AssertionError(kind)
    return L


KINDS = ["payload", "payload_and_digest", "time", "resigned_foreign_key", "delete", "delete_renumber",
         "insert_forged", "duplicate", "swap", "garbage_line"]


def test_untampered_log_verifies(sealed_log, tmp_path):
    res = verify_log(_write(tmp_path, sealed_log), KEY.public_key())
    assert res.ok and res.sealed and res.n == len(sealed_log) and res.first_bad_seq is None


@pytest.mark.parametrize("kind", KINDS)
def test_each_tampering_is_detected_at_the_right_entry(sealed_log, tmp_path, kind):
    res = verify_log(_write(tmp_path, _tamper(sealed_log, kind)), KEY.public_key())
    assert not res.ok and res.first_bad_seq == K, (kind, res.reason)
    assert res.n == K  # everything before the attacked entry still verifies


@settings(max_examples=25, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["payload", "time", "delete", "swap", "duplicate", "insert_forged"]),
       k=st.sampled_from([1, 8, 9, 10, 17, 18, 26, 27, 28, 31]))  # round entries and checkpoints (9, 18, 27)
def test_tampering_anywhere_is_located(sealed_log, tmp_path_factory, kind, k):
    if kind == "swap" and k >= len(sealed_log) - 1:
        k = len(sealed_log) - 2
    lines = _tamper(sealed_log, kind, k)
    res = verify_log(_write(tmp_path_factory.mktemp("h"), lines), KEY.public_key())
    assert not res.ok and res.first_bad_seq == k, (kind, k, res.reason)


def test_checkpoint_tampering_and_truncation(sealed_log, tmp_path):
    entries = [json.loads(x) for x in sealed_log]
    ck = next(e["seq"] for e in entries if e["event"] == "checkpoint")
    L = list(sealed_log)
    L[ck] = _edit(L[ck], lambda d: (d["payload"].update(root="00" * 32), _resign_with(KEY, d)))
    res = verify_log(_write(tmp_path, L), KEY.public_key())  # even a correctly signed wrong root is caught
    assert not res.ok and res.first_bad_seq == ck and "Merkle root" in res.reason
    n = len(sealed_log)
    for cut in (1, 2, 5):  # drop the last entries (incl. the final checkpoint)
        res = verify_log(_write(tmp_path, sealed_log[:-cut]), KEY.public_key())
        assert not res.ok and res.first_bad_seq == n - cut and "truncated" in res.reason
    # cut back to an intermediate checkpoint: still not sealed
    res = verify_log(_write(tmp_path, sealed_log[:ck + 1]), KEY.public_key())
    assert not res.ok and res.first_bad_seq == ck + 1
    # cut in the middle of a line
    res = verify_log(_write(tmp_path, sealed_log[:-1] + [sealed_log[-1][:40]]), KEY.public_key())
    assert not res.ok and res.first_bad_seq == n - 1 and "torn" in res.reason
    # an open log truncated back to an earlier entry is caught by a witness of a later entry
    witness = (n - 3, entries[n - 3]["hash"])
    res = verify_log(_write(tmp_path, sealed_log[:-4]), KEY.public_key(), allow_open=True, witness=witness)
    assert not res.ok and res.first_bad_seq == n - 4
    assert verify_log(_write(tmp_path, sealed_log), KEY.public_key(), witness=witness).ok


def test_whole_log_rewritten_under_fresh_key_needs_pinning(sealed_log, tmp_path):
    """An operator who rewrites the whole log under a new key passes the embedded-key check, not the pinned one."""
    p = tmp_path / "forged.jsonl"
    with AuditLog(p, signing_key=EVIL, actor="server") as log:
        log.append("round", {"round_id": "r0", "mode": "plain", "epsilon_charged": {"alice": 0.0}})
    assert verify_log(p).ok and not verify_log(p).key_pinned
    res = verify_log(p, KEY.public_key())
    assert not res.ok and res.first_bad_seq == 0 and "pinned" in res.reason


def _pub_pem(tmp_path, key, name):
    p = tmp_path / name
    p.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    return p


def test_cli_verify_exit_codes_and_certificate_pinning(sealed_log, tmp_path, pki_dir, capsys):
    good = _write(tmp_path, sealed_log)
    pub = _pub_pem(tmp_path, KEY, "server.pub")
    assert audit_cli.main(["audit", "verify", str(good), "--public-key", str(pub)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(_tamper(sealed_log, "delete")))
    assert audit_cli.main(["audit", "verify", str(bad), "--public-key", str(pub)]) == 1
    assert f"FAILED at seq {K}" in capsys.readouterr().out
    assert audit_cli.main(["audit", "verify", str(bad), "--trust-embedded-key", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["first_bad_seq"] == K
    assert audit_cli.main(["audit", "verify", str(good)]) == 2  # a key source is required
    assert "one of the arguments --public-key --trust-embedded-key is required" in capsys.readouterr().err
    assert audit_cli.main(["audit", "verify", str(tmp_path / "missing.jsonl"), "--trust-embedded-key"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    # a client's log, pinned by its identity certificate checked against the federation CA
    from privacy import pki

    alice = pki.ClientCredentials.from_dir(pki_dir / "clients" / "alice")
    lp = tmp_path / "alice.jsonl"
    with AuditLog(lp, signing_key=alice.identity_key(), actor="alice") as log:
        log.append("release", {"round_id": "r1", "mode": "dp", "released": 4, "epsilon_charged": 0.3,
                               "epsilon_total": 0.3})
    ca = pki_dir / "ca" / "ca.crt"
    cert = pki_dir / "clients" / "alice" / "identity.crt"
    assert audit_cli.main(["audit", "verify", str(lp), "--public-key", str(cert), "--ca", str(ca)]) == 0
    other = pki_dir / "clients" / "bob" / "identity.crt"
    assert audit_cli.main(["audit", "verify", str(lp), "--public-key", str(other), "--ca", str(ca)]) == 1
    assert "pinned" in capsys.readouterr().out
    assert read_entries(lp)[0].payload["actor"] == "alice"


# ------------------------------------------------------------------ fields outside the hash (issue #14, item 10)

@pytest.mark.parametrize("name,edit,expect", [
    ("extra top-level field", lambda d: d.update(approved_by="auditor", epsilon_override=0.0), "unknown field"),
    ("extra field shaped like a real one", lambda d: d.update(payload_v2={"mode": "plain"}), "payload_v2"),
    ("seq as string", lambda d: d.update(seq=str(d["seq"])), "seq"),
    ("seq as float", lambda d: d.update(seq=float(d["seq"])), "seq"),
    ("seq as bool", lambda d: d.update(seq=True), "seq"),
    ("payload as list", lambda d: d.update(payload=[d["payload"]]), "payload"),
    ("version as string", lambda d: d.update(v="1"), "'v'"),
    ("hash as int", lambda d: d.update(hash=7), "hash"),
    ("sig as list", lambda d: d.update(sig=[d["sig"]]), "sig"),
    ("prev not hex", lambda d: d.update(prev="zz" * 32), "prev"),
    ("event unknown", lambda d: d.update(event="rounds"), "event"),
])
def test_fields_outside_the_hash_or_of_the_wrong_type_are_rejected(sealed_log, tmp_path, name, edit, expect):
    L = list(sealed_log)
    L[K] = _edit(L[K], edit)
    res = verify_log(_write(tmp_path, L), KEY.public_key())
    assert not res.ok and res.first_bad_seq == K, (name, res.reason)
    assert expect in res.reason, (name, res.reason)


def test_extra_field_attack_through_the_cli(sealed_log, tmp_path, capsys):
    """The attack: append a field to an entry of a real signed log; `mor audit verify` must fail naming the entry."""
    pub = _pub_pem(tmp_path, KEY, "server.pub")
    L = list(sealed_log)
    L[K] = L[K].rstrip(b"}\n") + b',"note":"epsilon was really 0"}\n'
    p = _write(tmp_path, L)
    assert audit_cli.main(["audit", "verify", str(p), "--public-key", str(pub)]) == 1
    out = capsys.readouterr().out
    assert f"FAILED at seq {K}" in out and "'note'" in out


@pytest.mark.parametrize("name,mutate,expect", [
    ("duplicate key: the parser keeps the last one", lambda b: b.replace(b'"actor":"server"',
                                                                         b'"actor":"evil","actor":"server"', 1),
     "duplicate key 'actor'"),
    ("duplicate key inside the payload", lambda b: b.replace(b'"mode":"dp"', b'"mode":"plain","mode":"dp"', 1),
     "duplicate key 'mode'"),
    ("re-serialised with spaces", lambda b: json.dumps(json.loads(b)).encode() + b"\n", "canonical"),
    ("NaN smuggled into the payload", lambda b: b.replace(b'"mode":"dp"', b'"mode":NaN', 1), "NaN"),
])
def test_non_canonical_lines_are_rejected(sealed_log, tmp_path, name, mutate, expect):
    L = list(sealed_log)
    L[K] = mutate(L[K])
    assert L[K] != sealed_log[K]
    res = verify_log(_write(tmp_path, L), KEY.public_key())
    assert not res.ok and res.first_bad_seq == K and expect in res.reason, (name, res.reason)


def test_writer_and_reader_refuse_an_entry_with_an_extra_field(sealed_log, tmp_path):
    from privacy.audit import AuditError, LogCorruptError

    L = list(sealed_log)
    L[K] = _edit(L[K], lambda d: d.update(extra="x"))
    p = _write(tmp_path, L)
    with pytest.raises(LogCorruptError, match=f"line {K + 1}"):
        AuditLog(p, signing_key=KEY, actor="server")
    with pytest.raises(AuditError, match="unknown field"):
        read_entries(p)


def test_strict_line_check_accepts_every_payload_the_writer_writes(tmp_path):
    """The canonical-bytes check must not reject honest logs: non-ASCII, escapes, floats, big ints, reopen."""
    p = tmp_path / "u.jsonl"
    payload = {"text": "ε=8 \u2028 \x01 \"q\" \\ 😀", "f": [0.1 + 0.2, 1e-05, 1e300, -0.0, 2 ** 70],
               "nested": {"b": 1, "a": [None, True, ""]}}
    with AuditLog(p, signing_key=KEY, actor="server") as log:
        log.append("note", payload)
    with AuditLog(p, signing_key=KEY, actor="server") as log:  # the writer reopens (parses every line) and extends
        log.append("note", {"x": 1})
    res = verify_log(p, KEY.public_key())
    assert res.ok and res.n == 5, res.reason
    assert read_entries(p)[1].payload == payload
