"""Prometheus metrics of the federation server (prometheus-client, one registry per server: no global state).

Names follow https://prometheus.io/docs/practices/naming/: the unit is a suffix in base units (``_bytes``,
``_seconds``), counters end in ``_total`` (prometheus-client appends it to a Counter's name in the exposition).

Every labelled counter and histogram takes its label from a closed set, named below, and is initialised to 0 for
every value of that set when the registry is built, so an alert or a ``rate()`` sees 0 rather than "no data" before
the first event. The metric refuses a value outside its set (:class:`UnknownLabel`): a new mode, status code or
dropout reason cannot reach the exposition without being added here first (and so to the dashboard's view of it).
Dropout reasons are free text (``refused: <client's words>``); :func:`dropout_reason` maps them to the closed set.
"""

from __future__ import annotations

import logging
from typing import Iterable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mor.training import METHODS as TRAINING_METHODS
from privacy.secagg.stages import STAGES as SECAGG_STAGES
from .registry import KNOWN_MODES

log = logging.getLogger("mor.server")

#: ``mode`` label of the round counters and the latency histogram: a scoring round's privacy mode, or
#: ``train:<method>`` for a training round of a parameter-sharing baseline (``run_training_round``)
ROUND_MODES: tuple[str, ...] = (*KNOWN_MODES, *(f"train:{m}" for m in TRAINING_METHODS))
#: gRPC status codes a rejected client message (``reports_rejected``) or a server-ended session (``sessions_ended``)
#: can carry: every code but OK (the server names a code with ``grpc.StatusCode[...]``, so nothing else can occur)
STATUS_CODES: tuple[str, ...] = tuple(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)
#: why a participant left a round (``reason`` label of ``mor_client_dropouts_total``): the text before the first
#: ":" or " (" of the reason the server records (rounds.py, server.py); "other" for anything not listed (logged once)
DROPOUT_REASONS: tuple[str, ...] = (
    "disconnected", "not connected", "not reading its stream", "refused", "round cancelled",
    "no report before the deadline", "revoked", "revocation unchecked", "replaced by a new session",
    *(f"dropped at stage {s}" for s in SECAGG_STAGES), *(f"does not train {m}" for m in TRAINING_METHODS), "other")
#: outcome of a reward round run for GRPO (``mor_reward_rounds_total``)
REWARD_ROUND_OUTCOMES: tuple[str, ...] = ("ok", "failed")


class UnknownLabel(ValueError):
    """A labelled metric was given a value outside its closed set."""


class ClosedLabel:
    """A metric with one label whose values come from a closed set: every value is initialised (``.labels(v)``
    creates the 0 sample) and :meth:`labels` refuses any other value. Everything else (``collect``, ...) is the
    wrapped prometheus-client metric's."""

    def __init__(self, metric, label: str, values: Iterable[str]):
        self.metric, self.label, self.values = metric, label, tuple(values)
        for v in self.values:
            metric.labels(**{label: v})

    def labels(self, *args: str, **kwargs: str):
        if len(args) + len(kwargs) != 1 or (kwargs and self.label not in kwargs):
            raise TypeError(f"{self.metric._name}.labels takes one value, {self.label}=...")
        value = args[0] if args else kwargs[self.label]
        if value not in self.values:
            raise UnknownLabel(f"{self.metric._name}: {self.label}={value!r} is not one of {list(self.values)}; add it "
                               "to the label set in mor_server/federation/metrics.py (and to docs/monitoring/ if it is charted)")
        return self.metric.labels(**{self.label: value})

    def __getattr__(self, name):
        return getattr(self.metric, name)


def dropout_reason(why: str) -> str:
    """The ``reason`` label for a recorded dropout reason: e.g. ``refused: budget spent`` -> ``refused``,
    ``not connected (stage reveal)`` -> ``not connected``; "other" (logged once per text) when not in
    :data:`DROPOUT_REASONS`."""
    head = why.split(":")[0].split(" (")[0].strip()
    if head in DROPOUT_REASONS:
        return head
    if head not in _unlisted and len(_unlisted) < 100:
        _unlisted.add(head)
        log.warning("dropout reason %r is not in mor_server.federation.metrics.DROPOUT_REASONS; counted as 'other'", head[:80])
    return "other"


_unlisted: set[str] = set()


class FederationMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def by_mode(metric):
            return ClosedLabel(metric, "mode", ROUND_MODES)

        self.rounds_started = by_mode(Counter("mor_rounds_started", "Scoring rounds started", ["mode"], registry=r))
        self.rounds_completed = by_mode(Counter("mor_rounds_completed", "Scoring rounds completed", ["mode"],
                                                registry=r))
        self.rounds_failed = by_mode(Counter("mor_rounds_failed", "Scoring rounds failed (cancelled ones included)",
                                             ["mode"], registry=r))
        self.round_latency = by_mode(Histogram(
            "mor_round_latency_seconds", "Wall time of a scoring round, task sent to round closed", ["mode"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r))
        self.rounds_cancelled = by_mode(Counter("mor_rounds_cancelled", "Rounds cancelled before their end (caller "
                                                "gave up); also counted as failed", ["mode"], registry=r))
        self.clients_online = Gauge("mor_clients_online", "Clients with an open session", registry=r)
        self.clients_registered = Gauge("mor_clients_registered", "Clients that registered a card", registry=r)
        self.dropouts = ClosedLabel(Counter("mor_client_dropouts", "Participants dropped from a round", ["reason"],
                                            registry=r), "reason", DROPOUT_REASONS)
        self.refusals = Counter("mor_client_refusals", "Tasks refused by clients", registry=r)
        self.reports_rejected = ClosedLabel(Counter("mor_reports_rejected", "Client messages rejected by validation, "
                                                    "by gRPC status code", ["code"], registry=r), "code", STATUS_CODES)
        self.bytes_in = Counter("mor_received_bytes", "Serialized bytes received from clients", registry=r)
        self.bytes_out = Counter("mor_sent_bytes", "Serialized bytes sent to clients", registry=r)
        self.sessions_ended = ClosedLabel(Counter("mor_sessions_ended", "Sessions the server ended with a status "
                                                  "(revoked, not reading, CRL unusable, replaced), by gRPC status code",
                                                  ["code"], registry=r), "code", STATUS_CODES)
        self.sessions_revoked = Counter("mor_sessions_revoked", "Open sessions ended because the CRL revoked them",
                                        registry=r)
        self.outbox_overflows = Counter("mor_outbox_overflows", "Sessions whose bounded outbox filled up (client not "
                                        "reading)", registry=r)
        self.crl_reloads = Counter("mor_crl_reloads", "Times the server loaded a new CRL", registry=r)
        self.crl_usable = Gauge("mor_crl_usable", "1 when the server's CRL is present, signed by the CA and fresh; 0 "
                                "when it is not (every client is refused)", registry=r)
        self.crl_next_update = Gauge("mor_crl_next_update_timestamp_seconds", "next_update of the loaded CRL (Unix "
                                     "time); re-sign before it passes", registry=r)
        # open label set (server_tls, ca, client:NAME), set only under mTLS; a 0 here would read as "expired now"
        self.certificate_expiry = Gauge("mor_certificate_expiry_seconds", "Seconds until the certificate expires "
                                        "(negative: expired)", ["certificate"], registry=r)

    def count_dropout(self, why: str) -> None:
        """Count one dropout under its :func:`dropout_reason`."""
        self.dropouts.labels(reason=dropout_reason(why)).inc()

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Expose /metrics over HTTP; returns (http_server, thread). Port 0 picks a free port."""
        return start_http_server(port, addr=addr, registry=self.registry)

    def value(self, name: str, labels: dict | None = None) -> float:
        """Current value of a sample (for tests and the demo summary); 0.0 if it was never set."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def total(self, name: str) -> float:
        """Sum of a sample over all its label values, e.g. ``total("mor_rounds_completed_total")``."""
        return float(sum(s.value for m in self.registry.collect() for s in m.samples if s.name == name))
