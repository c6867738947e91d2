"""Who is calling: the client's identity checked once per RPC, and the bytes each RPC moves, counted once.

:class:`IdentityInterceptor` is a ``grpc.aio`` server interceptor on every method of the Federation service: before
a handler runs it resolves the caller (the Common Name of its mTLS certificate, checked against the CRL; metadata
``x-mor-client-id`` in insecure debugging mode) or aborts the RPC, and it counts the request and response bytes
(``mor_bytes_total``). A gRPC interceptor sees only the method name and metadata, not the peer's certificate, so
it wraps the method's handler: the wrapper gets the servicer context, checks the identity there, and hands it to
the handler through :func:`caller` (a context variable of the RPC's task). :class:`RevocationChecks` is the
server's side of the CRL: re-read when its file changes, failing closed when it is missing or stale, ending the
sessions of revoked certificates.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os

import grpc
from cryptography import x509

from privacy import pki

from .config import SERVICE_NAME

log = logging.getLogger("mor.server")
_CALLER: contextvars.ContextVar[tuple[str, x509.Certificate | None]] = contextvars.ContextVar("mor_caller")


def caller() -> tuple[str, x509.Certificate | None]:
    """``(client_id, certificate)`` of the Federation RPC being handled (certificate None in insecure mode)."""
    return _CALLER.get()


class IdentityInterceptor(grpc.aio.ServerInterceptor):
    """Identity and byte counting for every method of the Federation service (health and reflection pass)."""

    def __init__(self, identify, metrics):
        """identify: ``async (context) -> (client_id, certificate)`` that aborts the RPC on a bad identity."""
        self._identify = identify
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        identify, bytes_in, bytes_out = self._identify, self._metrics.bytes_in, self._metrics.bytes_out
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                _CALLER.set(await identify(context))
                bytes_in.inc(request.ByteSize())
                response = await inner(request, context)
                bytes_out.inc(response.ByteSize())
                return response

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(request_iterator, context):
                _CALLER.set(await identify(context))
                return await inner_stream(_CountedRequests(request_iterator, bytes_in),
                                          _CountedContext(context, bytes_out))

            return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                         response_serializer=handler.response_serializer)
        raise TypeError(f"{handler_call_details.method}: the Federation service has only unary and bidi methods")


class _CountedRequests:
    """A session's request stream; counts each message's bytes as it is read."""

    def __init__(self, it, counter):
        self._it = it.__aiter__()
        self._counter = counter

    def __aiter__(self):
        return self

    async def __anext__(self):
        msg = await self._it.__anext__()
        self._counter.inc(msg.ByteSize())
        return msg


class _CountedContext:
    """The servicer context of a session; counts each message's bytes once it is written."""

    def __init__(self, context, counter):
        self._context = context
        self._counter = counter

    async def write(self, msg) -> None:
        await self._context.write(msg)
        self._counter.inc(msg.ByteSize())

    def __getattr__(self, name):
        return getattr(self._context, name)


class RevocationChecks:
    """The CRL part of :class:`~mor_server.federation.server.FederationServer` (its ``_crl*``, ``_revoked`` and
    ``_ca_cert`` state; sessions are ended through the servicer's ``_end_session``)."""

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

    async def _identify_cert(self, context) -> tuple[str, x509.Certificate | None]:
        """The caller's Common Name and certificate (None in insecure mode); aborts the RPC with the status a
        client can act on: no certificate, revoked, or revocation not checkable now (fails closed)."""
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
