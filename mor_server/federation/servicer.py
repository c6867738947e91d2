"""The Federation service's handlers: Register, the Session stream, and what arrives on it.

Thin: the caller's identity and the bytes are handled by :class:`~.identity.IdentityInterceptor` before a handler
runs; reports are validated by the pure round book (:mod:`.rounds`, :mod:`mor_server.baselines.training_round`);
rounds are started by :class:`~.orchestrator.RoundOrchestrator`. Every client message is answered with an ``Ack``
carrying a gRPC status code and the offending field; a bad message never ends another client's round or the server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mor.modes import SECAGG_MODES
from mor.training import METHODS as _TRAINING_METHODS
from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from mor.wire import PROTOCOL_REVISION, card_from_pb, check_card_pb
from privacy import pki
from privacy.secagg.stages import STAGES as SECAGG_STAGES

from ..baselines.training_round import TrainingRound
from .identity import caller
from .registry import CardInvalid
from .rounds import PAYLOAD_FOR_MODE, ReportRejected, check_bound, stage_key, validate_scores

log = logging.getLogger("mor.server")


@dataclass
class _Conn:
    client_id: str
    session_id: str
    queue: asyncio.Queue
    serials: frozenset = frozenset()
    closed: bool = False
    ending: asyncio.Future | None = None
    end_status: tuple | None = None   # (grpc.StatusCode, details) the session ends with, if not OK
    revision: int = 1                 # the protocol revision negotiated in Welcome



class FederationServicer(pb_grpc.FederationServicer):
    """The handlers of :class:`~mor_server.federation.server.FederationServer` (its ``_conns`` session table,
    ``registry``, ``book`` and ``_pending`` rounds)."""

    # -- RPCs -------------------------------------------------------------------------------------------------------
    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        client_id, cert = caller()
        if not request.HasField("card"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "card is missing: send the reward model's card")
        problem = check_card_pb(request.card)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{problem[1]} (field {problem[0]})")
        card = card_from_pb(request.card)
        if any(m.startswith("unknown") for m in card["supported_modes"]) or pb.PRIVACY_MODE_UNSPECIFIED in \
                request.card.supported_modes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "card.supported_modes contains an unknown or unspecified mode")
        identity_key = None
        if request.identity_certificate:
            if self._ca_cert is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "identity_certificate cannot be checked: the server runs without a CA (insecure)")
            try:
                identity_key = pki.verify_identity_certificate(request.identity_certificate, self._ca_cert,
                                                               expected_name=client_id, revoked=self._revoked)
            except pki.PKIError as e:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"identity_certificate: {e}")
        for i, m in enumerate(request.training_methods):  # revision 3: what this client can train
            if m not in _TRAINING_METHODS:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"training_methods[{i}] is {m[:40]!r}; use one of {list(_TRAINING_METHODS)} "
                                    f"(docs/protocol.md §9) (field training_methods[{i}])")
        try:
            self.registry.register(client_id, card, self._clock(), identity_public_key=identity_key,
                                   identity_certificate=bytes(request.identity_certificate))
            self._training_methods[client_id] = tuple(dict.fromkeys(request.training_methods))
        except CardInvalid as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.metrics.clients_registered.set(len(self.registry.all()))
        if cert is not None and hasattr(self, "_expiry_gauge"):
            left = cert.not_valid_after_utc.timestamp() - time.time()
            self._expiry_gauge.labels(certificate=f"client:{client_id}").set(left)
            if left < 30 * 86400:
                log.warning("the TLS certificate of %s expires in %.1f days: renew it (`mor pki renew %s`)",
                            client_id, left / 86400, client_id)
        self._audit("registration", {"client_id": client_id, "card": card,
                                     "certificate": None if cert is None else {
                                         "subject": cert.subject.rfc4514_string(),
                                         "serial": format(cert.serial_number, "x"),
                                         "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex()},
                                     "identity_certificate": bool(request.identity_certificate)})
        await self._audit_flush()
        log.info("registered %s (%s, %d params, sdk %r)", client_id, card["architecture"], card["parameter_count"],
                 request.sdk_version[:100])
        return pb.RegisterResponse(client_id=client_id, federation_id=self.config.federation_id,
                                   max_items_per_task=self.config.max_items_per_task,
                                   max_message_bytes=self.config.max_message_bytes)

    async def Session(self, request_iterator, context):
        client_id, cert = caller()
        info = self.registry.get(client_id)
        if info is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"client {client_id!r} must call Register first")
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        if first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the first message of a session must be hello, got {first.WhichOneof('body')}")
        client_rev = first.hello.protocol_revision or 1
        if client_rev < self.config.min_protocol_revision:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"hello.protocol_revision is {client_rev} (unset means 1); this server requires mor.v1 "
                                f"protocol revision {self.config.min_protocol_revision}..{PROTOCOL_REVISION}: "
                                "upgrade the client (see docs/protocol.md, Versioning)")
        revision = min(client_rev, PROTOCOL_REVISION)
        serials = set() if cert is None else {cert.serial_number}
        if info.identity_certificate:
            try:
                serials.add(x509.load_pem_x509_certificate(info.identity_certificate).serial_number)
            except ValueError:
                pass
        conn = _Conn(client_id, secrets.token_hex(8), asyncio.Queue(maxsize=self.config.max_outbox),
                     frozenset(serials), ending=asyncio.get_running_loop().create_future())
        old_sid = self.registry.connect(client_id, conn.session_id, self._clock())
        old = self._conns.get(client_id)
        if old is not None:  # a reconnect replaces the previous session, which ends with ABORTED and a reason
            log.warning("session %s of %s replaced by a newer session %s", old.session_id, client_id,
                        conn.session_id)
            self._end_session(old, grpc.StatusCode.ABORTED,
                              f"replaced by a newer session ({conn.session_id}) of {client_id}: only one session per "
                              "identity; do not reconnect automatically (another process may hold this identity)",
                              "replaced by a new session")
        conn.revision = revision
        self._conns[client_id] = conn
        self._online_changed_set()
        log.info("session %s opened by %s%s", conn.session_id, client_id, f" (replacing {old_sid})" if old_sid else "")
        reader = asyncio.create_task(self._read_loop(conn, request_iterator))
        try:
            if await self._write(conn, context, pb.ServerMessage(
                    welcome=pb.Welcome(client_id=client_id, session_id=conn.session_id, protocol_revision=revision,
                                       min_protocol_revision=self.config.min_protocol_revision,
                                       max_protocol_revision=PROTOCOL_REVISION))):
                while not conn.closed:
                    try:
                        msg = conn.queue.get_nowait()
                    except asyncio.QueueEmpty:
                        get = asyncio.ensure_future(conn.queue.get())
                        try:
                            await asyncio.wait((get, conn.ending), return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            if not get.done():
                                get.cancel()
                        if not get.done() or get.cancelled():
                            break
                        msg = get.result()
                    if msg is None or not await self._write(conn, context, msg):
                        break
        finally:
            reader.cancel()
            conn.closed = True
            if self._conns.get(client_id) is conn:
                del self._conns[client_id]
                self._drop_client(client_id, "disconnected")
                self.registry.disconnect(client_id, conn.session_id, self._clock())
                self._online_changed_set()
            log.info("session %s of %s closed%s", conn.session_id, client_id,
                     f" ({conn.end_status[0].name}: {conn.end_status[1]})" if conn.end_status else "")
        if conn.end_status is not None:
            await context.abort(*conn.end_status)

    async def _write(self, conn: _Conn, context, msg: pb.ServerMessage) -> bool:
        """Send one message; False when the session is over (ended by the server, the client gone, or the client
        not reading within ``send_timeout_s``, which ends the session with RESOURCE_EXHAUSTED)."""
        w = asyncio.ensure_future(context.write(msg))
        try:
            done, _ = await asyncio.wait((w, conn.ending), timeout=self.config.send_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            w.cancel()
            raise
        if w not in done:
            w.cancel()
            if not conn.closed:
                self._end_session(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"client {conn.client_id} did not read its session stream for "
                                  f"{self.config.send_timeout_s:g} s; disconnected", "not reading its stream")
            return False
        try:
            w.result()
        except Exception:  # the client went away mid-write
            return False
        return True

    def _send_to(self, conn: _Conn, msg: pb.ServerMessage) -> bool:
        """Queue a message for one client; a client whose outbox is full is not reading: its session ends."""
        if conn.closed:
            return False
        try:
            conn.queue.put_nowait(msg)
            return True
        except asyncio.QueueFull:
            self.metrics.outbox_overflows.inc()
            self._end_session(conn, grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"client {conn.client_id} is not reading its session stream: "
                              f"{self.config.max_outbox} messages are waiting for it; disconnected",
                              "not reading its stream")
            return False

    def _close(self, conn: _Conn) -> None:
        """End a session normally (server stopping, replaced by a reconnect, the client half-closed)."""
        conn.closed = True
        if conn.ending is not None and not conn.ending.done():
            conn.ending.set_result(None)

    def _end_session(self, conn: _Conn, code: grpc.StatusCode, details: str, drop_reason: str) -> None:
        """End a session with a status (revoked, not reading, CRL unusable): the client is a dropout of every
        round in flight at once, and nothing it sends is processed any more."""
        if conn.closed:
            return
        conn.end_status = (code, details)
        self.metrics.sessions_ended.labels(code=code.name).inc()
        self._close(conn)
        if self._conns.get(conn.client_id) is conn:
            del self._conns[conn.client_id]
            self._drop_client(conn.client_id, drop_reason)
            self.registry.disconnect(conn.client_id, conn.session_id, self._clock())
            self._online_changed_set()

    def _online_changed_set(self) -> None:
        self.metrics.clients_online.set(len(self._conns))
        self._online_changed.set()
        self._online_changed = asyncio.Event()

    async def _read_loop(self, conn: _Conn, request_iterator) -> None:
        try:
            async for msg in request_iterator:
                if conn.closed:  # ended (e.g. revoked): nothing it sends counts any more
                    break
                self.registry.seen(conn.client_id, self._clock())
                try:
                    ack = self._on_message(conn, msg)
                except Exception as e:  # a bug or a message we did not foresee: one line, an Ack, go on
                    log.warning("could not handle a message from %s (%s: %s); answered INTERNAL", conn.client_id,
                                type(e).__name__, e)
                    ack = self._reject("", "INTERNAL", "", f"the server could not process this message "
                                                           f"({type(e).__name__}); it was ignored")
                if ack is not None:
                    if self._audit_last is not None:  # e.g. a refusal: logged durably before it is acknowledged
                        await self._audit_flush()
                    self._send_to(conn, pb.ServerMessage(ack=ack))
        except (asyncio.CancelledError, grpc.aio.AioRpcError, grpc.RpcError):
            pass
        except Exception as e:  # never let one client's stream take the server down
            log.warning("session of %s failed: %s: %s", conn.client_id, type(e).__name__, e)
        finally:
            self._close(conn)

    # -- message handling (validation; pure logic lives in rounds.py) ------------------------------------------------
    def _on_message(self, conn: _Conn, msg: pb.ClientMessage) -> pb.Ack | None:
        kind = msg.WhichOneof("body")
        if kind == "heartbeat":  # never acknowledged; echoed with the server's clock (revision 2)
            self._send_to(conn, pb.ServerMessage(heartbeat=pb.Heartbeat(unix_ms=int(time.time() * 1000))))
            return None
        if kind == "report":
            return self._on_report(conn.client_id, msg.report)
        if kind == "refusal":
            return self._on_refusal(conn.client_id, msg.refusal)
        return self._reject("", "INVALID_ARGUMENT", "body",
                            f"unexpected message {kind or '(empty)'} in an open session; send report, refusal or "
                            "heartbeat")

    def _reject(self, round_id: str, code: str, field_path: str, message: str) -> pb.Ack:
        self.metrics.reports_rejected.labels(code=code).inc()
        return pb.Ack(round_id=round_id, code=grpc.StatusCode[code].value[0], message=message, field=field_path)

    def _on_report(self, client_id: str, report: pb.ScoreReport) -> pb.Ack:
        try:
            kind = report.WhichOneof("payload")
            if kind == "secagg":
                return self._on_secagg_report(client_id, report)
            if kind == "update" or isinstance(self.book.open.get(report.round_id), TrainingRound):
                return self._on_update_report(client_id, report)
            rnd = self.book.lookup(report.round_id)
            pending = self._pending.get(rnd.round_id)
            if pending is None:
                raise ReportRejected("NOT_FOUND", "report.round_id", f"unknown round id {report.round_id!r}")
            if kind is None:
                raise ReportRejected("INVALID_ARGUMENT", "report.payload", "report.payload is empty: send scores")
            if pending.mode not in PAYLOAD_FOR_MODE:
                raise ReportRejected("INVALID_ARGUMENT", f"report.{kind}",
                                     f"{report.round_id!r} is a stage of a {pending.mode} round; send report.secagg "
                                     "with report.round_id set to the round id (without the stage)")
            if kind != PAYLOAD_FOR_MODE[pending.mode]:
                raise ReportRejected("INVALID_ARGUMENT", f"report.{kind}",
                                     f"round {rnd.round_id} runs in mode {pending.mode!r}; expected payload "
                                     f"report.{PAYLOAD_FOR_MODE[pending.mode]}, got report.{kind}")
            if kind == "plain":
                payload = validate_scores(report.plain.scores, rnd.expected, "report.plain.scores")
            else:  # dp
                payload = validate_scores(report.dp.scores, rnd.expected, "report.dp.scores")
            check_bound(payload, pending.score_bound, f"report.{kind}.scores")
            if kind == "dp":
                clip, nm = pending.dp
                if not math.isclose(report.dp.clip, clip) or not math.isclose(report.dp.noise_multiplier, nm):
                    raise ReportRejected("INVALID_ARGUMENT", "report.dp",
                                         f"report.dp used clip={report.dp.clip}, noise_multiplier="
                                         f"{report.dp.noise_multiplier}; the task asked for clip={clip}, "
                                         f"noise_multiplier={nm}")
                payload = {"scores": payload, "epsilon": report.dp.epsilon_charged}
            rnd.submit(client_id, payload, self._clock())
        except ReportRejected as e:
            return self._reject(report.round_id, e.code, e.field, e.message)
        pending.changed.set()
        return pb.Ack(round_id=report.round_id, code=0, message="accepted")

    def _on_secagg_report(self, client_id: str, report: pb.ScoreReport) -> pb.Ack:
        msg = report.secagg
        if msg.round_id != report.round_id:
            raise ReportRejected("INVALID_ARGUMENT", "report.secagg.round_id",
                                 f"report.secagg.round_id {msg.round_id!r} differs from report.round_id "
                                 f"{report.round_id!r}")
        if msg.stage not in SECAGG_STAGES:
            raise ReportRejected("INVALID_ARGUMENT", "report.secagg.stage",
                                 f"unknown secure-aggregation stage {msg.stage!r}; expected one of {SECAGG_STAGES}")
        key = stage_key(report.round_id, msg.stage)
        try:
            rnd = self.book.lookup(key)
        except ReportRejected as e:
            if e.code == "NOT_FOUND" and any(k.startswith(report.round_id + "/") for k in self.book.open):
                raise ReportRejected("FAILED_PRECONDITION", "report.secagg.stage",
                                     f"round {report.round_id} is not at stage {msg.stage!r} now") from None
            raise
        if rnd.mode not in SECAGG_MODES:
            raise ReportRejected("INVALID_ARGUMENT", "report.secagg", f"round {report.round_id} is not a secagg round")
        rnd.submit(client_id, bytes(msg.payload), self._clock())
        pending = self._pending.get(key)
        if pending is not None:
            pending.changed.set()
        return pb.Ack(round_id=report.round_id, code=0, message=f"stage {msg.stage} received")

    def _on_update_report(self, client_id: str, report: pb.ScoreReport) -> pb.Ack:
        """A ParameterUpdate for a training round (revision 3): validated against the broadcast shapes by the pure
        :class:`TrainingRound` (every problem names its field); raises ReportRejected."""
        rnd = self.book.lookup(report.round_id)
        kind = report.WhichOneof("payload")
        if not isinstance(rnd, TrainingRound):
            raise ReportRejected("INVALID_ARGUMENT", "report.update",
                                 f"round {rnd.round_id} is a {rnd.mode} scoring round; answer it with scores, not a "
                                 "parameter update")
        if kind != "update":
            raise ReportRejected("INVALID_ARGUMENT", f"report.{kind}" if kind else "report.payload",
                                 f"round {rnd.round_id} is a training round ({rnd.spec.method}); answer with "
                                 "report.update (a ParameterUpdate)")
        u = report.update
        rnd.submit_update(client_id, u.tensors, u.num_examples, u.epsilon_charged, u.train_loss, self._clock())
        pending = self._pending.get(rnd.round_id)
        if pending is not None:
            pending.changed.set()
        return pb.Ack(round_id=report.round_id, code=0, message="update accepted")

    def _on_refusal(self, client_id: str, refusal: pb.Refusal) -> pb.Ack:
        refused_keys = [k for k in self.book.open if k.startswith(refusal.round_id + "/")]
        if refused_keys:  # a refusal during a secure-aggregation round drops the client from the current stage
            refusal = pb.Refusal(round_id=refused_keys[0], reason=refusal.reason, code=refusal.code,
                                 remaining_epsilon=refusal.remaining_epsilon)
        try:
            rnd = self.book.lookup(refusal.round_id)
        except ReportRejected as e:
            return self._reject(refusal.round_id, e.code, "refusal.round_id", e.message)
        reason = refusal.reason[:500] or "no reason given"
        if rnd.drop(client_id, f"refused: {reason}"):
            self.metrics.refusals.inc()
            info = self.registry.get(client_id)
            if info:
                info.refusals += 1
            self._audit("refusal", {"round_id": rnd.round_id.split("/")[0], "client_id": client_id, "reason": reason,
                                    "code": refusal.code, "remaining_epsilon": refusal.remaining_epsilon})
            pending = self._pending.get(rnd.round_id)
            if pending is not None:
                pending.changed.set()
        return pb.Ack(round_id=refusal.round_id.split("/")[0], code=0, message="refusal recorded")

    def _drop_client(self, client_id: str, reason: str) -> None:
        for rnd in self.book.drop_everywhere(client_id, reason):
            pending = self._pending.get(rnd.round_id)
            if pending is not None:
                pending.changed.set()

