"""The federation server: a thin grpc.aio servicer over the pure registry and round book.

Clients dial out, call ``Register`` and keep one ``Session`` stream open; the server pushes scoring tasks over it.
Identity is the Common Name of the client's mTLS certificate (checked against the federation CA by TLS and against
the CRL here); nothing a client says can change it. Every client message is validated and answered with an ``Ack``
carrying a gRPC status code and the offending field; a bad message never ends another client's round or the server.

Use it from asyncio (``await server.start()``, ``await server.run_round(...)``) or from synchronous code through
:class:`ServerThread`, which runs the server's event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import hashlib
import itertools
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import grpc
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as _reflection_pb2

from mor.modes import SECAGG_MODES
from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from mor.training import METHODS as _TRAINING_METHODS
from mor.types import ScoringItem
from mor.wire import (MIN_PROTOCOL_REVISION, PROTOCOL_REVISION, SDK_VERSION, card_from_pb, check_card_pb,
                             expected_scores, items_to_pb, mode_to_pb, unflatten)
from privacy import pki
# imported here, never inside a round: the first SecAgg round must not pay the import on the event loop
from privacy.secagg import STAGES as _SECAGG_STAGES  # noqa: F401

from ..baselines.training_round import TrainingRound, TrainingSpec
from .metrics import FederationMetrics
from .registry import CardInvalid, ClientRegistry
from .rounds import ReportRejected, Round, RoundBook, RoundCancelled, RoundOutcome, RoundState, validate_scores

log = logging.getLogger("mor.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Federation"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
"""grpcio-reflection (1.85) registers only ``grpc.reflection.v1alpha``; ``v1`` has the same messages on the wire,
so the same servicer answers both (tools such as grpcurl and Postman try v1 first)."""
DP_SCORE_SIGMAS = 20.0
"""A dp report's scores must lie within clip + 20 sigma (P(|N_Z(0, sigma^2)| > 20 sigma) < 1e-88)."""
MiB = 1 << 20
AUDIT_MAX_INLINE = 64 * 1024
"""The server's audit entries hold no scores, only ids, counts and digests: keep them inline up to 64 KiB (the
default 2 KiB elided a whole round entry, round id included, once a round had ~150 participants)."""


@dataclass
class ServerConfig:
    """Settings of a federation server. Every field has a safe default for a loopback pilot."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 0
    """TCP port; 0 picks a free port (read it from ``FederationServer.port`` after start)."""
    pki_dir: Path | None = None
    """Folder made by ``mor pki init``; required unless ``insecure``."""
    insecure: bool = False
    """Serve without TLS. Only for local debugging: identities are then taken on trust from metadata."""
    max_message_bytes: int = 16 * MiB
    """Largest message accepted or sent; larger ones are refused with RESOURCE_EXHAUSTED."""
    max_items_per_task: int = 1024
    """Largest number of items in one scoring task."""
    max_candidates_per_item: int = 64
    """Largest number of candidate answers per item."""
    metrics_port: int | None = None
    """Port of the Prometheus /metrics endpoint; None disables it, 0 picks a free port."""
    federation_id: str = "mor-federation"
    """Name of this federation, echoed to clients on registration."""
    keepalive_s: float = 10.0
    """HTTP/2 keepalive ping interval, so dead connections are detected and counted as dropouts."""
    deadline_grace_s: float = 0.5
    """Extra time the server waits past a task's timeout for reports in flight."""
    audit_path: Path | None = None
    """Where the server's signed, hash-chained audit log is written (JSON Lines); signed with the server's identity
    key from ``pki_dir/server/identity.key``. None disables auditing (not recommended outside tests)."""
    audit: object | None = None
    """An already open audit log (``privacy.audit.AuditLog``); takes precedence over ``audit_path``."""
    crl_check_interval_s: float = 2.0
    """How often the server re-reads its CRL (``pki/server/crl.pem``, checked by file signature and next_update).
    A revocation reaches open sessions within this interval: they end with PERMISSION_DENIED and the client is a
    dropout of every round in flight. A CRL whose next_update has passed is not trusted: every client is refused
    (UNAVAILABLE) until the CA re-signs it (``mor pki crl-refresh``)."""
    max_outbox: int = 1024
    """Messages (tasks, acks, stages) that may wait for one client to read them. A client that lets more pile up is
    not reading its stream: its session ends with RESOURCE_EXHAUSTED."""
    send_timeout_s: float = 30.0
    """Longest time one message may wait for the client's HTTP/2 window; past it the session ends with
    RESOURCE_EXHAUSTED (the client is not reading)."""
    max_abs_score: float = 1000.0
    """Declared range of plain-mode scores, sent as ``ScoringTask.score_bound``: a plain report with a score s,
    |s| > max_abs_score, is rejected with INVALID_ARGUMENT naming the field (so one client cannot outweigh all
    others with 1e300). Dp tasks declare clip + 20 sigma instead."""
    min_protocol_revision: int = MIN_PROTOCOL_REVISION
    """Oldest ``Hello.protocol_revision`` accepted (unset = 1); older clients get FAILED_PRECONDITION."""
    health_port: int | None = None
    """Port of a separate PLAINTEXT endpoint serving only ``grpc.health.v1.Health`` (for load balancers and
    Kubernetes probes, which have no client certificate). None (default) disables it; 0 picks a free port."""
    health_host: str | None = None
    """Address of the health endpoint; None uses ``host``."""


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


@dataclass
class _Pending:
    round: Round
    items: list
    changed: asyncio.Event
    mode: str
    dp: tuple[float, float] | None = None
    task_digest: str = ""
    score_bound: float = math.inf


class FederationServer(pb_grpc.FederationServicer):
    def __init__(self, config: ServerConfig | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.config = config or ServerConfig()
        self.metrics = FederationMetrics()
        self.registry = ClientRegistry()
        self.book = RoundBook()
        self._clock = clock
        self._conns: dict[str, _Conn] = {}
        self._pending: dict[str, _Pending] = {}
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._round_seq = itertools.count(1)
        self._ca_cert: x509.Certificate | None = None
        self._crl_path: Path | None = None
        self._crl: pki.CRL | None = None
        self._crl_sig: tuple | None = None
        self._crl_problem: str | None = None
        self._crl_task: asyncio.Task | None = None
        self._revoked: dict[int, _dt.datetime] = {}
        self._metrics_http = None
        self._online_changed = asyncio.Event()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self._owns_audit = False
        self._audit_exec: concurrent.futures.ThreadPoolExecutor | None = None
        self._audit_last: concurrent.futures.Future | None = None
        self._training_methods: dict[str, tuple[str, ...]] = {}  # RegisterRequest.training_methods (revision 3)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def start(self) -> int:
        cfg = self.config
        opts = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.keepalive_time_ms", int(cfg.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(cfg.keepalive_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        self._server = grpc.aio.server(options=opts)
        pb_grpc.add_FederationServicer_to_server(self, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME,
                 REFLECTION_V1)
        reflection.enable_server_reflection(names, self._server)
        refl = reflection.ReflectionServicer(names)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                refl.ServerReflectionInfo,
                request_deserializer=_reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=_reflection_pb2.ServerReflectionResponse.SerializeToString)}),))
        addr = f"{cfg.host}:{cfg.port}"
        if cfg.insecure:
            log.warning("!!! INSECURE MODE: serving WITHOUT TLS; client identities are NOT authenticated. "
                        "Never use this outside a local debugging session. !!!")
            self.port = self._server.add_insecure_port(addr)
        else:
            if cfg.pki_dir is None:
                raise ValueError("ServerConfig.pki_dir is required for mTLS (run `mor pki init --pki PKI`), "
                                 "or set insecure=True for local debugging only")
            creds = pki.ServerCredentials.from_dir(cfg.pki_dir)
            self._ca_cert = creds.ca_cert
            self._crl_path = creds.crl_path or pki.crl_path(cfg.pki_dir)
            self._check_crl()
            # dynamic: a rotated server.key + server.crt (`mor pki renew-server`) is used from the next TLS
            # handshake on, without a restart; open sessions keep their connection
            self._tls_files = (Path(cfg.pki_dir) / "server" / "server.key", Path(cfg.pki_dir) / "server" / "server.crt")
            self._tls_sig = self._file_sig()
            self._note_expiry(creds.cert_pem, creds.ca_pem)
            server_creds = grpc.dynamic_ssl_server_credentials(
                grpc.ssl_server_certificate_configuration([(creds.key_pem, creds.cert_pem)],
                                                          root_certificates=creds.ca_pem),
                self._fetch_tls_config, require_client_authentication=True)
            self._tls_ca_pem = creds.ca_pem
            self.port = self._server.add_secure_port(addr, server_creds)
        if not self.port:
            raise OSError(f"could not bind {addr}")
        if cfg.audit is None and cfg.audit_path is not None:
            if cfg.pki_dir is None:
                raise ValueError("audit_path needs pki_dir: the audit log is signed with the server's identity key")
            from privacy.audit import AuditLog

            cfg.audit = AuditLog(cfg.audit_path, signing_key=pki.load_identity_key(
                Path(cfg.pki_dir) / "server" / "identity.key"), actor="server", max_inline=AUDIT_MAX_INLINE)
            self._owns_audit = True
        if cfg.health_port is not None:  # plaintext, health only: nothing else is reachable without mTLS there
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            haddr = f"{cfg.health_host or cfg.host}:{cfg.health_port}"
            self.health_port = self._health_server.add_insecure_port(haddr)
            if not self.health_port:
                raise OSError(f"could not bind the health port {haddr}")
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
            log.info("plaintext health endpoint (grpc.health.v1 only) on %s:%d", cfg.health_host or cfg.host,
                     self.health_port)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            self._metrics_http, _ = self.metrics.serve(cfg.metrics_port, cfg.host if cfg.host != "0.0.0.0" else "")
            self.metrics_port = self._metrics_http.server_port
        if self._crl_path is not None:
            self._crl_task = asyncio.create_task(self._crl_watch(), name="mor-crl-watch")
        self._audit("config", {"federation_id": cfg.federation_id, "port": self.port, "insecure": cfg.insecure,
                               "max_message_bytes": cfg.max_message_bytes})
        await self._audit_flush()
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        if self._crl_task is not None:
            self._crl_task.cancel()
            self._crl_task = None
        for conn in list(self._conns.values()):
            self._close(conn)
        await self._server.stop(grace)
        self._server = None
        if self._health_server is not None:
            await self._health_server.stop(grace)
            self._health_server = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._audit_exec is not None:
            self._audit_exec.shutdown(wait=True)
            self._audit_exec, self._audit_last = None, None
        if self._owns_audit and self.config.audit is not None:
            self.config.audit.close()
            self.config.audit = None

    def _audit(self, event: str, payload: dict) -> None:
        """Log an event durably (AuditLog.append signs and fsyncs, 3-9 ms measured on the 2-core machine) on the
        audit writer thread, in order, off the event loop; whoever acknowledges the action it records first awaits
        :meth:`_audit_flush` (a refusal's Ack, a round's outcome, a registration's response)."""
        if self.config.audit is not None:
            if self._audit_exec is None:
                self._audit_exec = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mor-audit")
            self._audit_last = self._audit_exec.submit(self.config.audit.append, event, _jsonable(payload))

    async def _audit_flush(self) -> None:
        """Wait until every audit entry submitted so far is on disk (raises the writer's error, if any)."""
        last = self._audit_last
        if last is not None:
            if not last.done():
                await asyncio.wrap_future(last)
            if self._audit_last is last:
                self._audit_last = None
            last.result()

    # -- server certificate rotation and expiry ---------------------------------------------------------------------
    _tls_files: tuple = ()
    _tls_sig = None
    _tls_ca_pem = b""

    def _file_sig(self):
        sig = []
        for f in self._tls_files:
            try:
                st = os.stat(f)
                sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                sig.append(None)
        return tuple(sig)

    def _fetch_tls_config(self):
        """Called by gRPC (on its own thread) before each TLS handshake: a new config when the files changed and
        hold a matching key and certificate, else None (keep the current one)."""
        try:
            sig = self._file_sig()
            if sig == self._tls_sig:
                return None
            key_pem, cert_pem = (f.read_bytes() for f in self._tls_files)
            if not pki.key_matches_cert(key_pem, cert_pem):
                return None  # mid-rotation (key written, certificate not yet): keep the current pair
            self._tls_sig = sig
            self._note_expiry(cert_pem, self._tls_ca_pem)
            log.warning("server TLS certificate rotated: now serving %s", self._tls_files[1])
            return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)],
                                                             root_certificates=self._tls_ca_pem)
        except Exception as e:  # never break handshakes over a rotation problem
            log.error("server TLS certificate rotation failed (%s: %s); keeping the current certificate",
                      type(e).__name__, e)
            return None

    def _note_expiry(self, cert_pem: bytes, ca_pem: bytes) -> None:
        """``mor_certificate_expiry_seconds{certificate=server_tls|ca}``; a WARNING when under 30 days are left."""
        self._expiry_gauge = self.metrics.certificate_expiry  # set: this server checks certificates (mTLS)
        now = time.time()
        for label, pem in (("server_tls", cert_pem), ("ca", ca_pem)):
            left = x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp() - now
            self._expiry_gauge.labels(certificate=label).set(left)
            if left < 30 * 86400:
                log.warning("the %s certificate expires in %.1f days: renew it (`mor pki renew-server`, or "
                            "a new CA with `pki init --force` for the CA)", label, left / 86400)

    # -- identity ---------------------------------------------------------------------------------------------------
    def _check_crl(self) -> None:
        """Re-read the CRL if its file changed and check that it is still fresh (cheap: one stat when unchanged).
        On a problem (missing, bad signature, next_update passed) the server fails closed: every session ends with
        UNAVAILABLE and new RPCs are refused until the CA publishes a good CRL. On a new CRL, sessions of revoked
        clients end with PERMISSION_DENIED."""
        if self._crl_path is None:
            return
        changed = False
        try:
            st = os.stat(self._crl_path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            if sig != self._crl_sig:
                self._crl = pki.read_crl(self._crl_path, self._ca_cert)
                self._crl_sig, changed = sig, True
                self.metrics.crl_reloads.inc()
            self._crl.check_fresh(what=f"the server's CRL {self._crl_path}")
            problem = None
        except FileNotFoundError:
            problem = (f"the server's CRL {self._crl_path} is missing; publish one with `mor pki crl-refresh "
                       "--pki PKI`")
        except pki.PKIError as e:
            problem = str(e)
        if problem is not None:
            if problem != self._crl_problem:
                log.error("revocation cannot be checked, refusing every client: %s", problem)
            self._crl_problem = problem
            self.metrics.crl_usable.set(0)
            for conn in list(self._conns.values()):
                self._end_session(conn, grpc.StatusCode.UNAVAILABLE,
                                  f"the federation server cannot check revocation: {problem}", "revocation unchecked")
            return
        if self._crl_problem is not None:
            log.warning("CRL %s is usable again; accepting clients", self._crl_path)
        self._crl_problem = None
        self.metrics.crl_usable.set(1)
        self.metrics.crl_next_update.set(self._crl.next_update.timestamp())
        self._revoked = self._crl.revoked
        if changed:
            for conn in list(self._conns.values()):
                hit = sorted(conn.serials & self._revoked.keys())
                if hit:
                    when = self._revoked[hit[0]]
                    self.metrics.sessions_revoked.inc()
                    log.warning("certificate of %s was revoked (serial %x): ending its session", conn.client_id, hit[0])
                    self._end_session(conn, grpc.StatusCode.PERMISSION_DENIED,
                                      f"client certificate of {conn.client_id} (serial {hit[0]:x}) was revoked on "
                                      f"{when:%Y-%m-%d %H:%M}Z; session ended", "revoked")

    async def _crl_watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.crl_check_interval_s)
            try:
                self._check_crl()
            except Exception as e:  # never let the watcher die silently
                log.error("CRL check failed: %s: %s", type(e).__name__, e)

    async def _identify(self, context) -> str:
        return (await self._identify_cert(context))[0]

    async def _identify_cert(self, context) -> tuple[str, x509.Certificate | None]:
        if self.config.insecure:
            md = dict(context.invocation_metadata() or ())
            cid = md.get("x-mor-client-id", "")
            if not cid:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "insecure mode: send metadata x-mor-client-id (no TLS identity available)")
            return cid, None
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert")
        if not pems:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate: mTLS is required")
        cert = x509.load_pem_x509_certificate(pems[0])
        self._check_crl()
        if self._crl_problem is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the federation server cannot check revocation now: {self._crl_problem}")
        if cert.serial_number in self._revoked:
            when = self._revoked[cert.serial_number]
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"client certificate (serial {cert.serial_number:x}) was revoked on {when:%Y-%m-%d %H:%M}Z")
        try:
            return pki.common_name(cert), cert
        except pki.PKIError as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))

    # -- RPCs -------------------------------------------------------------------------------------------------------
    async def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        client_id, cert = await self._identify_cert(context)
        self.metrics.bytes_in.inc(request.ByteSize())
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
        resp = pb.RegisterResponse(client_id=client_id, federation_id=self.config.federation_id,
                                   max_items_per_task=self.config.max_items_per_task,
                                   max_message_bytes=self.config.max_message_bytes)
        self.metrics.bytes_out.inc(resp.ByteSize())
        return resp

    async def Session(self, request_iterator, context):
        client_id, cert = await self._identify_cert(context)
        info = self.registry.get(client_id)
        if info is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"client {client_id!r} must call Register first")
        try:
            first = await request_iterator.__anext__()
        except StopAsyncIteration:
            return
        self.metrics.bytes_in.inc(first.ByteSize())
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
        self.metrics.bytes_out.inc(msg.ByteSize())
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
                self.metrics.bytes_in.inc(msg.ByteSize())
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
            if pending.mode not in _PAYLOAD_FOR_MODE:
                raise ReportRejected("INVALID_ARGUMENT", f"report.{kind}",
                                     f"{report.round_id!r} is a stage of a {pending.mode} round; send report.secagg "
                                     "with report.round_id set to the round id (without the stage)")
            if kind != _PAYLOAD_FOR_MODE[pending.mode]:
                raise ReportRejected("INVALID_ARGUMENT", f"report.{kind}",
                                     f"round {rnd.round_id} runs in mode {pending.mode!r}; expected payload "
                                     f"report.{_PAYLOAD_FOR_MODE[pending.mode]}, got report.{kind}")
            if kind == "plain":
                payload = validate_scores(report.plain.scores, rnd.expected, "report.plain.scores")
            else:  # dp
                payload = validate_scores(report.dp.scores, rnd.expected, "report.dp.scores")
            _check_bound(payload, pending.score_bound, f"report.{kind}.scores")
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
        key = _stage_key(report.round_id, msg.stage)
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

    # -- rounds -----------------------------------------------------------------------------------------------------
    def online_clients(self, mode: str | None = None) -> list[str]:
        return [c for c in self.registry.online(mode) if c in self._conns]

    async def wait_for_clients(self, n: int, timeout: float = 30.0, mode: str | None = None) -> list[str]:
        """Wait until at least ``n`` clients are online (supporting ``mode``); raises TimeoutError naming who is."""
        end = self._clock() + timeout
        while len(self.online_clients(mode)) < n:
            remaining = end - self._clock()
            if remaining <= 0:
                raise TimeoutError(f"only {len(self.online_clients(mode))} of {n} clients online after {timeout:.0f} "
                                   f"s: {self.online_clients(mode)}")
            ev = self._online_changed
            try:
                await asyncio.wait_for(ev.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        return self.online_clients(mode)

    def new_round_id(self) -> str:
        return f"r{next(self._round_seq):06d}-{secrets.token_hex(4)}"

    async def run_round(self, items: Sequence[ScoringItem], *, participants: Sequence[str] | None = None,
                        mode: str = "plain", min_clients: int | None = None, timeout: float = 30.0,
                        dp_clip: float = 1.0, dp_noise_multiplier: float = 1.0,
                        round_id: str | None = None) -> RoundOutcome:
        """Send one scoring task and gather reports. Never raises for client behaviour: a failed round comes back as
        a RoundOutcome with state FAILED and a reason. For ``plain``, ``reports[c]`` is the flat score list; use
        :meth:`scores_by_client` for per-item lists."""
        if mode not in _PAYLOAD_FOR_MODE:
            raise ValueError(f"run_round supports modes {sorted(_PAYLOAD_FOR_MODE)}; got {mode!r} "
                             "(secure aggregation runs through run_secagg_round)")
        self._check_items(items)
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        round_id = round_id or self.new_round_id()
        now = self._clock()
        chosen = tuple(participants) if participants is not None else tuple(self.online_clients(mode))
        min_clients = len(chosen) if min_clients is None else min_clients
        self.metrics.rounds_started.labels(mode=mode).inc()
        if len(chosen) < max(min_clients, 1):
            return self._fail_early(round_id, mode, chosen, now,
                                    f"{len(chosen)} clients online for mode {mode!r}, min_clients={min_clients}")
        rnd = Round(round_id, chosen, min_clients, now + timeout + self.config.deadline_grace_s, now,
                    expected_scores(items), mode)
        pending = _Pending(rnd, list(items), asyncio.Event(), mode,
                           (dp_clip, dp_noise_multiplier) if mode == "dp" else None)
        pending.score_bound = (dp_score_bound(dp_clip, dp_noise_multiplier, expected_scores(items)) if mode == "dp"
                               else float(self.config.max_abs_score))
        task = pb.ScoringTask(round_id=round_id, items=items_to_pb(items), timeout_ms=int(timeout * 1000),
                              mode=mode_to_pb(mode), score_bound=pending.score_bound)
        if mode == "dp":
            task.dp.CopyFrom(pb.DpParams(clip=dp_clip, noise_multiplier=dp_noise_multiplier))
        pending.task_digest = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        msg = pb.ServerMessage(task=task)
        try:
            outcome = await self._gather(rnd, pending, {c: msg for c in chosen})
        except asyncio.CancelledError:
            self._on_cancelled(rnd.outcome, mode, task_digest=pending.task_digest)
            raise
        self._account(outcome, mode, task_digest=pending.task_digest,
                      extra={"dp": {"clip": dp_clip, "noise_multiplier": dp_noise_multiplier}} if mode == "dp" else None)
        await self._audit_flush()
        return outcome

    async def _gather(self, rnd: Round, pending: _Pending, sends: dict[str, pb.ServerMessage]) -> RoundOutcome:
        """Send each participant its message and wait until all answered or dropped, or the deadline."""
        key = rnd.round_id
        self.book.add(rnd)
        self._pending[key] = pending
        for c in rnd.participants:
            conn = self._conns.get(c)
            if conn is None or conn.closed or c not in sends:
                rnd.drop(c, "not connected")
            elif not self._send_to(conn, sends[c]):
                rnd.drop(c, "not reading its stream")
        try:
            while not rnd.settled:
                remaining = rnd.deadline - self._clock()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(pending.changed.wait(), remaining)
                except asyncio.TimeoutError:
                    break
                pending.changed.clear()
        except asyncio.CancelledError as e:
            rnd.cancel(self._clock(), _cancel_reason(e))
            raise
        finally:
            outcome = self.book.finish(key, self._clock())
            del self._pending[key]
        return outcome

    async def _secagg_stages(self, sa, round_id: str, chosen: Sequence[str], alive: list[str], task, task_field: str,
                             *, timeout: float, stage_timeout: float, label_mode: str, dropped: dict[str, str]) -> str:
        """Drive a SecAgg+ round's stages over the sessions (the one stage loop of every secure round: scoring and
        training). The first stage's payloads ride in a copy of ``task`` (sent as ``ServerMessage.<task_field>``),
        every later stage in a SecAggMessage; each stage waits for its participants until its deadline (the first
        ``timeout``, the others ``stage_timeout``) and its survivors feed the next. Unmasking runs off the event
        loop. Fills ``dropped`` as clients drop; returns the abort reason ("" when the stages ran to the end).
        CancelledError propagates (the caller records the cancelled round)."""
        from privacy.secagg import STAGES, SecAggAbort

        steps = sa.stage_steps()  # one per stage after setup, then finish
        out = sa.setup()
        try:
            for i, stage in enumerate(STAGES):
                limit = timeout if i == 0 else stage_timeout
                if i == 0:
                    sends = {}
                    for c, payload in out.items():
                        t = type(task)()
                        t.CopyFrom(task)
                        t.secagg.CopyFrom(pb.SecAggMessage(round_id=round_id, stage=stage, payload=payload))
                        sends[c] = pb.ServerMessage(**{task_field: t})
                else:
                    sends = {c: pb.ServerMessage(secagg=pb.SecAggMessage(round_id=round_id, stage=stage,
                                                                          payload=payload))
                             for c, payload in out.items()}
                targets = tuple(c for c in alive if c in sends)
                rnd = Round(_stage_key(round_id, stage), targets or tuple(alive[:1]) or tuple(chosen[:1]), 1,
                            self._clock() + limit + self.config.deadline_grace_s, self._clock(), 0, label_mode)
                if not targets:
                    raise SecAggAbort(f"no client left at stage {stage}")
                o = await self._gather(rnd, _Pending(rnd, [], asyncio.Event(), label_mode), sends)
                for c, why in o.dropped.items():
                    dropped.setdefault(c, f"{why} (stage {stage})")
                alive = list(o.responders)
                # unmasking is CPU work: off the event loop, so other rounds and sessions keep their deadlines
                res = await asyncio.to_thread(steps[i], {c: o.reports[c] for c in o.responders})
                out = res if isinstance(res, dict) else {}
        except SecAggAbort as e:
            return f"secure aggregation aborted: {e}"
        return ""

    async def run_secagg_round(self, items: Sequence[ScoringItem], *, weights: dict[str, Sequence[float]],
                               mode: str = "secagg", participants: Sequence[str] | None = None,
                               min_clients: int | None = None, timeout: float = 30.0, value_range: float = 16.0,
                               weight_cap: float = 1.0, frac_bits: int = 16, out_of_range: str = "clip",
                               dp_noise_multiplier: float = 1.0, dp_min_survivors: int | None = None,
                               stage_timeout: float | None = None, round_id: str | None = None,
                               max_colluders: int | None = None) -> RoundOutcome:
        """One SecAgg+ round: every client multiplies its scores by its routing weight (one weight per item) and
        masks them; the server unmasks only the weighted sum ``reports["sum"]`` (flat, item-major). The server
        never holds an individual client's score. ``mode="secagg+dp"`` adds distributed discrete-Gaussian noise
        calibrated to ``dp_min_survivors`` (default: the threshold) and charged to each client's ledger.

        ``timeout`` bounds the first stage (scoring + key advertisement); later stages get ``stage_timeout``
        (default: min(timeout, 10 s)). A silent client is a dropout, not a stall. ``max_colluders``: the colluding
        clients per neighbourhood the round tolerates (default: privacy.secagg.graph.default_colluders); clients
        refuse a round below their own minimum."""
        from privacy.secagg import SecAggServer
        from privacy.secagg import ddp

        if mode not in SECAGG_MODES:
            raise ValueError(f"run_secagg_round runs secagg or secagg+dp, got {mode!r}")
        self._check_items(items)
        round_id = round_id or self.new_round_id()
        now = self._clock()
        chosen = tuple(sorted(participants if participants is not None else self.online_clients(mode)))
        self.metrics.rounds_started.labels(mode=mode).inc()
        if not chosen:
            return self._fail_early(round_id, mode, chosen, now, f"no client online supports mode {mode!r}")
        missing = [c for c in chosen if c not in weights]
        if missing:
            raise ValueError(f"weights has no entry for participants {missing}")
        sizes = [len(it.candidates) for it in items]
        m = sum(sizes)
        W = np.stack([np.repeat(np.asarray(weights[c], dtype=np.float64), sizes) for c in chosen]) if chosen else None
        if W is not None and W.shape[1] != m:
            raise ValueError(f"each weights entry needs one weight per item ({len(items)})")
        wdigest = hashlib.sha256(np.ascontiguousarray(W).tobytes() if W is not None else b"").hexdigest()
        try:
            kw = {}
            if mode == "secagg+dp":
                surv = dp_min_survivors or max(2, (len(chosen) + 1) // 2)
                kw = dict(dp_sigma=ddp.calibrate_sigma(dp_noise_multiplier, value_range=value_range,
                                                       weight_cap=weight_cap, frac_bits=frac_bits, m=m,
                                                       min_survivors=surv), dp_min_survivors=surv)
            sa = SecAggServer(round_id, chosen, vector_length=m, weights=W, value_range=value_range,
                              weight_cap=weight_cap, frac_bits=frac_bits, out_of_range=out_of_range,
                              max_colluders=max_colluders, **kw)
        except Exception as e:  # e.g. too few clients for a threshold, weights above the cap
            return self._fail_early(round_id, mode, chosen, now, f"secure aggregation could not start: {e}")
        threshold = sa.threshold
        min_clients = max(threshold, min_clients or threshold)
        if len(chosen) < min_clients:
            return self._fail_early(round_id, mode, chosen, now,
                                    f"{len(chosen)} clients online for {mode}; SecAgg+ needs at least {min_clients}")
        stage_timeout = stage_timeout or min(timeout, 10.0)
        dropped: dict[str, str] = {}
        task = pb.ScoringTask(round_id=round_id, items=items_to_pb(items), timeout_ms=int(timeout * 1000),
                              mode=mode_to_pb(mode), crl=self._crl.pem if self._crl else b"")
        task_digest = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        try:
            reason = await self._secagg_stages(sa, round_id, chosen, list(chosen), task, "task", timeout=timeout,
                                               stage_timeout=stage_timeout, label_mode=mode, dropped=dropped)
        except asyncio.CancelledError as e:  # abandoned by its caller: record it, tell the clients, stop
            self._on_cancelled(RoundOutcome(round_id, RoundState.FAILED, chosen, (), dropped, {}, _cancel_reason(e),
                                            now, self._clock()), mode, task_digest=task_digest,
                               extra={"weights_digest": wdigest, "threshold": threshold})
            raise
        result = sa.result()
        end = self._clock()
        for c, stage in result.dropped.items():
            dropped.setdefault(c, f"dropped at stage {stage}" + (f": {sa.rejected[c]}" if c in sa.rejected else ""))
        ok = result.ok and len(result.survivors) >= min_clients
        if result.ok and not ok:
            reason = f"only {len(result.survivors)} survivors, min_clients={min_clients}"
        reports = {"sum": result.total.tolist(), "survivors": list(result.survivors),
                   "out_of_range": result.out_of_range} if ok else {}
        outcome = RoundOutcome(round_id, RoundState.COMPLETED if ok else RoundState.FAILED, chosen,
                               tuple(result.survivors) if ok else (), dropped, reports,
                               reason or ("" if ok else result.reason), now, end)
        agg = {}
        if ok:
            total = np.asarray(result.total)
            agg = {"n": int(total.size), "mean": float(total.mean()), "std": float(total.std()),
                   "out_of_range_clipped": result.out_of_range}  # total only (masked); None in secagg+dp
        self._account(outcome, mode, task_digest=task_digest,
                      extra={"weights_digest": wdigest, "aggregate": agg, "threshold": threshold,
                             "max_colluders": sa.max_colluders,
                             "secagg_config_digest": sa.config_digest(), "rejected": dict(sa.rejected)})
        await self._audit_flush()
        return outcome

    # -- training rounds of the parameter-sharing baselines (protocol revision 3, docs/protocol.md §9) ----------
    def online_trainers(self, method: str) -> list[str]:
        """Online clients that announced ``method`` in RegisterRequest.training_methods and speak revision 3."""
        from mor.training import TRAINING_REVISION

        return [c for c in self.online_clients() if method in self._training_methods.get(c, ())
                and self._conns[c].revision >= TRAINING_REVISION]

    async def wait_for_trainers(self, n: int, method: str, timeout: float = 30.0) -> list[str]:
        """Wait until at least ``n`` clients can train ``method``; raises TimeoutError naming who can."""
        end = self._clock() + timeout
        while len(self.online_trainers(method)) < n:
            remaining = end - self._clock()
            if remaining <= 0:
                raise TimeoutError(f"only {len(self.online_trainers(method))} of {n} clients online that train "
                                   f"{method!r} after {timeout:.0f} s: {self.online_trainers(method)}")
            try:
                await asyncio.wait_for(self._online_changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        return self.online_trainers(method)

    async def run_training_round(self, params, method: str, hparams: dict | None = None, *,
                                 update_names: Sequence[str] | None = None, participants: Sequence[str] | None = None,
                                 min_clients: int | None = None, timeout: float = 600.0, value_bound: float = 1e4,
                                 max_num_examples: int = 10_000_000, round_id: str | None = None) -> RoundOutcome:
        """One training round of a parameter-sharing baseline: broadcast ``params`` (name -> float32 array) with
        the method and local-training ``hparams`` (:data:`mor.training.HPARAM_DEFAULTS`), gather each
        participant's validated update. ``update_names``: the tensors clients send back (default: all). Like
        :meth:`run_round` it never raises for client behaviour: ``outcome.reports[c]`` is a
        :class:`~mor_server.baselines.training_round.ClientUpdate` (tensors, num_examples, epsilon, digest); a
        failed round has state FAILED and a reason. Recorded in the audit log (digests and counts, never the
        tensors) and the round metrics under mode ``train:<method>``."""
        from mor.training import hparams_to_pb, tensors_to_pb

        params = {n: np.asarray(v, dtype=np.float32) for n, v in params.items()}
        spec = TrainingSpec(method, {n: tuple(v.shape) for n, v in params.items()},
                            tuple(update_names) if update_names is not None else tuple(sorted(params)),
                            float(value_bound), int(max_num_examples))
        hp = hparams_to_pb(hparams or {})
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        task = pb.TrainingTask(round_id=round_id or self.new_round_id(), method=method,
                               parameters=tensors_to_pb(params), update_names=list(spec.update_names), hparams=hp,
                               timeout_ms=int(timeout * 1000), value_bound=spec.value_bound,
                               max_num_examples=spec.max_num_examples)
        limit = self.config.max_message_bytes
        size = pb.ServerMessage(training_task=task).ByteSize()
        if size > limit:
            raise ValueError(f"the training task is {size} bytes, over max_message_bytes={limit}: raise "
                             "ServerConfig.max_message_bytes (clients must raise their receive limit too) or train "
                             "fewer tensors")
        if spec.update_bytes + 64 * len(spec.update_names) + 1024 > limit:
            raise ValueError(f"an update of {spec.update_bytes} tensor bytes would exceed max_message_bytes={limit}")
        round_id, mode, now = task.round_id, f"train:{method}", self._clock()
        chosen = tuple(participants) if participants is not None else tuple(self.online_trainers(method))
        min_clients = len(chosen) if min_clients is None else min_clients
        self.metrics.rounds_started.labels(mode=mode).inc()
        if len(chosen) < max(min_clients, 1):
            return self._fail_early(round_id, mode, chosen, now,
                                    f"{len(chosen)} clients online that train {method!r}, min_clients={min_clients}")
        rnd = TrainingRound(round_id, chosen, min_clients, now + timeout + self.config.deadline_grace_s, now, 0,
                            mode, spec=spec)
        pending = _Pending(rnd, [], asyncio.Event(), mode)
        pending.task_digest = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        able = set(self.online_trainers(method))
        for c in chosen:
            if c in self._conns and c not in able:
                rnd.drop(c, f"does not train {method} (training_methods / protocol revision)")
        msg = pb.ServerMessage(training_task=task)
        try:
            outcome = await self._gather(rnd, pending, {c: msg for c in chosen if c in able})
        except asyncio.CancelledError:
            self._on_cancelled(rnd.outcome, mode, task_digest=pending.task_digest)
            raise
        h = {("public_seed" if f.name == "seed" else f.name): v for f, v in hp.ListFields()}  # public: in the task
        self._account(outcome, mode, task_digest=pending.task_digest, extra={
            "method": method, "hparams": h, "broadcast_tensors": len(params), "broadcast_bytes": size,
            "update_names": len(spec.update_names), "update_bytes": spec.update_bytes,
            "epsilon_total": {c: u.epsilon for c, u in outcome.reports.items()},
            "updates": {c: {"num_examples": u.num_examples, "sha256": u.digest, "bytes": u.bytes,
                            "train_loss": u.loss} for c, u in outcome.reports.items()}})
        await self._audit_flush()
        return outcome

    async def run_secagg_training_round(self, params, method: str, hparams: dict | None = None, *,
                                        update_names: Sequence[str] | None = None,
                                        participants: Sequence[str] | None = None, min_clients: int | None = None,
                                        timeout: float = 600.0, stage_timeout: float | None = None,
                                        value_bound: float = 100.0, max_num_examples: int = 100_000,
                                        frac_bits: int = 16, round_id: str | None = None) -> RoundOutcome:
        """A training round of ``fedit`` or ``ffa`` under SecAgg+ (docs/protocol.md §9.5): each client trains, then
        masks [n_k * theta_k (every tensor of ``update_names``, flattened, in order), n_k]; the server unmasks only
        the sum, so it learns the sample-weighted average sum_k n_k theta_k / sum_k n_k and the total count, never a
        client's update. ``reports`` of a completed round: ``{"mean": {name: array}, "num_examples": total,
        "survivors": [...]}``. Fixed point: 2^-frac_bits per coordinate of n_k theta_k; every value of a client's
        input must lie within value_bound * max_num_examples (else that client refuses: OUT_OF_RANGE)."""
        from mor.training import hparams_to_pb, tensors_to_pb
        from privacy.secagg import STAGES, SecAggServer

        if method not in ("fedit", "ffa"):
            raise ValueError(f"secure aggregation needs a weighted sum: fedit or ffa, not {method!r} (stack and "
                             "fedcmp need each client's update)")
        params = {n: np.asarray(v, dtype=np.float32) for n, v in params.items()}
        spec = TrainingSpec(method, {n: tuple(v.shape) for n, v in params.items()},
                            tuple(update_names) if update_names is not None else tuple(sorted(params)),
                            float(value_bound), int(max_num_examples))
        hp = hparams_to_pb(hparams or {})
        round_id = round_id or self.new_round_id()
        mode, now = f"train:{method}", self._clock()
        chosen = tuple(sorted(participants if participants is not None else self.online_trainers(method)))
        self.metrics.rounds_started.labels(mode=mode).inc()
        if not chosen:
            return self._fail_early(round_id, mode, chosen, now, f"no client online trains {method!r}")
        sizes = [int(np.prod(spec.shapes[n])) for n in spec.update_names]
        m = sum(sizes) + 1
        try:
            sa = SecAggServer(round_id, chosen, vector_length=m, value_range=spec.value_bound * spec.max_num_examples,
                              frac_bits=frac_bits, mod_bits=64, out_of_range="error")
        except Exception as e:
            return self._fail_early(round_id, mode, chosen, now, f"secure aggregation could not start: {e}")
        min_clients = max(sa.threshold, min_clients or sa.threshold)
        if len(chosen) < min_clients:
            return self._fail_early(round_id, mode, chosen, now,
                                    f"{len(chosen)} clients online train {method}; SecAgg+ needs at least {min_clients}")
        task = pb.TrainingTask(round_id=round_id, method=method, parameters=tensors_to_pb(params),
                               update_names=list(spec.update_names), hparams=hp, timeout_ms=int(timeout * 1000),
                               value_bound=spec.value_bound, max_num_examples=spec.max_num_examples,
                               mode=pb.PRIVACY_MODE_SECAGG, crl=self._crl.pem if self._crl else b"")
        if pb.ServerMessage(training_task=task).ByteSize() + 1024 > self.config.max_message_bytes:
            raise ValueError(f"the training task exceeds max_message_bytes={self.config.max_message_bytes}")
        task_digest = hashlib.sha256(task.SerializeToString(deterministic=True)).hexdigest()
        stage_timeout = stage_timeout or min(timeout, 10.0)
        dropped: dict[str, str] = {}
        able = set(self.online_trainers(method))
        for c in chosen:
            if c in self._conns and c not in able:
                dropped[c] = f"does not train {method} (training_methods / protocol revision)"
                sa.mark_dropout(c, STAGES[0])
        try:
            reason = await self._secagg_stages(sa, round_id, chosen, [c for c in chosen if c not in dropped], task,
                                               "training_task", timeout=timeout, stage_timeout=stage_timeout,
                                               label_mode="secagg", dropped=dropped)
        except asyncio.CancelledError as e:
            self._on_cancelled(RoundOutcome(round_id, RoundState.FAILED, chosen, (), dropped, {}, _cancel_reason(e),
                                            now, self._clock()), mode, task_digest=task_digest)
            raise
        result = sa.result()
        for c, stage in result.dropped.items():
            dropped.setdefault(c, f"dropped at stage {stage}" + (f": {sa.rejected[c]}" if c in sa.rejected else ""))
        ok = result.ok and len(result.survivors) >= min_clients
        reports = {}
        if ok:
            total = np.asarray(result.total, dtype=np.float64)
            count = float(total[-1])
            if not count >= 1:
                ok, reason = False, f"the unmasked example count is {count:g}"
            else:
                mean, k = {}, 0
                for n, size in zip(spec.update_names, sizes):
                    mean[n] = (total[k:k + size] / count).reshape(spec.shapes[n])
                    k += size
                reports = {"mean": mean, "num_examples": count, "survivors": list(result.survivors)}
        if result.ok and not ok and not reason:
            reason = f"only {len(result.survivors)} survivors, min_clients={min_clients}"
        outcome = RoundOutcome(round_id, RoundState.COMPLETED if ok else RoundState.FAILED, chosen,
                               tuple(result.survivors) if ok else (), dropped, reports,
                               reason or ("" if ok else result.reason), now, self._clock())
        h = {("public_seed" if f.name == "seed" else f.name): v for f, v in hp.ListFields()}  # public: in the task
        self._account(outcome, mode, task_digest=task_digest, extra={
            "method": method, "secagg": True, "hparams": h, "broadcast_tensors": len(params),
            "update_names": len(spec.update_names), "vector_length": m, "threshold": sa.threshold,
            "secagg_config_digest": sa.config_digest(), "rejected": dict(sa.rejected),
            "num_examples_total": reports.get("num_examples")})
        await self._audit_flush()
        return outcome

    def _on_cancelled(self, outcome: RoundOutcome, mode: str, *, task_digest: str = "",
                      extra: dict | None = None) -> None:
        """A round task was cancelled (its caller gave up, or the server stops): it is recorded as failed with the
        reason, and every participant still connected is told to stop working on it."""
        self.metrics.rounds_cancelled.labels(mode=mode).inc()
        self._account(outcome, mode, task_digest=task_digest, extra=extra)
        self._audit_wait()
        note = pb.ServerMessage(cancelled=pb.RoundCancelled(round_id=outcome.round_id, reason=outcome.reason[:500]))
        for c in outcome.participants:
            conn = self._conns.get(c)
            if conn is not None:
                self._send_to(conn, note)

    def _check_items(self, items: Sequence[ScoringItem]) -> None:
        if not items:
            raise ValueError("a scoring task needs at least one item")
        if len(items) > self.config.max_items_per_task:
            raise ValueError(f"{len(items)} items exceed max_items_per_task={self.config.max_items_per_task}; "
                             "split the batch")
        for i, it in enumerate(items):
            if not it.candidates or len(it.candidates) > self.config.max_candidates_per_item:
                raise ValueError(f"items[{i}] has {len(it.candidates)} candidates; allowed 1.."
                                 f"{self.config.max_candidates_per_item}")

    def _fail_early(self, round_id, mode, chosen, now, reason) -> RoundOutcome:
        outcome = RoundOutcome(round_id, RoundState.FAILED, tuple(chosen), (), {}, {}, reason, now, now)
        self._account(outcome, mode)
        self._audit_wait()
        return outcome

    def _audit_wait(self) -> None:
        """Synchronous :meth:`_audit_flush` for the rare paths that cannot await (early failure, cancellation)."""
        if self._audit_last is not None:
            self._audit_last.result()

    def _account(self, outcome: RoundOutcome, mode: str, *, task_digest: str = "", extra: dict | None = None) -> None:
        m = self.metrics
        (m.rounds_completed if outcome.ok else m.rounds_failed).labels(mode=mode).inc()
        m.round_latency.labels(mode=mode).observe(outcome.latency)
        for c, why in outcome.dropped.items():
            m.count_dropout(why)
            info = self.registry.get(c)
            if info:
                info.dropouts += 1
        for c in outcome.responders:
            info = self.registry.get(c)
            if info:
                info.rounds_answered += 1
        eps = {c: r["epsilon"] for c, r in outcome.reports.items() if isinstance(r, dict) and "epsilon" in r}
        self._audit("round", {"round_id": outcome.round_id, "mode": mode, "state": outcome.state.value,
                              "participants": list(outcome.participants), "responders": list(outcome.responders),
                              "dropouts": outcome.dropped, "reason": outcome.reason,
                              "latency_s": round(outcome.latency, 6), "task_digest": task_digest,
                              "epsilon_total": eps, **(extra or {})})
        if not outcome.ok:
            log.warning("round %s failed: %s", outcome.round_id, outcome.reason)

    @staticmethod
    def scores_by_client(outcome: RoundOutcome, items: Sequence[ScoringItem]) -> dict[str, list[list[float]]]:
        """Per-client, per-item score lists of a completed plain or dp round."""
        out = {}
        for c, payload in outcome.reports.items():
            flat = payload["scores"] if isinstance(payload, dict) else payload
            out[c] = unflatten(flat, items)
        return out


_PAYLOAD_FOR_MODE = {"plain": "plain", "dp": "dp"}
from privacy.secagg.stages import STAGES as SECAGG_STAGES  # noqa: E402  (tiny, torch-free module)


def dp_score_bound(clip: float, noise_multiplier: float, m: int) -> float:
    """The declared range of a dp task's noised scores: clip + 20 sigma, sigma = noise_multiplier * 2 clip sqrt(m)."""
    return float(clip + DP_SCORE_SIGMAS * noise_multiplier * 2.0 * clip * math.sqrt(max(m, 1)))


def _check_bound(values: Sequence[float], bound: float, field_path: str) -> None:
    for i, v in enumerate(values):
        if abs(v) > bound:
            raise ReportRejected("INVALID_ARGUMENT", f"{field_path}[{i}]",
                                 f"{field_path}[{i}] is {v:g}, outside the task's declared range |score| <= "
                                 f"{bound:g} (task.score_bound); scores are rewards, higher is better, on a bounded "
                                 "scale")


def _cancel_reason(e: BaseException) -> str:
    why = e.args[0] if e.args and isinstance(e.args[0], str) else "abandoned by its caller"
    return f"cancelled: {why}"


def _stage_key(round_id: str, stage: str) -> str:
    return f"{round_id}/{stage}"


def _jsonable(obj):
    """Audit payloads are canonical JSON: non-finite floats become strings ("inf"), tuples lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


class ServerThread:
    """Runs a :class:`FederationServer` on its own event loop in a background thread, with a synchronous facade.

    For synchronous callers such as TRL's trainer: ``with ServerThread(config) as srv: srv.run_round(items)``.
    Every call waits at most its own bound; a round still running then is *cancelled on the loop thread* and
    waited for (recorded as failed, "cancelled", clients told), so no abandoned round keeps running beside the
    next one. :meth:`cancel_all` does the same for every call in flight (e.g. from another thread).
    """

    margin_s = 5.0
    """Slack on top of a round's own deadline before its caller gives up and cancels it."""

    def __init__(self, config: ServerConfig | None = None):
        self.server = FederationServer(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mor-server", daemon=True)
        self._inflight: set[asyncio.Task] = set()

    def call(self, coro, timeout: float | None = None, *, what: str = "call"):
        """Run ``coro`` on the server's loop and wait up to ``timeout`` seconds (None: no limit). Past it the task
        is cancelled on the loop and waited for; then :class:`RoundCancelled` is raised."""
        done = threading.Event()
        box: dict = {}

        def start():
            t = self._loop.create_task(coro)
            box["task"] = t
            self._inflight.add(t)
            t.add_done_callback(lambda _t: (self._inflight.discard(_t), done.set()))

        self._loop.call_soon_threadsafe(start)
        if not done.wait(timeout):
            self._loop.call_soon_threadsafe(lambda: box["task"].cancel(f"{what} exceeded its {timeout:g} s bound"))
            if not done.wait(30):
                raise RoundCancelled(f"{what} did not stop within 30 s of being cancelled")
        t = box["task"]
        if t.cancelled():
            raise RoundCancelled(f"{what} was cancelled" + (f" after {timeout:g} s" if timeout is not None else ""))
        return t.result()

    def cancel_all(self, reason: str = "abandoned by its caller", wait: float = 30.0) -> int:
        """Cancel every call in flight on the server loop and wait until they have ended; returns how many."""
        tasks = concurrent.futures.Future()

        def cancel():
            ts = [t for t in self._inflight if not t.done()]
            for t in ts:
                t.cancel(reason)
            tasks.set_result(ts)

        self._loop.call_soon_threadsafe(cancel)
        ts = tasks.result(wait)
        end = time.monotonic() + wait
        while any(not t.done() for t in ts) and time.monotonic() < end:
            time.sleep(0.01)
        return len(ts)

    def start(self) -> int:
        self._thread.start()
        return self.call(self.server.start(), 30)

    def stop(self) -> None:
        if self._thread.is_alive():
            # calls whose caller was interrupted (a signal while it waited) end first, so that none is destroyed
            # pending with the loop
            self.cancel_all("the server is stopping", wait=10)
            self.call(self.server.stop(), 30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def run_round(self, items, *, wait_s: float | None = None, **kw) -> RoundOutcome:
        """``FederationServer.run_round``; the round ends by its own deadline inside the server. ``wait_s``
        (default: its deadline + grace + ``margin_s``) bounds the wait, after which the round is cancelled."""
        limit = wait_s if wait_s is not None else (kw.get("timeout", 30.0) + self.server.config.deadline_grace_s
                                                   + self.margin_s)
        return self.call(self.server.run_round(items, **kw), limit, what="scoring round")

    def run_secagg_round(self, items, *, wait_s: float | None = None, **kw) -> RoundOutcome:
        """``FederationServer.run_secagg_round``, bounded like :meth:`run_round` (all five stages' deadlines)."""
        if wait_s is None:
            t = kw.get("timeout", 30.0)
            st = kw.get("stage_timeout") or min(t, 10.0)
            wait_s = t + 4 * st + 5 * self.server.config.deadline_grace_s + self.margin_s
        return self.call(self.server.run_secagg_round(items, **kw), wait_s, what="secure-aggregation round")

    def wait_for_clients(self, n: int, timeout: float = 30.0, mode: str | None = None) -> list[str]:
        return self.call(self.server.wait_for_clients(n, timeout, mode))

    def online_clients(self, mode: str | None = None) -> list[str]:
        """The clients online now (supporting ``mode``), read on the server's loop: the registry and the session
        table are only ever touched by that thread, so callers on other threads (the alignment engine, TRL)
        never iterate them while the loop mutates them."""

        async def read() -> list[str]:
            return self.server.online_clients(mode)

        return self.call(read(), 30, what="online_clients")

    @property
    def metrics(self):
        """The server's :class:`~mor_server.federation.metrics.FederationMetrics` (prometheus-client is thread-safe)."""
        return self.server.metrics

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def run_training_round(self, params, method: str, hparams: dict | None = None, *, wait_s: float | None = None,
                           **kw) -> RoundOutcome:
        """``FederationServer.run_training_round``, bounded like :meth:`run_round`."""
        limit = wait_s if wait_s is not None else (kw.get("timeout", 600.0) + self.server.config.deadline_grace_s
                                                   + self.margin_s)
        return self.call(self.server.run_training_round(params, method, hparams, **kw), limit, what="training round")

    @property
    def port(self) -> int | None:
        return self.server.port

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
