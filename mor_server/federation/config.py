"""The federation server's settings (:class:`ServerConfig`) and the bounds its checks share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mor.v1 import federation_pb2 as pb
from mor.wire import MIN_PROTOCOL_REVISION

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Federation"].full_name
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


def dp_score_bound(clip: float, noise_multiplier: float, m: int) -> float:
    """The declared range of a dp task's noised scores: clip + 20 sigma, sigma = noise_multiplier * 2 clip sqrt(m)."""
    return float(clip + DP_SCORE_SIGMAS * noise_multiplier * 2.0 * clip * math.sqrt(max(m, 1)))

