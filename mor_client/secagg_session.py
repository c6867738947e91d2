"""Client side of secure aggregation over the federation stream: a thin shell over ``privacy.secagg.SecAggClient``.

For a ``secagg`` / ``secagg+dp`` task the client scores the items with its own scorer, then runs the SecAgg+
stages the server pushes. Its scores leave only multiplied by its routing weight and masked; peers' identity keys
are checked against the federation CA (their identity certificates). Routing weights that would isolate this client
(above ``max_weight``, or fewer than ``min_contributors`` effective contributors on an item), rounds that tolerate
fewer colluders than ``min_collusion_tolerance``, reused round ids, plain-``secagg`` sums that would difference
against an earlier sum (query audit, on disk beside the ledger) and releases that would overspend the privacy
budget (``secagg+dp``) are refused with a ``Refusal`` naming the reason. The isolation and collusion knobs come
from the client's ``ReleasePolicy`` unless given here.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from cryptography import x509

from mor.v1 import federation_pb2 as pb
from privacy import pki

from .release import Release
from mor.wire import PB_TO_MODE

log = logging.getLogger("mor.client.secagg")


class SecAggSession:
    #: the policy knobs this session passes to ``SecAggClient`` (session value, else ``client.policy``'s, else default)
    KNOBS = {"max_weight": 1.0, "min_contributors": 2, "min_weight_fraction": 0.1, "min_weight_grid_steps": 16.0,
             "min_collusion_tolerance": 1}

    def __init__(self, credentials: pki.ClientCredentials, *, ledger=None, max_weight: float | None = None,
                 min_contributors: int | None = None, min_weight_fraction: float | None = None,
                 min_weight_grid_steps: float | None = None, min_collusion_tolerance: int | None = None,
                 query_audit=None):
        """query_audit: a ``privacy.secagg.query_audit.QueryAudit`` or a path for one; default: a file beside the
        ledger (``<ledger>.secagg-audit.sqlite``), or an in-memory one (this process only) when there is no
        ledger."""
        if credentials is None or credentials.identity_key_pem is None or credentials.identity_cert_pem is None:
            raise ValueError("secure aggregation needs the client's identity key and certificate (identity.key, "
                             "identity.crt in the credentials folder)")
        self.credentials = credentials
        self.ledger = ledger
        self.max_weight, self.min_contributors = max_weight, min_contributors
        self.min_weight_fraction, self.min_weight_grid_steps = min_weight_fraction, min_weight_grid_steps
        self.min_collusion_tolerance = min_collusion_tolerance
        self._query_audit = query_audit
        self._ca = x509.load_pem_x509_certificate(credentials.ca_pem)
        self._key = credentials.identity_key()
        if ledger is not None:  # secagg+dp: the accounting stack (opacus/torch) now, not on the loop in round 1;
            import privacy.ledger  # noqa: F401  plain secagg needs no ledger and runs on the base install
        self._rounds: dict[str, object] = {}
        self._modes: dict[str, str] = {}

    def knobs(self, client=None) -> dict:
        pol = getattr(client, "policy", None)
        out = {}
        for name, default in self.KNOBS.items():
            v = getattr(self, name)
            out[name] = v if v is not None else getattr(pol, name, default)
        return out

    @property
    def query_audit(self):
        """The query audit (opened on first use, so a ledger attached after construction is honoured)."""
        from privacy.secagg.query_audit import QueryAudit

        qa = self._query_audit
        if isinstance(qa, QueryAudit):
            return qa
        if qa is None:
            lp = getattr(self.ledger, "path", None)
            if lp is not None and str(lp) != ":memory:":
                qa = Path(lp).with_name(Path(lp).name + ".secagg-audit.sqlite")
            else:
                log.warning("secagg query audit kept in memory (no ledger): round-id reuse and differencing are "
                            "refused within this process only; give --ledger or --query-audit to persist it")
                qa = ":memory:"
        self._query_audit = QueryAudit(qa)
        return self._query_audit

    #: refuse a secagg task when no fresh CA-signed CRL is known (the server ships one with every secagg task)
    require_crl = True

    def accept_crl(self, data: bytes) -> None:
        """Adopt a CRL (PEM/DER bytes, e.g. ``task.crl``) after checking the CA's signature and its next_update.
        The newest one seen is kept, so a server replaying an older CRL cannot un-revoke a peer; a server can only
        withhold it (then ``require_crl`` refuses the task). Raises PKIError for a forged or stale CRL."""
        crl = pki.read_crl(data, self._ca).check_fresh(what="the CRL sent with the task")
        cur = getattr(self, "_crl", None)
        if cur is None or crl.last_update >= cur.last_update:
            self._crl = crl

    #: a ``privacy.membership.Membership`` (pinned membership CA + signed roster; set with :meth:`use_membership`) or
    #: None (single-CA pilot: the operator's CA certifies peers, so an operator keeping its key can mint sybils)
    membership = None

    def use_membership(self, membership) -> None:
        """Take part only in rounds whose every client is on ``membership``'s signed roster, and accept a peer only
        with a membership-CA certificate for the roster's key. Checks first that this client's own membership
        certificate certifies its identity key under its name (raises ``MembershipError`` otherwise)."""
        membership.check_separate_from(self._ca)
        self._membership_proof = membership.check_own(self._key, self.credentials.name)
        self.membership = membership

    @property
    def identity_proof(self) -> bytes:
        """What peers verify: the membership certificate when a membership is pinned, else the TLS-CA identity.crt."""
        return self._membership_proof if self.membership is not None else self.credentials.identity_cert_pem

    def verify_peer(self, client_id: str, proof: bytes):
        """A peer's identity certificate must be issued by the federation CA, valid now, name ``client_id`` and
        not be revoked by the newest fresh CRL this client has seen. With a pinned membership, instead: issued by
        the membership CA, for the key the signed roster lists under ``client_id``."""
        if self.membership is not None:  # the operator's TLS CA cannot admit a peer here
            return self.membership.verify_peer(client_id, proof)
        crl = getattr(self, "_crl", None)
        if crl is not None:
            crl.check_fresh(what="the newest CRL this client has")
        return pki.verify_identity_certificate(proof, self._ca, expected_name=client_id,
                                               revoked=crl.revoked if crl is not None else None)

    def cancel_round(self, round_id: str) -> None:
        """The server cancelled the round: forget its state (nothing more is sent for it)."""
        self._end(round_id)

    async def on_task(self, task: pb.ScoringTask, items, client, send_q: asyncio.Queue) -> None:
        from privacy.secagg import SecAggClient
        from privacy.secagg.query_audit import coordinate_digests

        mode = PB_TO_MODE.get(task.mode, "unspecified")
        if mode not in client.policy.supported_modes:
            self._refuse(client, send_q, task.round_id, mode, "FAILED_PRECONDITION",
                         f"mode {mode!r} is not enabled on this client")
            return
        if not task.HasField("secagg"):
            self._refuse(client, send_q, task.round_id, mode, "INVALID_ARGUMENT",
                         "secagg task carries no setup stage (task.secagg)")
            return
        try:
            if task.crl:
                self.accept_crl(task.crl)
            elif self.require_crl and getattr(self, "_crl", None) is None:
                raise pki.PKIError("the task carries no CRL, so peers' revocation cannot be checked")
        except pki.PKIError as e:
            self._refuse(client, send_q, task.round_id, mode, "FAILED_PRECONDITION", f"revocation check: {e}")
            return
        if self.membership is not None:  # every client of the round must be on the signed roster (no sybils)
            from privacy.membership import MembershipError
            from privacy.secagg import SecAggError
            from privacy.secagg.messages import SetupConfig

            try:
                cohort = SetupConfig.from_bytes(bytes(task.secagg.payload), round_id=task.round_id).client_ids
                self.membership.check_cohort(cohort)
            except (MembershipError, SecAggError) as e:
                self._refuse(client, send_q, task.round_id, mode, "PERMISSION_DENIED", f"membership: {e}")
                return
        timeout = task.timeout_ms / 1000 if task.timeout_ms else 30.0
        flat = await client.score_items(task.round_id, items, timeout)
        if isinstance(flat, Release):
            self._refuse(client, send_q, task.round_id, mode, flat.code, flat.reason)
            return
        sc = SecAggClient(task.round_id, client.client_id, identity_key=self._key, verify_peer=self.verify_peer,
                          identity_proof=self.identity_proof, **self.knobs(client),
                          ledger=self.ledger if mode == "secagg+dp" else None, query_audit=self.query_audit,
                          item_digests=coordinate_digests(items))
        sc.set_input(flat)
        self._rounds[task.round_id] = sc
        self._modes[task.round_id] = mode
        await self._step(client, send_q, task.secagg)

    async def on_stage(self, msg: pb.SecAggMessage, send_q: asyncio.Queue, client=None) -> None:
        if msg.round_id not in self._rounds:
            log.warning("ignoring secagg stage %s for unknown or finished round %s", msg.stage, msg.round_id)
            return
        await self._step(client, send_q, msg)

    async def _step(self, client, send_q, msg: pb.SecAggMessage) -> None:
        if self.ledger is not None:  # only secagg+dp charges a budget; plain secagg runs on the base install
            from privacy.ledger import BudgetExceeded
        else:
            BudgetExceeded = _NoBudget
        from privacy.secagg import STAGE_COLLECT_MASKED, InputOutOfRange, SecAggError, WeightIsolationError

        sc = self._rounds[msg.round_id]
        mode = self._modes[msg.round_id]
        try:
            stage, out = await asyncio.to_thread(sc.handle, msg.stage, bytes(msg.payload))
        except WeightIsolationError as e:
            self._end(msg.round_id)
            self._refuse(client, send_q, msg.round_id, mode, "PERMISSION_DENIED", f"isolating weights: {e}")
            return
        except BudgetExceeded as e:
            self._end(msg.round_id)
            self._refuse(client, send_q, msg.round_id, mode, "RESOURCE_EXHAUSTED", str(e),
                         getattr(e, "remaining_epsilon", float("nan")))
            return
        except InputOutOfRange as e:  # the reason goes to the server: never a score value or a count in it
            log.warning("round %s: %s", msg.round_id, e)
            self._end(msg.round_id)
            self._refuse(client, send_q, msg.round_id, mode, "OUT_OF_RANGE",
                         "a score lies outside the round's value_range (details in the client's log)")
            return
        except SecAggError as e:  # a lying server, a forged key, a replay: stop taking part
            self._end(msg.round_id)
            self._refuse(client, send_q, msg.round_id, mode, "ABORTED", f"secure aggregation aborted: {e}")
            return
        if stage == STAGE_COLLECT_MASKED and client is not None and client.audit is not None:
            charge = getattr(sc, "charge", None)  # the masked, weighted input leaves now: log it first
            client.audit.append("release", {"round_id": msg.round_id, "mode": mode, "masked": True,
                                            "released": sc.cfg.vector_length,
                                            "epsilon_total": None if charge is None else charge.epsilon_after})
        send_q.put_nowait(pb.ClientMessage(report=pb.ScoreReport(
            round_id=msg.round_id, secagg=pb.SecAggMessage(round_id=msg.round_id, stage=stage, payload=out))))
        if sc.done:
            self._end(msg.round_id)

    def _end(self, round_id: str) -> None:
        self._rounds.pop(round_id, None)
        self._modes.pop(round_id, None)

    def _refuse(self, client, send_q, round_id, mode, code, reason, remaining=float("nan")) -> None:
        rel = Release("refuse", code=code, reason=reason, remaining_epsilon=remaining)
        if client is not None:
            client.audit_release(round_id, mode, rel, n_items=0)
            send_q.put_nowait(client.release_message(round_id, rel))


class _NoBudget(Exception):
    """Stands in for ``privacy.ledger.BudgetExceeded`` without a ledger (never raised: nothing is charged)."""

