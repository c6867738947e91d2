"""The federation server: its lifecycle around the servicer, the rounds and the secure-aggregation transport.

Clients dial out, call ``Register`` and keep one ``Session`` stream open; the server pushes tasks over it.
Identity is the Common Name of the client's mTLS certificate (checked against the federation CA by TLS and against
the CRL by :mod:`.identity`); nothing a client says can change it. :class:`FederationServer` is assembled from one
class per role, each in its own module, sharing the state created here:

* :class:`~.servicer.FederationServicer`: the RPC handlers (Register, Session) and report validation;
* :class:`~.identity.RevocationChecks` with :class:`~.identity.IdentityInterceptor`: who is calling, once per RPC;
* :class:`~.orchestrator.RoundOrchestrator`: scoring and training rounds, and their accounting;
* :class:`~.secagg_transport.SecAggTransport`: SecAgg+ rounds over the sessions;
* this module: start/stop, TLS rotation and certificate expiry, the audit writer.

Use it from asyncio (``await server.start()``, ``await server.run_round(...)``) or from synchronous code through
:class:`~.thread.ServerThread`, which runs the server's event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import itertools
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as _reflection_pb2

from mor.v1 import federation_pb2_grpc as pb_grpc
from privacy import pki

from .config import AUDIT_MAX_INLINE, SERVICE_NAME, ServerConfig
from .identity import IdentityInterceptor, RevocationChecks
from .metrics import FederationMetrics
from .orchestrator import _Pending, RoundOrchestrator
from .registry import ClientRegistry
from .rounds import RoundBook
from .secagg_transport import SecAggTransport
from .servicer import FederationServicer, _Conn

log = logging.getLogger("mor.server")
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
"""grpcio-reflection (1.85) registers only ``grpc.reflection.v1alpha``; ``v1`` has the same messages on the wire,
so the same servicer answers both (tools such as grpcurl and Postman try v1 first)."""


class FederationServer(FederationServicer, RevocationChecks, RoundOrchestrator, SecAggTransport):
    """One federation server: the roles of this package on one event loop, sharing the state created here."""

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
        self._server = grpc.aio.server(options=opts,
                                       interceptors=[IdentityInterceptor(self._identify_cert, self.metrics)])
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

    def _audit_wait(self) -> None:
        """Synchronous :meth:`_audit_flush` for the rare paths that cannot await (early failure, cancellation)."""
        if self._audit_last is not None:
            self._audit_last.result()


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


def _jsonable(obj):
    """Audit payloads are canonical JSON: non-finite floats become strings ("inf"), tuples lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj

