"""Membership the server cannot forge: a membership CA the operator does not hold, and a signed roster clients pin.

One module although over 400 lines: the membership CA, enrolment and the roster it signs are one trust root
that shares its key handling and folder layout.

Why
---
With the single-CA set-up (``mor pki init``) the server operator holds the only CA. An operator who keeps that
key can mint identity certificates for *sybil* clients, and every SecAgg guarantee that counts clients (the Shamir
threshold, the isolation checks, ``min_survivors``) then counts the operator's own puppets. That set-up is for
pilots only.

With a **membership authority** (a consortium, or the institutions' own enrolment office; NOT the server operator):

* each institution generates its Ed25519 identity key itself and sends only a CSR (or its public key): the private
  key never leaves the institution (:func:`new_identity`);
* the authority certifies that key under the member's name with its own **membership CA** (:func:`enrol`);
* the authority signs a **roster**: format ``mor-roster/1``, a serial number, issue time, expiry, the authority's
  certificate fingerprint and, per member, the name and the SHA-256 of its identity public key and certificate
  (:func:`write_roster`);
* every client pins the membership CA certificate (given to it out of band) and the roster, and takes part in a
  secure-aggregation round only if **every** client of the round is on the roster and every peer it talks to proves
  its identity with a certificate from the membership CA whose key is the one on the roster (:class:`Membership`).

A server can still refuse to include honest members, delay or drop messages (liveness), but it cannot add a client
the authority did not enrol: a sybil with a TLS-CA identity certificate, a certificate from another CA, a real
member's certificate under another name, or a name on the roster with a key the operator made is refused by every
honest peer, and the round aborts.

Layout of a membership folder (``mor pki membership init --membership membership``)::

    membership/membership-ca.key  (0600; the authority's signing key: keep it offline, away from the server operator)
    membership/membership-ca.crt  (what every client pins)
    membership/members.json       (enrolment records: name -> key/certificate fingerprints, removed flag)
    membership/roster-serial      (the last roster serial signed)
    membership/members/NAME/membership.crt  membership-ca.crt

A client's credentials folder adds ``membership.crt`` (its identity certificate from the membership CA, for its own
``identity.key``), ``membership-ca.crt`` and ``roster.json``. Pure functions over ``cryptography``; I/O only on the
named files.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from . import pki
from .pki import PKIError, _atomic_write, _cert_pem, _key_pem, _now, check_name, common_name

ROSTER_FORMAT = "mor-roster/1"
CLOCK_SKEW = _dt.timedelta(minutes=5)
_ORG = "MoR membership"


class MembershipError(PKIError):
    """A membership or roster check failed; the message names the member/file and what to do."""


# --------------------------------------------------------------------------------------------- fingerprints
def key_fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 (hex) of the certificate's DER encoding."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise MembershipError(f"{what} is not a PEM certificate ({e})") from None


# --------------------------------------------------------------------------------------------- the authority
@dataclass(frozen=True)
class MembershipAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    dir: Path

    @classmethod
    def load(cls, mdir: str | Path) -> "MembershipAuthority":
        d = Path(mdir)
        try:
            key = serialization.load_pem_private_key((d / "membership-ca.key").read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((d / "membership-ca.crt").read_bytes())
        except FileNotFoundError as e:
            raise MembershipError(f"no membership authority in {d}: {e.filename} is missing; run `mor pki "
                                  f"membership init --membership {d}` first") from None
        return cls(key, cert, d)

    def _records(self) -> dict:
        p = self.dir / "members.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def _save_records(self, records: dict) -> None:
        _atomic_write(self.dir / "members.json", json.dumps(records, indent=1, sort_keys=True).encode())


def init_authority(mdir: str | Path, *, name: str = "MoR membership CA", days: float = 3650,
                   force: bool = False) -> MembershipAuthority:
    """Create a membership CA in ``mdir`` (refuses to replace an existing one unless ``force``)."""
    d = Path(mdir)
    if (d / "membership-ca.key").exists() and not force:
        raise MembershipError(f"{d}/membership-ca.key already exists: refusing to overwrite a membership authority "
                              "(pass --force to replace it; every enrolment and roster then stops verifying)")
    if days <= 0:
        raise MembershipError(f"--days must be positive, got {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = _now() - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start)
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False,
                                     content_commitment=True, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _atomic_write(d / "membership-ca.key", _key_pem(key), private=True)
    _atomic_write(d / "membership-ca.crt", _cert_pem(cert))
    _atomic_write(d / "members.json", b"{}")
    if (d / "roster-serial").exists():
        (d / "roster-serial").unlink()
    return MembershipAuthority(key, cert, d)


# --------------------------------------------------------------------------------------------- institutions
def new_identity(name: str, out_dir: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Institution side: generate an Ed25519 identity key in ``out_dir/identity.key`` (0600, never sent anywhere) and
    a CSR for it, ``out_dir/identity.csr`` (Common Name ``name``, signed by the key: proof of possession). Hand the
    CSR to the membership authority (and to the server operator for its TLS-CA identity certificate)."""
    check_name(name)
    out = Path(out_dir)
    key_path, csr_path = out / "identity.key", out / "identity.csr"
    if key_path.exists() and not force:
        raise MembershipError(f"{key_path} already exists: refusing to replace an identity key (pass --force; "
                              "certificates issued for the old key then stop matching)")
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, None))
    _atomic_write(key_path, _key_pem(key), private=True)
    _atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def load_identity_public_key(pem: bytes, *, expected_name: str | None = None,
                             what: str = "--identity-public-key") -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key from a PEM CSR (its self-signature and Common Name are checked) or a PEM public key."""
    data = bytes(pem)
    if b"CERTIFICATE REQUEST" in data:
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as e:
            raise MembershipError(f"{what}: not a PEM certificate request ({e})") from None
        if not csr.is_signature_valid:
            raise MembershipError(f"{what}: the CSR's signature does not verify (it was not made with its key)")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if expected_name is not None and (not cns or cns[0].value != expected_name):
            got = cns[0].value if cns else None
            raise MembershipError(f"{what}: the CSR names {got!r}, not {expected_name!r}")
        key = csr.public_key()
    else:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise MembershipError(f"{what}: neither a PEM CSR nor a PEM public key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise MembershipError(f"{what}: the identity key must be Ed25519 (make one with `mor pki membership "
                              "keygen NAME --out DIR`)")
    return key


def enrol(mdir: str | Path, name: str, identity_public_key: ed25519.Ed25519PublicKey | bytes | None = None, *,
          days: float = 365, out_dir: str | Path | None = None,
          not_before: _dt.datetime | None = None) -> Path:
    """Authority side: certify ``identity_public_key`` (an Ed25519 key, or PEM bytes of a CSR / public key) as the
    identity of member ``name``. Writes ``membership.crt`` and ``membership-ca.crt`` to ``out_dir`` (default
    ``mdir/members/NAME``) and records the enrolment. ``identity_public_key=None`` (pilots only) also generates the
    key there, so the authority has seen it."""
    check_name(name, "member name")
    if days <= 0:
        raise MembershipError(f"--days must be positive, got {days}")
    auth = MembershipAuthority.load(mdir)
    out = Path(out_dir) if out_dir else auth.dir / "members" / name
    if identity_public_key is None:
        priv = ed25519.Ed25519PrivateKey.generate()
        _atomic_write(out / "identity.key", _key_pem(priv), private=True)
        pub = priv.public_key()
    elif isinstance(identity_public_key, (bytes, bytearray)):
        pub = load_identity_public_key(identity_public_key, expected_name=name)
    else:
        pub = identity_public_key
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise MembershipError("the identity key must be Ed25519")
    start = not_before or (_now() - CLOCK_SKEW)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(auth.cert.subject).public_key(pub).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_cert_sign=False,
                                     crl_sign=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(auth.key.public_key()), critical=False)
        .sign(auth.key, hashes.SHA256())
    )
    _atomic_write(out / "membership.crt", _cert_pem(cert))
    _atomic_write(out / "membership-ca.crt", _cert_pem(auth.cert))
    records = auth._records()
    records[name] = {"identity_key_sha256": key_fingerprint(pub), "certificate_sha256": cert_fingerprint(cert),
                     "serial": format(cert.serial_number, "x"), "not_after": cert.not_valid_after_utc.isoformat(),
                     "enrolled": _now().isoformat(), "removed": False}
    auth._save_records(records)
    return out


def remove(mdir: str | Path, name: str) -> None:
    """Authority side: take ``name`` off the next roster (its certificate then no longer admits it anywhere)."""
    auth = MembershipAuthority.load(mdir)
    records = auth._records()
    if name not in records:
        raise MembershipError(f"{name!r} is not enrolled (enrolled: {', '.join(sorted(records)) or 'none'})")
    records[name]["removed"] = True
    records[name]["removed_at"] = _now().isoformat()
    auth._save_records(records)


# --------------------------------------------------------------------------------------------- rosters
def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_roster(auth: MembershipAuthority, members: dict[str, dict], *, serial: int, days: float = 30,
                issued_at: _dt.datetime | None = None, federation: str = "MoR federation") -> dict:
    """A signed roster document (a dict ready for ``json.dumps``). ``members``: name -> record with at least
    ``identity_key_sha256`` (and ``certificate_sha256``)."""
    if days <= 0:
        raise MembershipError(f"--days must be positive, got {days}")
    issued = issued_at or _now()
    body = {
        "federation": federation,
        "serial": int(serial),
        "issued_at": issued.isoformat(),
        "not_after": (issued + _dt.timedelta(days=days)).isoformat(),
        "authority_sha256": cert_fingerprint(auth.cert),
        "members": [{"name": n, "identity_key_sha256": r["identity_key_sha256"],
                     "certificate_sha256": r.get("certificate_sha256", "")} for n, r in sorted(members.items())],
    }
    sig = auth.key.sign(_canonical(body), ec.ECDSA(hashes.SHA256()))
    return {"format": ROSTER_FORMAT, "roster": body, "signature": base64.b64encode(sig).decode()}


def write_roster(mdir: str | Path, out: str | Path, *, days: float = 30, federation: str = "MoR federation") -> dict:
    """Authority side: sign a roster of every enrolled, not removed member with the next serial; write it to
    ``out``. Returns the document."""
    auth = MembershipAuthority.load(mdir)
    members = {n: r for n, r in auth._records().items() if not r.get("removed")}
    if not members:
        raise MembershipError(f"no enrolled members in {auth.dir}; enrol them first (`mor pki membership "
                              "enrol NAME --membership DIR --identity-public-key CSR`)")
    serial_path = auth.dir / "roster-serial"
    serial = (int(serial_path.read_text().strip()) if serial_path.exists() else 0) + 1
    doc = sign_roster(auth, members, serial=serial, days=days, federation=federation)
    _atomic_write(Path(out), (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    _atomic_write(serial_path, f"{serial}\n".encode())
    return doc


def _parse_time(s, what: str) -> _dt.datetime:
    try:
        t = _dt.datetime.fromisoformat(s)
    except (TypeError, ValueError):
        raise MembershipError(f"roster: {what} {s!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise MembershipError(f"roster: {what} {s!r} has no time zone")
    return t


@dataclass(frozen=True)
class Roster:
    """A roster whose signature, authority and validity period were checked."""

    serial: int
    issued_at: _dt.datetime
    not_after: _dt.datetime
    federation: str
    members: dict = field(default_factory=dict)
    """name -> {'identity_key_sha256', 'certificate_sha256'}"""

    def check_valid(self, at: _dt.datetime | None = None) -> "Roster":
        at = at or _now()
        if at > self.not_after:
            raise MembershipError(f"the roster (serial {self.serial}) expired at {self.not_after:%Y-%m-%d %H:%M}Z; "
                                  "install the membership authority's current roster.json")
        if at + CLOCK_SKEW < self.issued_at:
            raise MembershipError(f"the roster (serial {self.serial}) is issued in the future "
                                  f"({self.issued_at:%Y-%m-%d %H:%M}Z); check this machine's clock")
        return self


def verify_roster(data: bytes | str | dict, ca_cert: x509.Certificate, *, at: _dt.datetime | None = None,
                  min_serial: int | None = None) -> Roster:
    """Check a roster document against the pinned membership CA: format, signature, authority fingerprint,
    validity period (at ``at``, default now), members well formed, serial >= ``min_serial`` (rollback)."""
    try:
        doc = data if isinstance(data, dict) else json.loads(data)
    except ValueError as e:
        raise MembershipError(f"roster is not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != ROSTER_FORMAT:
        raise MembershipError(f"roster: format must be {ROSTER_FORMAT!r}, got "
                              f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}")
    body, sig = doc.get("roster"), doc.get("signature")
    if not isinstance(body, dict) or not isinstance(sig, str):
        raise MembershipError("roster: needs a 'roster' object and a base64 'signature'")
    try:
        ca_cert.public_key().verify(base64.b64decode(sig, validate=True), _canonical(body), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError):
        raise MembershipError("roster: the signature does not verify against the pinned membership CA (forged or "
                              "altered roster, or a roster from another authority); refusing it") from None
    if body.get("authority_sha256") != cert_fingerprint(ca_cert):
        raise MembershipError("roster: authority_sha256 does not match the pinned membership CA certificate")
    serial = body.get("serial")
    if not isinstance(serial, int) or isinstance(serial, bool) or serial < 1:
        raise MembershipError(f"roster: serial must be a positive integer, got {serial!r}")
    if min_serial is not None and serial < min_serial:
        raise MembershipError(f"roster: serial {serial} is older than serial {min_serial} already seen (rollback "
                              "refused)")
    members: dict[str, dict] = {}
    for m in body.get("members") or []:
        if not isinstance(m, dict):
            raise MembershipError("roster: every member must be an object")
        name, fp = m.get("name"), m.get("identity_key_sha256")
        check_name(name, "roster member name")
        if not (isinstance(fp, str) and len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)):
            raise MembershipError(f"roster: member {name!r} has no identity_key_sha256 (64 hex digits)")
        if name in members:
            raise MembershipError(f"roster: member {name!r} is listed twice")
        members[name] = {"identity_key_sha256": fp, "certificate_sha256": m.get("certificate_sha256", "")}
    if not members:
        raise MembershipError("roster: lists no members")
    r = Roster(serial, _parse_time(body.get("issued_at"), "issued_at"), _parse_time(body.get("not_after"), "not_after"),
               str(body.get("federation", "")), members)
    return r.check_valid(at)


# --------------------------------------------------------------------------------------------- the client's pin
class Membership:
    """What a client pins: the membership CA certificate and a verified roster; verifies peers and cohorts.

    ``verify_peer(client_id, proof)`` is the SecAgg hook: ``proof`` must be an identity certificate issued by the
    membership CA, valid now, naming ``client_id``, whose key's fingerprint is the roster's entry for ``client_id``;
    returns the Ed25519 public key, raises :class:`MembershipError` otherwise. ``check_cohort(ids)`` refuses a round
    listing anyone not on the roster. The roster's expiry is checked at every call; with ``roster_path`` a newer
    roster written there is picked up (an older serial is refused)."""

    def __init__(self, ca_pem: bytes, roster: bytes | str | dict, *, roster_path: str | Path | None = None,
                 own_certificate_pem: bytes | None = None):
        self.ca_pem = bytes(ca_pem)
        self.ca_cert = _load_cert(self.ca_pem, "membership CA certificate")
        self.roster = verify_roster(roster, self.ca_cert)
        self.roster_path = Path(roster_path) if roster_path else None
        self._mtime = self.roster_path.stat().st_mtime_ns if self.roster_path and self.roster_path.exists() else None
        self.own_certificate_pem = own_certificate_pem

    @classmethod
    def from_files(cls, ca_path: str | Path, roster_path: str | Path,
                   own_certificate_path: str | Path | None = None) -> "Membership":
        def read(p, what, fix):
            try:
                return Path(p).read_bytes()
            except FileNotFoundError:
                raise MembershipError(f"{what} {p} is missing; {fix}") from None
        ca = read(ca_path, "membership CA certificate", "get membership-ca.crt from the membership authority")
        roster = read(roster_path, "roster", "get roster.json from the membership authority")
        own = None
        if own_certificate_path is not None:
            own = read(own_certificate_path, "membership certificate",
                       "enrol with the membership authority (`mor pki membership enrol NAME`)")
        return cls(ca, roster, roster_path=roster_path, own_certificate_pem=own)

    @classmethod
    def from_creds_dir(cls, creds_dir: str | Path) -> "Membership | None":
        """``membership-ca.crt`` + ``roster.json`` + ``membership.crt`` in a client's credentials folder, or None when
        the folder has none of them (single-CA pilot); a partial set is an error naming what is missing."""
        d = Path(creds_dir)
        names = ("membership-ca.crt", "roster.json", "membership.crt")
        present = [n for n in names if (d / n).exists()]
        if not present:
            return None
        missing = [n for n in names if n not in present]
        if missing:
            raise MembershipError(f"credentials folder {d} has {', '.join(present)} but lacks {', '.join(missing)}: "
                                  "membership needs all three (from the membership authority)")
        return cls.from_files(d / "membership-ca.crt", d / "roster.json", d / "membership.crt")

    def current(self) -> Roster:
        """The roster in force: reloads ``roster_path`` if it changed (refusing an older serial), checks expiry."""
        if self.roster_path is not None:
            try:
                mtime = self.roster_path.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = self._mtime
            if mtime != self._mtime:
                self.roster = verify_roster(self.roster_path.read_bytes(), self.ca_cert, min_serial=self.roster.serial)
                self._mtime = mtime
        return self.roster.check_valid()

    def check_cohort(self, client_ids) -> None:
        roster = self.current()
        outsiders = sorted(set(client_ids) - set(roster.members))
        if outsiders:
            raise MembershipError(f"the round includes {len(outsiders)} client(s) not on the signed roster (serial "
                                  f"{roster.serial}): {', '.join(outsiders)}; refusing a round with unenrolled "
                                  "(possibly sybil) peers")

    def verify_peer(self, client_id: str, proof: bytes) -> ed25519.Ed25519PublicKey:
        roster = self.current()
        entry = roster.members.get(client_id)
        if entry is None:
            raise MembershipError(f"{client_id!r} is not on the signed roster (serial {roster.serial})")
        cert = _load_cert(bytes(proof), f"identity proof of {client_id!r}")
        if common_name(cert) != client_id:
            raise MembershipError(f"{client_id!r} presented the membership certificate of {common_name(cert)!r}")
        try:
            key = pki.verify_identity_certificate(bytes(proof), self.ca_cert, expected_name=client_id)
        except PKIError as e:
            raise MembershipError(f"{client_id!r}: membership certificate refused: "
                                  f"{str(e).replace('federation', 'membership')}") from None
        if key_fingerprint(key) != entry["identity_key_sha256"]:
            raise MembershipError(f"{client_id!r}: its identity key is not the one on the roster (serial "
                                  f"{roster.serial})")
        return key

    __call__ = verify_peer

    def check_separate_from(self, tls_ca_cert: x509.Certificate) -> None:
        """Refuse a membership CA that is the federation's TLS CA (same key): it would add no protection against the
        operator who holds that key."""
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if (tls_ca_cert.public_key().public_bytes(serialization.Encoding.DER, spki)
                == self.ca_cert.public_key().public_bytes(serialization.Encoding.DER, spki)):
            raise MembershipError("membership-ca.crt is the federation's TLS CA (ca.crt): the server operator holds "
                                  "its key, so it protects nothing; pin the membership authority's own CA")

    def check_own(self, identity_key: ed25519.Ed25519PrivateKey, name: str) -> bytes:
        """This client's own membership certificate, after checking it certifies ``identity_key`` as ``name`` and
        that ``name`` is on the roster with that key. Returns its PEM (the SecAgg identity proof)."""
        if self.own_certificate_pem is None:
            raise MembershipError("no membership certificate of this client (membership.crt)")
        try:
            key = self.verify_peer(name, self.own_certificate_pem)
        except MembershipError as e:
            raise MembershipError(f"this client's own membership does not verify: {e}") from None
        if key_fingerprint(key) != key_fingerprint(identity_key.public_key()):
            raise MembershipError(f"membership.crt certifies a different key than this client's identity.key "
                                  f"({name!r}); enrol the key in identity.key")
        return self.own_certificate_pem


def describe(roster: Roster) -> str:
    lines = [f"roster serial {roster.serial} of {roster.federation!r}: issued {roster.issued_at:%Y-%m-%d %H:%M}Z, "
             f"valid until {roster.not_after:%Y-%m-%d %H:%M}Z, {len(roster.members)} member(s)"]
    for n, e in sorted(roster.members.items()):
        lines.append(f"  {n:<24} identity key sha256 {e['identity_key_sha256'][:16]}...")
    return "\n".join(lines)


__all__ = ["CLOCK_SKEW", "Membership", "MembershipAuthority", "MembershipError", "ROSTER_FORMAT", "Roster",
           "cert_fingerprint", "common_name", "describe", "enrol", "init_authority", "key_fingerprint",
           "load_identity_public_key", "new_identity", "remove", "sign_roster", "verify_roster", "write_roster"]
