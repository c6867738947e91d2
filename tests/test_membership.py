"""Membership the server cannot forge (issue #11): a membership CA the operator does not hold, a signed roster that
clients pin, and honest clients that refuse any SecAgg round with a peer outside the roster.

The adversary is the server operator: it holds the federation's TLS CA key (so it can mint TLS and TLS-CA identity
certificates for any name), relays every message and can set up its own "membership CA", but it holds neither the
membership authority's key nor any member's identity key."""

import asyncio
import datetime as dt
import json

import numpy as np
import pytest
from cryptography import x509

from mor.v1 import federation_pb2 as pb
from mor_client import ClientCredentials
from mor_client.secagg_session import SecAggSession
from mor_server.apps.cli import server_main
from privacy import membership as mb
from privacy import pki
from privacy.secagg.driver import run_secagg_round
from privacy.secagg.server import SecAggServer

MEMBERS = ("alice", "bob", "carol")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """An operator PKI (TLS CA) and a separate membership authority; each member made its own identity key, the
    operator certified it for TLS-side identity from the CSR, the authority enrolled it from the same CSR."""
    d = tmp_path_factory.mktemp("fed")
    pki.init_ca(d / "pki")
    auth = mb.init_authority(d / "membership")
    for n in MEMBERS:
        creds = d / "creds" / n
        _, csr = mb.new_identity(n, creds)
        pub = mb.load_identity_public_key(csr.read_bytes(), expected_name=n)
        pki.issue_client(d / "pki", n, out_dir=creds, identity_public_key=pub)
        mb.enrol(d / "membership", n, csr.read_bytes(), out_dir=creds)
    mb.write_roster(d / "membership", d / "roster.json")
    for n in MEMBERS:
        (d / "creds" / n / "roster.json").write_bytes((d / "roster.json").read_bytes())
    # the operator's sybils: TLS + TLS-CA identity certificates it mints itself, one under a roster name
    pki.issue_client(d / "pki", "sybil", out_dir=d / "sybil")
    pki.issue_client(d / "pki", "bob", out_dir=d / "fake-bob")
    return {"dir": d, "auth": auth, "ca": auth.cert}


def _member_cert(fed, name):
    return (fed["dir"] / "creds" / name / "membership.crt").read_bytes()


def _pin(fed, roster_path=None):
    d = fed["dir"]
    return mb.Membership.from_files(d / "membership" / "membership-ca.crt", roster_path or d / "roster.json")


# ------------------------------------------------------------------------------------------------ roster
def test_roster_verifies_and_lists_members(fed):
    r = mb.verify_roster((fed["dir"] / "roster.json").read_bytes(), fed["ca"])
    assert set(r.members) == set(MEMBERS) and r.serial == 1
    key = _pin(fed).verify_peer("alice", _member_cert(fed, "alice"))  # a peer on the roster is accepted
    own = ClientCredentials.from_dir(fed["dir"] / "creds" / "alice").identity_key().public_key()
    assert mb.key_fingerprint(key) == mb.key_fingerprint(own)


def test_forged_or_altered_roster_is_refused(fed, tmp_path):
    doc = json.loads((fed["dir"] / "roster.json").read_text())
    # the operator adds its sybil to the signed roster without the authority's key
    forged = json.loads(json.dumps(doc))
    forged["roster"]["members"].append({"name": "sybil", "identity_key_sha256": "ab" * 32, "certificate_sha256": ""})
    with pytest.raises(mb.MembershipError, match="signature does not verify"):
        mb.verify_roster(forged, fed["ca"])
    # ... or swaps a member's key for its own
    swapped = json.loads(json.dumps(doc))
    swapped["roster"]["members"][1]["identity_key_sha256"] = "cd" * 32
    with pytest.raises(mb.MembershipError, match="signature does not verify"):
        mb.verify_roster(swapped, fed["ca"])
    # ... or extends its expiry
    longer = json.loads(json.dumps(doc))
    longer["roster"]["not_after"] = "2099-01-01T00:00:00+00:00"
    with pytest.raises(mb.MembershipError, match="signature does not verify"):
        mb.verify_roster(longer, fed["ca"])
    # ... or signs a roster with a "membership CA" of its own
    own = mb.init_authority(tmp_path / "operator-authority")
    mb.enrol(tmp_path / "operator-authority", "sybil", None)
    mb.write_roster(tmp_path / "operator-authority", tmp_path / "r.json")
    with pytest.raises(mb.MembershipError, match="signature does not verify"):
        mb.verify_roster((tmp_path / "r.json").read_bytes(), fed["ca"])
    assert own.cert.subject == fed["ca"].subject  # same name, different key: still refused
    for bad, what in ((dict(doc, signature="AAAA"), "signature"), (dict(doc, format="mor-roster/0"), "format"),
                      (b"not json", "not JSON")):
        with pytest.raises(mb.MembershipError, match=what):
            mb.verify_roster(bad, fed["ca"])


def test_expired_roster_is_refused(fed):
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    members = json.loads((fed["dir"] / "membership" / "members.json").read_text())
    doc = mb.sign_roster(fed["auth"], members, serial=5, days=3, issued_at=old)
    with pytest.raises(mb.MembershipError, match="expired"):
        mb.verify_roster(doc, fed["ca"])
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    doc = mb.sign_roster(fed["auth"], members, serial=5, days=3, issued_at=future)
    with pytest.raises(mb.MembershipError, match="in the future"):
        mb.verify_roster(doc, fed["ca"])
    # a pinned roster that expires while the client runs stops admitting anyone
    pin = mb.Membership((fed["dir"] / "membership" / "membership-ca.crt").read_bytes(),
                        mb.sign_roster(fed["auth"], members, serial=6, days=1))
    pin.verify_peer("alice", _member_cert(fed, "alice"))
    object.__setattr__(pin.roster, "not_after", dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))
    with pytest.raises(mb.MembershipError, match="expired"):
        pin.verify_peer("alice", _member_cert(fed, "alice"))
    with pytest.raises(mb.MembershipError, match="expired"):
        pin.check_cohort(["alice"])


def test_newer_roster_is_picked_up_and_rollback_refused(fed, tmp_path):
    members = json.loads((fed["dir"] / "membership" / "members.json").read_text())
    path = tmp_path / "roster.json"
    path.write_text(json.dumps(mb.sign_roster(fed["auth"], members, serial=7)))
    pin = _pin(fed, path)
    pin.verify_peer("carol", _member_cert(fed, "carol"))
    without_carol = {n: r for n, r in members.items() if n != "carol"}
    path.write_text(json.dumps(mb.sign_roster(fed["auth"], without_carol, serial=8)))
    with pytest.raises(mb.MembershipError, match="not on the signed roster"):
        pin.verify_peer("carol", _member_cert(fed, "carol"))   # removed from the roster: refused
    path.write_text(json.dumps(mb.sign_roster(fed["auth"], members, serial=7)))  # a replayed older roster
    with pytest.raises(mb.MembershipError, match="rollback"):
        pin.verify_peer("carol", _member_cert(fed, "carol"))


# ------------------------------------------------------------------------------------------------ peers
def _session(fed, name="alice"):
    creds = ClientCredentials.from_dir(fed["dir"] / "creds" / name)
    sess = SecAggSession(creds)
    sess.use_membership(mb.Membership.from_creds_dir(fed["dir"] / "creds" / name))
    return sess


def test_sybil_with_operator_minted_identity_is_refused_by_an_honest_clients_verify_peer(fed, tmp_path):
    d = fed["dir"]
    sess = _session(fed)
    sess.verify_peer("bob", _member_cert(fed, "bob"))                 # a member: accepted
    assert sess.identity_proof == _member_cert(fed, "alice")          # and alice proves herself the same way
    tls_ca = x509.load_pem_x509_certificate((d / "pki" / "ca" / "ca.crt").read_bytes())
    sybil_id = (d / "sybil" / "identity.crt").read_bytes()
    pki.verify_identity_certificate(sybil_id, tls_ca, expected_name="sybil")  # valid for the operator's CA ...
    with pytest.raises(mb.MembershipError, match="not on the signed roster"):
        sess.verify_peer("sybil", sybil_id)                           # ... but not a member
    with pytest.raises(mb.MembershipError, match="not issued by this membership"):
        sess.verify_peer("bob", (d / "fake-bob" / "identity.crt").read_bytes())  # a roster name, operator's key
    with pytest.raises(mb.MembershipError, match="presented the membership certificate of 'carol'"):
        sess.verify_peer("bob", _member_cert(fed, "carol"))           # a real member's certificate under bob's name
    other = mb.init_authority(tmp_path / "op")                        # the operator's own look-alike authority
    pub = ClientCredentials.from_dir(d / "fake-bob").identity_key().public_key()
    mb.enrol(tmp_path / "op", "bob", pub, out_dir=tmp_path / "op-bob")
    assert other.cert.subject == fed["ca"].subject
    with pytest.raises(mb.MembershipError, match="not issued by this membership"):
        sess.verify_peer("bob", (tmp_path / "op-bob" / "membership.crt").read_bytes())


def test_client_refuses_to_pin_the_operators_ca_or_someone_elses_certificate(fed, tmp_path):
    d = fed["dir"]
    creds = ClientCredentials.from_dir(d / "creds" / "alice")
    # membership "CA" = the operator's TLS CA: refused
    op = tmp_path / "op-as-membership"
    op.mkdir()
    (op / "membership-ca.key").write_bytes((d / "pki" / "ca" / "ca.key").read_bytes())
    (op / "membership-ca.crt").write_bytes((d / "pki" / "ca" / "ca.crt").read_bytes())
    mb.enrol(op, "alice", creds.identity_key().public_key(), out_dir=tmp_path / "a")
    mb.write_roster(op, tmp_path / "r.json")
    pin = mb.Membership.from_files(op / "membership-ca.crt", tmp_path / "r.json", tmp_path / "a" / "membership.crt")
    with pytest.raises(mb.MembershipError, match="TLS CA"):
        SecAggSession(creds).use_membership(pin)
    # bob's membership certificate in alice's folder: refused before any round
    pin = mb.Membership.from_files(d / "membership" / "membership-ca.crt", d / "roster.json",
                                   d / "creds" / "bob" / "membership.crt")
    with pytest.raises(mb.MembershipError, match="own membership"):
        SecAggSession(creds).use_membership(pin)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "roster.json").write_bytes((d / "roster.json").read_bytes())
    with pytest.raises(mb.MembershipError, match="lacks membership-ca.crt, membership.crt"):
        mb.Membership.from_creds_dir(partial)
    assert mb.Membership.from_creds_dir(d / "sybil") is None   # no membership files at all: single-CA pilot


def test_round_with_a_sybil_in_the_cohort_is_refused_before_scoring(fed):
    """Over the client's stream handler: a secagg task whose client list names a non-member is refused at once."""
    sess = _session(fed)
    sess.require_crl = False  # the CRL path is tested in test_revocation.py
    sent = []

    class Q:
        def put_nowait(self, m):
            sent.append(m)

    class FakeClient:
        client_id = "alice"
        audit = None
        policy = type("P", (), {"supported_modes": ("secagg",)})()
        scored = False

        async def score_items(self, *a):
            FakeClient.scored = True
            return [0.0]

        def audit_release(self, *a, **k):
            pass

        def release_message(self, round_id, rel):
            return pb.ClientMessage(refusal=pb.Refusal(round_id=round_id, reason=rel.reason))

    setup = SecAggServer("r-sybil", ["alice", "bob", "carol", "sybil"], vector_length=1).setup()["alice"]
    task = pb.ScoringTask(round_id="r-sybil", mode=pb.PRIVACY_MODE_SECAGG,
                          secagg=pb.SecAggMessage(round_id="r-sybil", stage="setup", payload=setup))
    asyncio.run(sess.on_task(task, [], FakeClient(), Q()))
    assert sent and "not on the signed roster" in sent[0].refusal.reason and "sybil" in sent[0].refusal.reason
    assert not FakeClient.scored, "refused before the scorer ran"


def test_secagg_round_end_to_end_with_roster_verification(fed):
    """The SecAgg+ state machines with every client verifying peers against the pinned roster: the members' round
    succeeds with the exact sum; a round where the operator slips in a sybil (with its own TLS-CA identity) aborts."""
    d = fed["dir"]
    pin = _pin(fed)
    sks = {n: ClientCredentials.from_dir(d / "creds" / n).identity_key() for n in MEMBERS}
    proofs = {n: _member_cert(fed, n) for n in MEMBERS}
    inputs = {n: np.array([0.1 * i, 0.2, -0.3 * i]) for i, n in enumerate(MEMBERS)}
    res, _ = run_secagg_round(inputs, round_id="members", identities=(sks, pin.verify_peer),
                              client_kwargs={n: {"identity_proof": proofs[n]} for n in MEMBERS})
    assert res.ok, res.reason
    np.testing.assert_allclose(res.total, sum(inputs.values()), atol=1e-3)

    sybil_creds = ClientCredentials.from_dir(d / "sybil")
    sks["sybil"] = sybil_creds.identity_key()
    proofs["sybil"] = sybil_creds.identity_cert_pem
    inputs["sybil"] = np.zeros(3)
    res, stats = run_secagg_round(inputs, round_id="with-sybil", identities=(sks, pin.verify_peer),
                                  client_kwargs={n: {"identity_proof": proofs[n]} for n in inputs})
    assert not res.ok
    refused = {c: str(e) for c, e in stats.client_errors.items() if c != "sybil"}
    assert refused and all("sybil" in msg for msg in refused.values()), refused

    # the same attack against the single-CA pilot succeeds: the operator's CA vouches for its own sybil, which is
    # then counted as a client (this is what the membership roster stops)
    tls_ca = x509.load_pem_x509_certificate((d / "pki" / "ca" / "ca.crt").read_bytes())
    tls_proofs = {n: (d / "creds" / n / "identity.crt").read_bytes() for n in MEMBERS}
    tls_proofs["sybil"] = sybil_creds.identity_cert_pem

    def pilot_verify(cid, proof):
        return pki.verify_identity_certificate(proof, tls_ca, expected_name=cid)

    res, _ = run_secagg_round(inputs, round_id="pilot", identities=(sks, pilot_verify),
                              client_kwargs={n: {"identity_proof": tls_proofs[n]} for n in inputs})
    assert res.ok and "sybil" in res.survivors


# ------------------------------------------------------------------------------------------------ CLI
def test_pki_membership_commands(tmp_path, capsys):
    m, inst = tmp_path / "membership", tmp_path / "st-marys"
    assert server_main(["pki", "init", "--dir", str(tmp_path / "pki")]) == 0
    assert "sybil" in capsys.readouterr().out            # the single-CA set-up says what it does not protect
    assert server_main(["pki", "membership", "init", "--dir", str(m)]) == 0
    assert server_main(["pki", "membership", "keygen", "st-marys", "--out", str(inst)]) == 0
    assert (inst / "identity.key").stat().st_mode & 0o077 == 0
    assert server_main(["pki", "membership", "keygen", "st-marys", "--out", str(inst)]) == 2  # no silent replace
    assert server_main(["pki", "issue-client", "st-marys", "--dir", str(tmp_path / "pki"), "--out", str(inst),
                        "--identity-public-key", str(inst / "identity.csr")]) == 0
    assert server_main(["pki", "membership", "enrol", "st-marys", "--dir", str(m), "--out", str(inst),
                        "--identity-public-key", str(inst / "identity.csr")]) == 0
    assert server_main(["pki", "membership", "enrol", "pilot-lab", "--dir", str(m), "--issue-key"]) == 0
    assert server_main(["pki", "membership", "enrol", "evil", "--dir", str(m),
                        "--identity-public-key", str(inst / "identity.csr")]) == 2   # CSR names st-marys
    assert "names 'st-marys', not 'evil'" in capsys.readouterr().err
    assert server_main(["pki", "membership", "remove", "pilot-lab", "--dir", str(m)]) == 0
    assert server_main(["pki", "membership", "roster", "--dir", str(m), "--out", str(inst / "roster.json")]) == 0
    capsys.readouterr()
    assert server_main(["pki", "membership", "verify", str(inst / "roster.json"),
                        "--membership-ca", str(m / "membership-ca.crt")]) == 0
    out = capsys.readouterr().out
    assert "st-marys" in out and "pilot-lab" not in out and "serial 1" in out
    assert server_main(["pki", "membership", "verify", str(inst / "roster.json"),
                        "--membership-ca", str(tmp_path / "pki" / "ca" / "ca.crt")]) == 2
    assert "signature does not verify" in capsys.readouterr().err
    assert server_main(["pki", "membership", "roster", "--dir", str(tmp_path / "nowhere")]) == 2
    assert "membership init" in capsys.readouterr().err
    # the institution's folder now pins everything; its identity.key never left it and the TLS-CA identity.crt and
    # membership.crt both certify that key
    creds = ClientCredentials.from_dir(inst)
    sess = SecAggSession(creds)
    sess.use_membership(mb.Membership.from_creds_dir(inst))
    assert sess.membership.roster.serial == 1


def test_membership_over_the_federation_stream(fed, png_bytes):
    """Real server and clients over loopback mTLS: members who pinned the roster sum correctly (their SecAgg identity
    proofs are membership certificates); once the operator adds its own TLS-certified sybil to the round, every
    member refuses it and the round fails instead of counting the sybil."""
    from mor_client import FederationClient, ReleasePolicy
    from mor_server.federation.config import ServerConfig
    from mor_server.federation.server import FederationServer

    from fedutil import LengthScorer, make_items

    d = fed["dir"]
    items = make_items(png_bytes, n=2, k=2)

    async def main():
        server = FederationServer(ServerConfig(pki_dir=d / "pki"))
        await server.start()
        clients = []
        for i, n in enumerate(MEMBERS + ("sybil",)):
            folder = d / "creds" / n if n != "sybil" else d / "sybil"
            creds = ClientCredentials.from_dir(folder)
            sess = SecAggSession(creds)
            pin = mb.Membership.from_creds_dir(folder)
            if pin is not None:
                sess.use_membership(pin)
            clients.append(FederationClient(f"localhost:{server.port}", creds, LengthScorer(offset=i),
                                            card={"architecture": "t", "parameter_count": 0,
                                                  "supported_modes": ["secagg"]},
                                            policy=ReleasePolicy(("secagg",)), secagg_handler=sess))
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            await server.wait_for_clients(4, timeout=20)
            ok = await server.run_secagg_round(items, weights={n: [0.3, 0.3] for n in MEMBERS},
                                               participants=list(MEMBERS), timeout=30, stage_timeout=10)
            bad = await server.run_secagg_round(items, weights={n: [0.25, 0.25] for n in MEMBERS + ("sybil",)},
                                                participants=list(MEMBERS) + ["sybil"], timeout=30, stage_timeout=10)
            return ok, bad
        finally:
            for c in clients:
                await c.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop()

    ok, bad = asyncio.run(main())
    assert ok.ok, ok.reason
    expect = sum(0.3 * np.array([len(c) + i for it in items for c in it.candidates]) for i in range(3))
    np.testing.assert_allclose(ok.aggregate["sum"], expect, atol=1e-3)
    assert not bad.ok
    for n in MEMBERS:
        assert "not on the signed roster" in bad.dropped.get(n, ""), bad.dropped


def test_mor_client_join_pins_the_roster_from_creds(fed, tmp_path, capsys):
    """`mor-client join` pins membership-ca.crt + roster.json + membership.crt from --creds (or --roster FILE), warns
    loudly without them, and refuses to start without them under --require-membership."""
    import argparse

    from mor_client.cli import UsageError, _pin_membership

    d = fed["dir"]
    for folder, roster, require in ((d / "creds" / "alice", None, True),
                                    (d / "creds" / "alice", d / "roster.json", True)):
        sess = SecAggSession(ClientCredentials.from_dir(folder))
        _pin_membership(sess, argparse.Namespace(creds=folder, roster=roster, require_membership=require),
                        sess.credentials)
        assert sess.membership is not None and "limited to the signed roster" in capsys.readouterr().out
    pilot = SecAggSession(ClientCredentials.from_dir(d / "sybil"))
    _pin_membership(pilot, argparse.Namespace(creds=d / "sybil", roster=None, require_membership=False),
                    pilot.credentials)
    assert pilot.membership is None and "can mint sybil clients" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--require-membership"):
        _pin_membership(pilot, argparse.Namespace(creds=d / "sybil", roster=None, require_membership=True),
                        pilot.credentials)
