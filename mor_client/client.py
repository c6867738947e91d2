"""``FederationClient``: the SDK an institution embeds to join a MoR federation.

One module although over 400 lines: it is one class, the session's life (connect, register, hello, tasks,
heartbeats, reconnects), whose methods share its connection state.

It dials the server outbound over mutual TLS, registers its reward model's card, keeps one ``Session`` stream open,
scores each task with the institution's own ``scorer`` and sends back only what its :class:`ReleasePolicy` allows.
It reconnects with exponential backoff (full jitter), honours task deadlines, keeps no global state, and shuts down
cleanly (``await client.stop()`` or ``client.stop_threadsafe()``).

    from mor_client import FederationClient, ClientCredentials
    client = FederationClient("federation.example.org:50051", ClientCredentials.from_dir("creds/"), scorer,
                              card={"architecture": "cnn", "parameter_count": 12345, "supported_modes": ["plain"]})
    asyncio.run(client.run())      # or client.run_sync()
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import threading
from dataclasses import dataclass, field
from typing import Callable

import grpc

from mor.modes import SECAGG_MODES
from mor.v1 import federation_pb2 as pb
from mor.v1 import federation_pb2_grpc as pb_grpc
from privacy.pki import ClientCredentials

from .release import Release, ReleasePolicy
from mor.types import ScoreShapeError, Scorer, check_score_shape
from mor.wire import PB_TO_MODE, PROTOCOL_REVISION, SDK_VERSION, card_to_pb, flatten, items_from_pb

log = logging.getLogger("mor.client")
_PERMANENT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION}


class ClientError(Exception):
    """The federation refused this client for a reason retrying will not fix (bad card, revoked certificate...)."""


@dataclass
class ClientStats:
    tasks: int = 0
    reports: int = 0
    refusals: int = 0
    rejected: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1000))
    """(round_id, code, field, message) of the newest rejected messages (bounded)."""
    cancelled: int = 0
    sessions: int = 0
    reconnects: int = 0


class _Outbox(asyncio.Queue):
    """The session's bounded send queue. A server that stops reading our stream would otherwise grow it without
    limit: when it is full, ``on_full`` ends the session (the client reconnects with backoff) and the message is
    dropped, so every ``put_nowait`` caller keeps working unchanged."""

    def __init__(self, maxsize: int, on_full: Callable[[], None]):
        super().__init__(maxsize=maxsize)
        self._on_full = on_full

    def put_nowait(self, item) -> None:
        try:
            super().put_nowait(item)
        except asyncio.QueueFull:
            self._on_full()


class FederationClient:
    def __init__(self, server: str, credentials: ClientCredentials | None, scorer: Scorer, *, card: dict,
                 policy: ReleasePolicy | None = None, insecure_client_id: str | None = None,
                 server_name_override: str | None = None, backoff_initial: float = 0.2, backoff_max: float = 15.0,
                 max_attempts: int | None = None, max_message_bytes: int = 16 << 20,
                 on_event: Callable[[str, dict], None] | None = None, secagg_handler=None, audit=None,
                 max_pending_tasks: int = 16, max_outbox: int = 1024, trainer=None):
        if credentials is None and insecure_client_id is None:
            raise ValueError("credentials are required (mTLS); pass insecure_client_id only for local debugging")
        if not hasattr(scorer, "score"):
            raise TypeError("scorer must have a .score(items) -> list[list[float]] method (see mor_client.Scorer)")
        self.server = server
        self.credentials = credentials
        self.scorer = scorer
        self.card = dict(card)
        self.policy = policy or ReleasePolicy(tuple(card.get("supported_modes", ["plain"])))
        self.card.setdefault("supported_modes", list(self.policy.supported_modes))
        self.insecure_client_id = insecure_client_id
        self.server_name_override = server_name_override
        self.backoff_initial, self.backoff_max, self.max_attempts = backoff_initial, backoff_max, max_attempts
        self.max_message_bytes = max_message_bytes
        if int(max_pending_tasks) < 1 or int(max_outbox) < 2:
            raise ValueError("max_pending_tasks must be >= 1 and max_outbox >= 2")
        self.max_pending_tasks = int(max_pending_tasks)
        """Tasks scored at once; a server sending more gets RESOURCE_EXHAUSTED refusals, not unbounded work."""
        self.max_outbox = int(max_outbox)
        """Messages waiting to be sent; a server that does not read them ends the session (bounded memory)."""
        self.on_event = on_event or (lambda kind, info: None)
        self.secagg_handler = secagg_handler
        self.audit = audit
        if trainer is not None and not (hasattr(trainer, "train") and hasattr(trainer, "methods")):
            raise TypeError("trainer must have .methods and .train(request) (see mor_client.training.Trainer)")
        self.trainer = trainer
        """Answers training rounds of the parameter-sharing baselines (protocol revision 3); None: scoring only."""
        self.stats = ClientStats()
        self.client_id: str | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._call = None
        self.connected = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def _channel(self) -> grpc.aio.Channel:
        opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.keepalive_time_ms", 10000), ("grpc.keepalive_timeout_ms", 10000),
                ("grpc.keepalive_permit_without_calls", 1)]
        if self.credentials is None:
            log.warning("!!! INSECURE: connecting WITHOUT TLS as %r; never use this outside local debugging !!!",
                        self.insecure_client_id)
            return grpc.aio.insecure_channel(self.server, options=opts)
        if self.server_name_override:
            opts.append(("grpc.ssl_target_name_override", self.server_name_override))
        creds = grpc.ssl_channel_credentials(root_certificates=self.credentials.ca_pem,
                                             private_key=self.credentials.tls_key_pem,
                                             certificate_chain=self.credentials.tls_cert_pem)
        return grpc.aio.secure_channel(self.server, creds, options=opts)

    def _metadata(self):
        return (("x-mor-client-id", self.insecure_client_id),) if self.credentials is None else None

    async def run(self) -> None:
        """Connect, serve tasks, reconnect on failure; returns after :meth:`stop`. Raises ClientError on a
        permanent refusal (e.g. revoked certificate) or after ``max_attempts`` failed connections."""
        self._loop = asyncio.get_running_loop()
        self.check_certificate_expiry()
        delay, attempts = self.backoff_initial, 0
        while not self._stop.is_set():
            try:
                served = await self._session_once()
                if served:
                    delay, attempts = self.backoff_initial, 0
            except grpc.aio.AioRpcError as e:
                if e.code() in _PERMANENT or (e.code() == grpc.StatusCode.ABORTED
                                              and "replaced by a newer session" in (e.details() or "")):
                    log.error("the federation refused this client: %s: %s", e.code().name, e.details())
                    self.on_event("refused", {"code": e.code().name, "details": e.details()})
                    raise ClientError(f"the federation refused this client: {e.code().name}: {e.details()}") from None
                if e.code() == grpc.StatusCode.CANCELLED and self._stop.is_set():
                    break
                attempts += 1
                log.info("connection to %s failed (%s: %s); retrying in <= %.1fs", self.server, e.code().name,
                         e.details(), delay)
                self.on_event("disconnected", {"code": e.code().name, "details": e.details()})
            except asyncio.CancelledError:  # stop() cancels the call: a clean end, unless *we* are cancelled
                me = asyncio.current_task()
                if self._stop.is_set() and (me is None or not me.cancelling()):
                    break
                raise
            finally:
                self.connected.clear()
            if self._stop.is_set():
                break
            if self.max_attempts is not None and attempts >= self.max_attempts:
                raise ClientError(f"could not keep a session with {self.server} after {attempts} attempts")
            self.stats.reconnects += 1
            wait = random.uniform(0, delay)
            log.info("retrying in %.1f s (attempt %d)", wait, attempts + 1)
            self.on_event("retrying", {"in_s": wait, "attempt": attempts + 1})
            try:  # full jitter, interruptible by stop()
                await asyncio.wait_for(self._stop.wait(), wait)
            except asyncio.TimeoutError:
                pass
            delay = min(self.backoff_max, delay * 2)

    def check_certificate_expiry(self, warn_days: float = 30.0) -> float | None:
        """Seconds until this client's TLS certificate expires (None without credentials); logs a WARNING and
        emits the event ``certificate_expiring`` when fewer than ``warn_days`` days are left."""
        if self.credentials is None:
            return None
        import time

        from cryptography import x509

        cert = x509.load_pem_x509_certificate(self.credentials.tls_cert_pem)
        left = cert.not_valid_after_utc.timestamp() - time.time()
        if left < warn_days * 86400:
            log.warning("this client's TLS certificate expires in %.1f days (%s): ask the federation to renew it "
                        "(`mor pki renew NAME`)", left / 86400, cert.not_valid_after_utc.isoformat())
            self.on_event("certificate_expiring", {"seconds_left": left})
        return left

    def run_sync(self) -> None:
        asyncio.run(self.run())

    async def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()

    def stop_threadsafe(self) -> None:
        """Stop from another thread (e.g. a signal handler of the embedding program)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.stop()))

    # -- one session ------------------------------------------------------------------------------------------------
    async def _session_once(self) -> bool:
        async with self._channel() as channel:
            stub = pb_grpc.FederationStub(channel)
            req = pb.RegisterRequest(card=card_to_pb(self.card), sdk_version=SDK_VERSION)
            if self.credentials is not None and self.credentials.identity_cert_pem:
                req.identity_certificate = self.credentials.identity_cert_pem
            if self.trainer is not None:
                req.training_methods.extend(list(self.trainer.methods))
            resp = await stub.Register(req, metadata=self._metadata(), timeout=15)
            self.client_id = resp.client_id
            if resp.max_message_bytes > self.max_message_bytes:
                log.warning("the server may send messages of up to %d bytes but this client receives at most %d: "
                            "pass max_message_bytes=%d to FederationClient, or large tasks will fail",
                            resp.max_message_bytes, self.max_message_bytes, resp.max_message_bytes)
            def outbox_full() -> None:
                log.error("the server is not reading this session's stream (%d messages waiting to be sent); "
                          "ending the session", self.max_outbox)
                self.on_event("outbox_full", {"max_outbox": self.max_outbox})
                if self._call is not None:
                    self._call.cancel()

            send_q: asyncio.Queue = _Outbox(self.max_outbox, outbox_full)
            send_q.put_nowait(pb.ClientMessage(hello=pb.Hello(sdk_version=SDK_VERSION,
                                                              protocol_revision=PROTOCOL_REVISION)))

            async def outgoing():
                while True:
                    msg = await send_q.get()
                    if msg is None:
                        return
                    yield msg

            call = stub.Session(outgoing(), metadata=self._metadata())
            self._call = call
            workers: set[asyncio.Task] = set()
            by_round: dict[str, asyncio.Task] = {}
            try:
                async for msg in call:
                    kind = msg.WhichOneof("body")
                    if kind == "welcome":
                        self.stats.sessions += 1
                        self.connected.set()
                        log.info("connected to %s as %s (session %s, protocol revision %d)", self.server,
                                 msg.welcome.client_id, msg.welcome.session_id, msg.welcome.protocol_revision or 1)
                        self.on_event("connected", {"client_id": msg.welcome.client_id,
                                                    "session_id": msg.welcome.session_id,
                                                    "protocol_revision": msg.welcome.protocol_revision or 1})
                    elif kind == "task":
                        self.stats.tasks += 1
                        log.info("task %s received: %s, %d items", msg.task.round_id,
                                 PB_TO_MODE.get(msg.task.mode, "unspecified"), len(msg.task.items))
                        if len(by_round) >= self.max_pending_tasks:  # bounded work whatever the server sends
                            log.warning("task %s refused: %d tasks already in progress", msg.task.round_id,
                                        len(by_round))
                            send_q.put_nowait(self.release_message(msg.task.round_id, Release(
                                "refuse", code="RESOURCE_EXHAUSTED",
                                reason=f"client busy: {len(by_round)} tasks in progress (max_pending_tasks)")))
                            continue
                        t = asyncio.create_task(self._handle_task(msg.task, send_q))
                        workers.add(t)
                        by_round[msg.task.round_id] = t
                        t.add_done_callback(workers.discard)
                        t.add_done_callback(lambda _t, r=msg.task.round_id: by_round.pop(r, None))
                    elif kind == "training_task":  # revision 3: a parameter-sharing baseline's round
                        self.stats.tasks += 1
                        rid = msg.training_task.round_id
                        if len(by_round) >= self.max_pending_tasks or rid in by_round:
                            send_q.put_nowait(self.release_message(rid, Release(
                                "refuse", code="RESOURCE_EXHAUSTED",
                                reason=f"client busy: {len(by_round)} tasks in progress (max_pending_tasks)")))
                            continue
                        from .training import handle_training_task

                        t = asyncio.create_task(handle_training_task(self, msg.training_task, send_q))
                        workers.add(t)
                        by_round[rid] = t
                        t.add_done_callback(workers.discard)
                        t.add_done_callback(lambda _t, r=rid: by_round.pop(r, None))
                    elif kind == "cancelled":  # the server abandoned the round: stop working on it
                        self.stats.cancelled += 1
                        t = by_round.pop(msg.cancelled.round_id, None)
                        if t is not None:
                            t.cancel()
                        if self.secagg_handler is not None and hasattr(self.secagg_handler, "cancel_round"):
                            self.secagg_handler.cancel_round(msg.cancelled.round_id)
                        self.on_event("cancelled", {"round_id": msg.cancelled.round_id,
                                                    "reason": msg.cancelled.reason})
                    elif kind == "secagg":
                        if self.secagg_handler is not None:
                            t = asyncio.create_task(self.secagg_handler.on_stage(msg.secagg, send_q, self))
                            workers.add(t)
                            t.add_done_callback(workers.discard)
                    elif kind == "ack" and msg.ack.code != 0:
                        rej = (msg.ack.round_id, _code_name(msg.ack.code),
                               msg.ack.field, msg.ack.message)
                        self.stats.rejected.append(rej)
                        log.warning("server rejected our message for round %s: %s %s", *rej[:2], rej[3])
                        self.on_event("rejected", {"round_id": rej[0], "code": rej[1], "field": rej[2],
                                                   "message": rej[3]})
                return self.stats.sessions > 0
            finally:
                try:
                    asyncio.Queue.put_nowait(send_q, None)  # end the outgoing stream (never "full" handling here)
                except asyncio.QueueFull:
                    pass  # the call is being torn down; its request iterator is cancelled with it
                for t in workers:
                    t.cancel()
                self._call = None

    async def _handle_task(self, task: pb.ScoringTask, send_q: asyncio.Queue) -> None:
        mode = PB_TO_MODE.get(task.mode, "unspecified")
        items = items_from_pb(task.items)
        timeout = task.timeout_ms / 1000 if task.timeout_ms else 30.0
        if mode in SECAGG_MODES and self.secagg_handler is not None:
            await self.secagg_handler.on_task(task, items, self, send_q)
            return
        flat = await self.score_items(task.round_id, items, timeout)
        bound = task.score_bound
        if not isinstance(flat, Release) and mode == "plain" and bound > 0 and any(abs(v) > bound for v in flat):
            i = next(i for i, v in enumerate(flat) if abs(v) > bound)
            flat = Release("refuse", code="OUT_OF_RANGE",
                           reason=f"local scorer returned {flat[i]:g} at position {i}, outside the task's declared "
                                  f"range |score| <= {bound:g}")
        if isinstance(flat, Release):
            rel = flat
        else:
            rel = self.policy.release(mode=mode, round_id=task.round_id, scores=flat,
                                      clip=task.dp.clip if task.HasField("dp") else 0.0,
                                      noise_multiplier=task.dp.noise_multiplier if task.HasField("dp") else 0.0)
        self.audit_release(task.round_id, mode, rel, n_items=len(items))
        if rel.kind == "refuse":
            log.info("task %s refused: %s: %s", task.round_id, rel.code, rel.reason)
        else:
            log.info("task %s answered: %s, %d scores", task.round_id, rel.kind, len(rel.scores))
        send_q.put_nowait(self.release_message(task.round_id, rel))
        self.on_event("task", {"round_id": task.round_id, "mode": mode, "items": len(items), "release": rel.kind})

    async def score_items(self, round_id: str, items, timeout: float) -> list[float] | Release:
        """Run the institution's scorer in a worker thread under the task's deadline. Returns the flat scores
        (item-major), or a refusal Release when the scorer is too slow, fails, or returns the wrong number."""
        try:
            scores = await asyncio.wait_for(asyncio.to_thread(self.scorer.score, items), timeout)
            return flatten(check_score_shape(scores, items))
        except ScoreShapeError as e:
            log.error("round %s: %s", round_id, e)
            return Release("refuse", code="INTERNAL", reason=f"local scorer: {e}"[:400])
        except asyncio.TimeoutError:
            return Release("refuse", code="DEADLINE_EXCEEDED",
                           reason=f"local scoring exceeded the {timeout:.1f}s deadline")
        except Exception as e:  # the scorer is the institution's code: report, do not crash the session
            log.exception("scorer failed on round %s", round_id)
            return Release("refuse", code="INTERNAL", reason=f"local scorer failed: {type(e).__name__}: {e}"[:400])

    def audit_release(self, round_id: str, mode: str, rel: Release, *, n_items: int, extra: dict | None = None) -> None:
        """Log what leaves (or is refused) durably *before* it is sent; never the scores themselves."""
        if self.audit is None:
            return
        if rel.kind == "refuse":
            self.audit.append("refusal", {"round_id": round_id, "mode": mode, "code": rel.code, "reason": rel.reason,
                                          "remaining_epsilon": None if math.isnan(rel.remaining_epsilon)
                                          else rel.remaining_epsilon})
            return
        payload = {"round_id": round_id, "mode": mode, "items": n_items, "released": len(rel.scores),
                   **(extra or {})}
        if rel.kind == "dp":
            payload.update(clip=rel.clip, noise_multiplier=rel.noise_multiplier, epsilon_total=rel.epsilon_total)
        self.audit.append("release", payload)

    def release_message(self, round_id: str, rel: Release) -> pb.ClientMessage:
        if rel.kind == "refuse":
            self.stats.refusals += 1
            return pb.ClientMessage(refusal=pb.Refusal(
                round_id=round_id, reason=rel.reason, code=grpc.StatusCode[rel.code].value[0],
                remaining_epsilon=0.0 if math.isnan(rel.remaining_epsilon) else rel.remaining_epsilon))
        self.stats.reports += 1
        if rel.kind == "plain":
            return pb.ClientMessage(report=pb.ScoreReport(round_id=round_id, plain=pb.PlainScores(scores=rel.scores)))
        return pb.ClientMessage(report=pb.ScoreReport(round_id=round_id, dp=pb.NoisedScores(
            scores=rel.scores, clip=rel.clip, noise_multiplier=rel.noise_multiplier,
            epsilon_charged=rel.epsilon_total)))


def _code_name(code: int) -> str:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c.name
    return str(code)


class ClientThread:
    """Runs a FederationClient on its own event loop in a background thread (for embedding in sync programs)."""

    def __init__(self, client: FederationClient):
        self.client = client
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="mor-client", daemon=True)

    def _main(self):
        try:
            asyncio.run(self.client.run())
        except BaseException as e:  # surfaced to the embedding program via .error
            self.error = e

    def start(self) -> "ClientThread":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.client.stop_threadsafe()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
