"""Federation PKI: a CA, the server's TLS certificate, client TLS + identity certificates, revocation.

One module although over 400 lines: every certificate operation (CA, issue, renew, CRL, credentials) works on
the one folder layout below with the same crash-safe writes.

Layout of a PKI folder (``mor pki init --pki pki``)::

    pki/ca/ca.key  ca.crt  issued.json                (the CA's key never leaves this folder)
    pki/server/server.key  server.crt  ca.crt  crl.pem
    pki/clients/NAME/tls.key  tls.crt  identity.key  identity.crt  ca.crt

Every client gets two keys: an ECDSA P-256 key for mutual TLS (its identity on the wire is the certificate's Common
Name), and an Ed25519 *identity* key used to sign secure-aggregation keys and audit-log entries. Both certificates are
issued by the federation CA and carry the same Common Name, so anyone holding ``ca.crt`` can check a signature's author.

The certificate revocation list has ONE canonical location, ``pki/server/crl.pem`` (:func:`crl_path`): ``pki
init`` creates it, ``pki revoke`` and ``pki crl-refresh`` re-sign it, and the server reads (and watches) that file.
A CRL carries ``next_update``: once it has passed, the CRL is *stale* and must not be trusted (:meth:`CRL.stale`);
the server then refuses every client until the CA re-signs it. A CRL is signed by the CA, so whoever relays it (the
server, to SecAgg peers) can withhold or replay an older one but cannot forge one.

Pure functions over ``cryptography``; the only I/O is reading and writing PEM files (atomically, keys mode 0600).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .fsutil import atomic_write_bytes

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


class PKIError(Exception):
    """A PKI operation failed; the message names the file or argument and what to do."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _atomic_write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Keys 0600, certificates and public files 0644, replaced atomically (:mod:`privacy.fsutil`)."""
    atomic_write_bytes(path, data, mode=0o600 if private else 0o644)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def check_name(name: str, what: str = "client name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PKIError(
            f"invalid {what} {name!r}: use 1-63 characters from letters, digits, '_', '.', '-', starting with a "
            "letter or digit"
        )
    return name


def _name(cn: str, org: str = "MoR federation") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def load(cls, pki_dir: str | Path) -> "CA":
        d = Path(pki_dir) / "ca"
        try:
            key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
        except FileNotFoundError as e:
            raise PKIError(f"no federation CA in {pki_dir}: {e.filename} is missing; run `mor pki init --pki "
                           f"{pki_dir}` first") from None
        return cls(key, cert)

    def _builder(self, subject: x509.Name, public_key, days: float, not_before: _dt.datetime | None = None):
        start = not_before or (_now() - _dt.timedelta(minutes=5))
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + _dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )


def init_ca(pki_dir: str | Path, *, name: str = "MoR federation CA", days: float = 3650,
            server_hosts: tuple[str, ...] = DEFAULT_HOSTS, force: bool = False) -> CA:
    """Create the federation CA and the server certificate (SANs: ``server_hosts``)."""
    pki_dir = Path(pki_dir)
    if (pki_dir / "ca" / "ca.key").exists() and not force:
        raise PKIError(f"{pki_dir}/ca/ca.key already exists: refusing to overwrite a federation CA (pass --force to "
                       "replace it; every issued certificate then stops working)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    start = _now() - _dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _atomic_write(pki_dir / "ca" / "ca.key", _key_pem(key), private=True)
    _atomic_write(pki_dir / "ca" / "ca.crt", _cert_pem(cert))
    _atomic_write(pki_dir / "ca" / "issued.json", b"{}")
    ca = CA(key, cert)
    issue_server(pki_dir, hosts=server_hosts, ca=ca)
    write_crl(pki_dir, ca)
    return ca


def _write_server_tls(out: Path, ca: "CA", hosts: tuple[str, ...], days: float) -> Path:
    """A fresh server TLS key and its CA-signed certificate (SANs: ``hosts``, CN: the first), written to
    ``out``/server.key then server.crt (the key first: a server never loads a mismatched pair)."""
    if not hosts:
        raise PKIError("server certificate needs at least one host name or IP address (--hosts)")
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (ca._builder(_name(hosts[0]), key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    _atomic_write(out / "server.key", _key_pem(key), private=True)
    _atomic_write(out / "server.crt", _cert_pem(cert))
    return out


def issue_server(pki_dir: str | Path, *, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: float = 825,
                 ca: CA | None = None) -> Path:
    pki_dir = Path(pki_dir)
    ca = ca or CA.load(pki_dir)
    out = _write_server_tls(pki_dir / "server", ca, hosts, days)
    _atomic_write(out / "ca.crt", _cert_pem(ca.cert))
    # the server's Ed25519 identity key signs its audit log; its certificate lets a third party pin it
    id_key = ed25519.Ed25519PrivateKey.generate()
    id_cert = ca._builder(_name(f"server:{hosts[0]}"), id_key.public_key(), days).sign(ca.key, hashes.SHA256())
    _atomic_write(out / "identity.key", _key_pem(id_key), private=True)
    _atomic_write(out / "identity.crt", _cert_pem(id_cert))
    return out


def _record_issued(pki_dir: Path, name: str, kind: str, cert: x509.Certificate) -> None:
    path = pki_dir / "ca" / "issued.json"
    issued = json.loads(path.read_text()) if path.exists() else {}
    issued.setdefault(name, []).append(
        {"kind": kind, "serial": format(cert.serial_number, "x"), "not_after": cert.not_valid_after_utc.isoformat()}
    )
    _atomic_write(path, json.dumps(issued, indent=1).encode())


def issue_client(pki_dir: str | Path, name: str, *, days: float = 365, out_dir: str | Path | None = None,
                 not_before: _dt.datetime | None = None, ca: CA | None = None,
                 identity_public_key: ed25519.Ed25519PublicKey | None = None,
                 tls_public_key: ec.EllipticCurvePublicKey | None = None) -> Path:
    """Issue a client's TLS certificate and Ed25519 identity certificate into ``pki/clients/NAME`` (or out_dir).

    ``identity_public_key``: certify the institution's own identity key (from its CSR, see
    ``privacy.membership.new_identity``) instead of generating one here; no identity.key is then written, so the
    operator never holds the key that signs the client's SecAgg keys and audit log."""
    check_name(name)
    if days <= 0 and not_before is None:
        raise PKIError(f"--days must be positive, got {days}")
    pki_dir = Path(pki_dir)
    ca = ca or CA.load(pki_dir)
    out = Path(out_dir) if out_dir else pki_dir / "clients" / name
    if tls_public_key is not None and not isinstance(tls_public_key, ec.EllipticCurvePublicKey):
        raise PKIError("tls_public_key must be an EC public key (P-256, from `mor client keygen`)")
    tls_key = ec.generate_private_key(ec.SECP256R1()) if tls_public_key is None else None
    tls_cert = (
        ca._builder(_name(name), tls_public_key or tls_key.public_key(), days, not_before)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    if identity_public_key is not None and not isinstance(identity_public_key, ed25519.Ed25519PublicKey):
        raise PKIError("identity_public_key must be an Ed25519 public key")
    id_key = ed25519.Ed25519PrivateKey.generate() if identity_public_key is None else None
    id_cert = (
        ca._builder(_name(name), identity_public_key or id_key.public_key(), days, not_before)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_cert_sign=False,
                                     crl_sign=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    if tls_key is not None:
        _atomic_write(out / "tls.key", _key_pem(tls_key), private=True)
    _atomic_write(out / "tls.crt", _cert_pem(tls_cert))
    if id_key is not None:
        _atomic_write(out / "identity.key", _key_pem(id_key), private=True)
    _atomic_write(out / "identity.crt", _cert_pem(id_cert))
    _atomic_write(out / "ca.crt", _cert_pem(ca.cert))
    _record_issued(pki_dir, name, "tls", tls_cert)
    _record_issued(pki_dir, name, "identity", id_cert)
    return out


def new_tls_key_and_csr(name: str, out_dir: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Institution side of enrolment by CSR: an EC P-256 TLS key in ``out_dir/tls.key`` (0600, never sent anywhere)
    and ``out_dir/tls.csr`` (Common Name ``name``, signed by the key). The operator signs it with
    ``mor pki sign-csr``; only certificates come back."""
    check_name(name)
    out = Path(out_dir)
    key_path, csr_path = out / "tls.key", out / "tls.csr"
    if key_path.exists() and not force:
        raise PKIError(f"{key_path} already exists: refusing to replace a TLS key (pass --force)")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    _atomic_write(key_path, _key_pem(key), private=True)
    _atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def load_tls_csr(pem: bytes, *, expected_name: str, what: str = "tls.csr") -> ec.EllipticCurvePublicKey:
    """The EC public key of a TLS CSR, after checking its self-signature (proof of possession) and Common Name."""
    try:
        csr = x509.load_pem_x509_csr(bytes(pem))
    except ValueError as e:
        raise PKIError(f"{what}: not a PEM certificate request ({e})") from None
    if not csr.is_signature_valid:
        raise PKIError(f"{what}: the CSR's signature does not verify (it was not made with its key)")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != expected_name:
        raise PKIError(f"{what}: the CSR names {cns[0].value if cns else None!r}, not {expected_name!r}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"{what}: the TLS key must be an EC key (make it with `mor client keygen`)")
    return key


def renew_client(pki_dir: str | Path, name: str, *, days: float = 365, creds_dir: str | Path | None = None,
                 out_dir: str | Path | None = None) -> Path:
    """Issue new TLS and identity certificates for the SAME keys as the client's current ones (read from
    ``creds_dir/tls.crt`` and ``identity.crt``, default ``pki/clients/NAME``): no key moves, nothing else is
    invalidated (unlike ``init --force``). The old certificates stay valid until they expire (revoke them with
    ``pki revoke`` if they must stop at once: that revokes every certificate issued to NAME, the new ones too)."""
    pki_dir = Path(pki_dir)
    src = Path(creds_dir) if creds_dir else pki_dir / "clients" / name
    try:
        tls_old = x509.load_pem_x509_certificate((src / "tls.crt").read_bytes())
        id_old = x509.load_pem_x509_certificate((src / "identity.crt").read_bytes())
    except FileNotFoundError as e:
        raise PKIError(f"renew {name}: {e.filename} is missing; give the folder holding the current tls.crt and "
                       "identity.crt (--creds)") from None
    ca = CA.load(pki_dir)
    for cert, what in ((tls_old, "tls.crt"), (id_old, "identity.crt")):
        if common_name(cert) != name:
            raise PKIError(f"renew {name}: {src / what} names {common_name(cert)!r}")
        try:
            cert.verify_directly_issued_by(ca.cert)
        except (ValueError, TypeError, Exception) as e:  # InvalidSignature and friends
            raise PKIError(f"renew {name}: {src / what} was not issued by this CA ({type(e).__name__})") from None
    return issue_client(pki_dir, name, days=days, out_dir=out_dir or src, ca=ca,
                        tls_public_key=tls_old.public_key(), identity_public_key=id_old.public_key())


def renew_server(pki_dir: str | Path, *, days: float = 825, hosts: tuple[str, ...] | None = None) -> Path:
    """Rotate the server's TLS key and certificate (same CA; the SANs of the current certificate unless ``hosts``),
    leaving its identity key, the CA and every client certificate untouched. A running server picks the new pair
    up at its next TLS handshake (``FederationServer`` re-reads ``server/server.key`` + ``server.crt`` when they
    change). The key is written first, then the certificate: a server never loads a mismatched pair."""
    pki_dir = Path(pki_dir)
    ca = CA.load(pki_dir)
    out = pki_dir / "server"
    if hosts is None:
        try:
            cur = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
            san = cur.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            hosts = tuple([str(v) for v in san.get_values_for_type(x509.DNSName)]
                          + [str(v) for v in san.get_values_for_type(x509.IPAddress)])
        except (FileNotFoundError, x509.ExtensionNotFound):
            hosts = DEFAULT_HOSTS
    return _write_server_tls(out, ca, hosts, days)


def key_matches_cert(key_pem: bytes, cert_pem: bytes) -> bool:
    """Whether a PEM private key belongs to a PEM certificate (used before switching to a rotated pair)."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def certificate_expiry(path: str | Path) -> float:
    """not_valid_after of a PEM certificate file, as a unix timestamp."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes()).not_valid_after_utc.timestamp()


CRL_DAYS = 30.0
"""Default validity of a signed CRL (its ``next_update``); re-sign before then with ``mor pki crl-refresh``."""


def crl_path(pki_dir: str | Path) -> Path:
    """The one canonical CRL of a PKI folder: written by init/revoke/crl-refresh, read and watched by the server."""
    return Path(pki_dir) / "server" / "crl.pem"


def _legacy_crl_path(pki_dir: str | Path) -> Path:
    return Path(pki_dir) / "ca" / "crl.pem"   # where PKI folders made before the fix kept it


@dataclass(frozen=True)
class CRL:
    """A CRL whose signature was checked against the federation CA."""

    revoked: dict
    """Revoked serial number -> revocation time (UTC)."""
    last_update: _dt.datetime
    next_update: _dt.datetime | None
    pem: bytes

    def stale(self, at: _dt.datetime | None = None) -> bool:
        """True once ``next_update`` has passed (or the CRL names none): it must not be trusted any more."""
        return self.next_update is None or (at or _now()) > self.next_update

    def check_fresh(self, at: _dt.datetime | None = None, what: str = "CRL") -> "CRL":
        if self.stale(at):
            raise PKIError(f"{what} is stale: its next_update ({_fmt(self.next_update)}) has passed; the CA must "
                           "re-sign it (`mor pki crl-refresh --pki PKI`)")
        return self


def _fmt(t: _dt.datetime | None) -> str:
    return "none" if t is None else f"{t:%Y-%m-%d %H:%M:%S}Z"


def write_crl(pki_dir: str | Path, ca: CA | None = None, revoked: dict[int, _dt.datetime] | None = None, *,
              days: float = CRL_DAYS, now: _dt.datetime | None = None) -> Path:
    """Sign a CRL listing ``revoked`` (valid ``days`` from ``now``) and write it to :func:`crl_path`."""
    pki_dir = Path(pki_dir)
    ca = ca or CA.load(pki_dir)
    now = now or _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + _dt.timedelta(days=days))
    )
    for serial, when in sorted((revoked or {}).items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    out = crl_path(pki_dir)
    _atomic_write(out, crl.public_bytes(serialization.Encoding.PEM))
    legacy = _legacy_crl_path(pki_dir)
    if legacy.exists():  # a second copy could only drift from the canonical one
        legacy.unlink()
    return out


def read_crl(source: str | Path | bytes, ca_cert: x509.Certificate) -> CRL:
    """Parse a PEM or DER CRL (bytes, or a file path) and check that the federation CA issued and signed it."""
    where = "CRL" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{where} is missing; re-sign it with `mor pki crl-refresh --pki PKI`") from None
    try:
        crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)
    except ValueError as e:
        raise PKIError(f"{where} is not a CRL ({e}); re-sign it with `mor pki crl-refresh --pki PKI`") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise PKIError(f"{where}: CRL signature does not verify against the federation CA; refusing to use it")
    return CRL({r.serial_number: r.revocation_date_utc for r in crl}, crl.last_update_utc, crl.next_update_utc,
               crl.public_bytes(serialization.Encoding.PEM))


def load_crl(path: str | Path, ca_cert: x509.Certificate) -> dict[int, _dt.datetime]:
    """Revoked serials -> revocation time, after checking the CRL's signature against the CA (not its freshness:
    use :func:`read_crl` and :meth:`CRL.check_fresh` to decide whether to trust it now)."""
    return read_crl(path, ca_cert).revoked


def _current_revocations(pki_dir: Path, ca: CA) -> dict[int, _dt.datetime]:
    revoked: dict[int, _dt.datetime] = {}
    for p in (_legacy_crl_path(pki_dir), crl_path(pki_dir)):
        if p.exists():
            revoked.update(load_crl(p, ca.cert))
    return revoked


def revoke(pki_dir: str | Path, name: str, *, days: float = CRL_DAYS) -> list[int]:
    """Revoke every certificate issued to ``name`` (re-signs the canonical CRL); returns the revoked serials."""
    pki_dir = Path(pki_dir)
    ca = CA.load(pki_dir)
    issued = json.loads((pki_dir / "ca" / "issued.json").read_text())
    if name not in issued:
        raise PKIError(f"no certificate was issued to {name!r} by this CA (known: {', '.join(sorted(issued)) or 'none'})")
    revoked = _current_revocations(pki_dir, ca)
    serials = [int(e["serial"], 16) for e in issued[name]]
    for s in serials:
        revoked.setdefault(s, _now())
    write_crl(pki_dir, ca, revoked, days=days)
    return serials


def refresh_crl(pki_dir: str | Path, *, days: float = CRL_DAYS) -> CRL:
    """Re-sign the current revocation list with a new ``next_update`` (``days`` from now); returns it."""
    pki_dir = Path(pki_dir)
    if days <= 0:
        raise PKIError(f"--days must be positive, got {days}")
    ca = CA.load(pki_dir)
    path = write_crl(pki_dir, ca, _current_revocations(pki_dir, ca), days=days)
    return read_crl(path, ca.cert)


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        raise PKIError("certificate has no Common Name")
    return str(attrs[0].value)


def verify_identity_certificate(pem: bytes, ca_cert: x509.Certificate, *, expected_name: str | None = None,
                                revoked: dict[int, _dt.datetime] | None = None,
                                at: _dt.datetime | None = None) -> ed25519.Ed25519PublicKey:
    """Check an Ed25519 identity certificate against the CA; return its public key or raise PKIError."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise PKIError(f"identity certificate is not a PEM certificate: {e}") from None
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:
        raise PKIError("identity certificate was not issued by this federation's CA") from None
    at = at or _now()
    if not (cert.not_valid_before_utc <= at <= cert.not_valid_after_utc):
        raise PKIError(f"identity certificate of {common_name(cert)!r} is not valid now "
                       f"(valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")
    if revoked and cert.serial_number in revoked:
        raise PKIError(f"identity certificate of {common_name(cert)!r} was revoked")
    if expected_name is not None and common_name(cert) != expected_name:
        raise PKIError(f"identity certificate names {common_name(cert)!r}, but the TLS certificate names "
                       f"{expected_name!r}")
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PKIError("identity certificate does not hold an Ed25519 key")
    return key


@dataclass(frozen=True)
class ClientCredentials:
    """What a client needs to dial the federation: CA certificate, its TLS key/cert, its identity key/cert."""

    ca_pem: bytes
    tls_key_pem: bytes
    tls_cert_pem: bytes
    identity_key_pem: bytes | None = None
    identity_cert_pem: bytes | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ClientCredentials":
        d = Path(path)
        missing = [n for n in ("ca.crt", "tls.key", "tls.crt") if not (d / n).exists()]
        if missing:
            raise PKIError(f"credentials folder {d} lacks {', '.join(missing)}; issue one with `mor pki "
                           "issue-client NAME` and copy pki/clients/NAME to the client")
        opt = lambda n: (d / n).read_bytes() if (d / n).exists() else None  # noqa: E731
        return cls((d / "ca.crt").read_bytes(), (d / "tls.key").read_bytes(), (d / "tls.crt").read_bytes(),
                   opt("identity.key"), opt("identity.crt"))

    @property
    def name(self) -> str:
        return common_name(x509.load_pem_x509_certificate(self.tls_cert_pem))

    def identity_key(self) -> ed25519.Ed25519PrivateKey | None:
        if self.identity_key_pem is None:
            return None
        return serialization.load_pem_private_key(self.identity_key_pem, password=None)


@dataclass(frozen=True)
class ServerCredentials:
    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes
    crl_path: Path | None
    """The CRL the server trusts and watches (:func:`crl_path`); never None for a folder made by ``pki init``. The
    file may be missing (then the server refuses clients until one is written)."""

    @classmethod
    def from_dir(cls, pki_dir: str | Path) -> "ServerCredentials":
        d = Path(pki_dir) / "server"
        missing = [n for n in ("ca.crt", "server.key", "server.crt") if not (d / n).exists()]
        if missing:
            raise PKIError(f"server credentials in {d} lack {', '.join(missing)}; run `mor pki init --pki "
                           f"{pki_dir}`")
        crl = crl_path(pki_dir)
        if not crl.exists() and _legacy_crl_path(pki_dir).exists():
            crl = _legacy_crl_path(pki_dir)   # a PKI folder made before the CRL moved to server/crl.pem
        return cls((d / "ca.crt").read_bytes(), (d / "server.key").read_bytes(), (d / "server.crt").read_bytes(),
                   crl)

    @property
    def ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_pem)


def load_identity_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """Load an Ed25519 identity (signing) key written by this module."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PKIError(f"identity key {path} is missing; re-issue the credentials with `mor pki`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PKIError(f"{path} is not an Ed25519 identity key")
    return key
