"""Third-party verification of an audit log: chain, signatures, checkpoints, Merkle roots, truncation.

``verify_log`` walks the file once and stops at the first bad entry, naming its sequence number and why:

* modification of any field            -> payload digest / entry hash / signature mismatch at that seq
* deletion or reordering               -> "expected seq k, found seq j" at the first missing position k
* insertion or duplication             -> bad signature / chain link / sequence number at the inserted position
* truncation of a sealed log           -> the log no longer ends with the final checkpoint ``close()`` writes;
                                          first_bad_seq is the first missing seq (a torn line counts too)

An *open* log (still written, or crashed before ``close``) ends without a final checkpoint; verifying it needs
``allow_open=True``, and then only truncation back to its last checkpoint can be excluded by an outside witness
(a checkpoint hash or Merkle root the other party recorded, see ``witness``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tqdm.auto import tqdm

from . import merkle
from .entry import FORMAT, GENESIS_PREV, AuditError, canonical, check_sig, entry_hash, parse_line, public_key_hex, \
    sha256_hex
from .log import read_raw_lines

__all__ = ["VerifyResult", "verify_log", "load_public_key"]


@dataclass
class VerifyResult:
    """Outcome of ``verify_log``.

    ok: every check passed. first_bad_seq: sequence number of the first bad (or first missing) entry, None if ok.
    reason: why (human-readable). n: entries that verified. sealed: the log ends with a final checkpoint.
    key_pinned: the signatures were checked against a key the caller supplied (False: the genesis key was trusted).
    """

    ok: bool
    first_bad_seq: int | None
    reason: str
    n: int
    path: str = ""
    actor: str | None = None
    public_key: str | None = None
    key_pinned: bool = False
    sealed: bool = False
    checkpoints: int = 0
    unsealed_tail: int = 0
    head: str | None = None
    root: str | None = None
    entries: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "entries"}


def load_public_key(path, *, ca_cert_path=None) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file holding a public key or a certificate.

    With ``ca_cert_path`` the file must be an identity certificate issued by that CA (the key is then pinned by
    the federation's PKI, the real check); it is verified with ``privacy.pki.verify_identity_certificate``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"public key file {p} does not exist; pass the writer's identity.crt or a public "
                                "key PEM")
    data = p.read_bytes()
    if b"BEGIN CERTIFICATE" in data:
        if ca_cert_path is not None:
            from privacy import pki

            ca = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
            return pki.verify_identity_certificate(data, ca)
        key = x509.load_pem_x509_certificate(data).public_key()
    else:
        if ca_cert_path is not None:
            raise ValueError(f"--ca given but {p} is a bare public key, not a certificate; pass the writer's "
                             "identity.crt to check it against the CA")
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise ValueError(f"{p} is neither a PEM public key nor a PEM certificate ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{p} does not hold an Ed25519 key (audit logs are signed with Ed25519 identity keys)")
    return key


def verify_log(path, public_key: Ed25519PublicKey | None = None, *, allow_open: bool = False,
               witness: tuple[int, str] | None = None, progress: bool | None = None) -> VerifyResult:
    """Verify an audit log file; never raises for a bad log (returns ok=False with the first bad seq and reason).

    Args:
        path: the JSON Lines log.
        public_key: the writer's pinned Ed25519 public key (from its federation identity certificate). ``None``
            trusts the key embedded in the genesis entry, which only proves the log is self-consistent: anyone can
            rewrite a whole log under a fresh key. ``result.key_pinned`` says which check ran.
        allow_open: accept a log that does not end with a final checkpoint (still being written, or crashed).
        witness: ``(seq, hash)`` of an entry recorded elsewhere (e.g. a checkpoint a peer saw); the log must hold
            exactly that entry, which detects truncation or rewriting of an open log back past it.
        progress: show a tqdm bar (default: only for logs over 20,000 lines).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audit log {path} does not exist")
    lines = read_raw_lines(path)
    res = VerifyResult(ok=False, first_bad_seq=None, reason="", n=0, path=str(path), key_pinned=public_key is not None)
    tree = merkle.CompactTree()
    prev = GENESIS_PREV
    pub = public_key
    since = 0
    witnessed = witness is None

    def fail(seq: int, reason: str) -> VerifyResult:
        res.first_bad_seq, res.reason = seq, reason
        return res

    show = progress if progress is not None else len(lines) > 20000
    for rl in tqdm(lines, desc=f"verify {path.name}", unit="entry", disable=not show):
        k = res.n
        where = f"line {rl.lineno}"
        if not rl.complete:
            return fail(k, f"{where} (offset {rl.offset}, {len(rl.data)} bytes) is torn: no trailing newline, the "
                           "last write was interrupted or the file was cut")
        try:
            e = parse_line(rl.data)  # exactly the signed fields, typed, canonical bytes: nothing outside the hash
        except AuditError as err:
            return fail(k, f"{where} (seq {k}) is not a valid audit entry: {err}")
        if not isinstance(e.seq, int) or e.seq != k:
            how = ("an entry was deleted or entries were reordered" if isinstance(e.seq, int) and e.seq > k
                   else "an entry was inserted, duplicated or reordered")
            return fail(k, f"{where}: expected seq {k}, found seq {e.seq}: {how}")
        if k == 0:
            if e.event != "genesis" or not isinstance(e.payload, dict) or "public_key" not in e.payload:
                return fail(0, "the first entry is not a genesis entry")
            if e.payload.get("format") != FORMAT:
                return fail(0, f"unknown log format {e.payload.get('format')!r} (this verifier reads {FORMAT})")
            try:
                embedded = Ed25519PublicKey.from_public_bytes(bytes.fromhex(e.payload["public_key"]))
            except (ValueError, TypeError):
                return fail(0, "the genesis entry's public key is not a valid Ed25519 key")
            if pub is None:
                pub = embedded
            elif public_key_hex(pub) != e.payload["public_key"]:
                return fail(0, "the log's genesis key differs from the pinned public key: the log was written (or "
                               "rewritten) by someone else")
            res.actor, res.public_key = e.actor, e.payload["public_key"]
        elif e.event == "genesis":
            return fail(k, f"{where}: a second genesis entry (logs were spliced)")
        if e.actor != res.actor:
            return fail(k, f"{where}: actor {e.actor!r} differs from the log's actor {res.actor!r}")
        if e.prev != prev:
            return fail(k, f"{where}: chain broken: 'prev' is not the hash of seq {k - 1}"
                        if k else f"{where}: genesis 'prev' is not zero")
        try:
            pd = sha256_hex(canonical(e.payload))
        except AuditError as err:
            return fail(k, f"{where}: payload is not canonical JSON ({err})")
        if pd != e.payload_digest:
            return fail(k, f"{where}: payload modified (payload_digest mismatch)")
        if entry_hash(e.body()) != e.hash:
            return fail(k, f"{where}: entry modified (hash mismatch on seq/time/actor/event/prev)")
        if not isinstance(e.sig, str) or not check_sig(pub, e.hash, e.sig):
            return fail(k, f"{where}: bad signature")
        if e.event == "checkpoint":
            p = e.payload
            if p.get("count") != k or p.get("head") != prev:
                return fail(k, f"{where}: checkpoint count/head do not match the entries before it")
            if p.get("root") != tree.root().hex():
                return fail(k, f"{where}: checkpoint Merkle root does not match the entries before it")
            res.checkpoints += 1
            since = 0
        elif k:
            since += 1
        if witness is not None and witness[0] == k:
            if witness[1] != e.hash:
                return fail(k, f"{where}: differs from the witnessed entry hash {witness[1][:16]}...")
            witnessed = True
        tree.append(merkle.leaf_hash(bytes.fromhex(e.hash)))
        prev = e.hash
        res.entries.append(e)
        res.n += 1
        res.sealed = e.event == "checkpoint" and bool(e.payload.get("final"))
    if res.n == 0:
        return fail(0, "empty log: no genesis entry")
    res.head, res.root, res.unsealed_tail = prev, tree.root().hex(), since
    if not witnessed:
        return fail(res.n, f"log ends at seq {res.n - 1}, before the witnessed entry seq {witness[0]}: truncated")
    if not res.sealed and not allow_open:
        return fail(res.n, f"log ends at seq {res.n - 1} without a final checkpoint: truncated, or not closed "
                           f"(still written or crashed; {since} entries after the last checkpoint). Use "
                           "--allow-open for a log that is still being written")
    res.ok = True
    res.reason = "ok" + ("" if res.sealed else f" (open log: {since} entries after the last checkpoint)") + \
        ("" if res.key_pinned else " (key NOT pinned: trusted the genesis entry's key)")
    return res
