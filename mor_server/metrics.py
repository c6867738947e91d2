"""Prometheus metrics of the federation server (prometheus-client, one registry per server: no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class FederationMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rounds_started = Counter("mor_rounds_started", "Scoring rounds started", ["mode"], registry=r)
        self.rounds_completed = Counter("mor_rounds_completed", "Scoring rounds completed", ["mode"], registry=r)
        self.rounds_failed = Counter("mor_rounds_failed", "Scoring rounds failed", ["mode"], registry=r)
        self.round_latency = Histogram(
            "mor_round_latency_seconds", "Wall time of a scoring round, task sent to round closed", ["mode"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.clients_online = Gauge("mor_clients_online", "Clients with an open session", registry=r)
        self.clients_registered = Gauge("mor_clients_registered", "Clients that registered a card", registry=r)
        self.dropouts = Counter("mor_client_dropouts", "Participants dropped from a round", ["reason"], registry=r)
        self.refusals = Counter("mor_client_refusals", "Tasks refused by clients", registry=r)
        self.reports_rejected = Counter("mor_reports_rejected", "Client messages rejected by validation",
                                        ["code"], registry=r)
        self.bytes_in = Counter("mor_bytes_received", "Serialized bytes received from clients", registry=r)
        self.bytes_out = Counter("mor_bytes_sent", "Serialized bytes sent to clients", registry=r)
        self.rounds_cancelled = Counter("mor_rounds_cancelled", "Rounds cancelled before their end (caller gave up)",
                                        ["mode"], registry=r)
        self.sessions_ended = Counter("mor_sessions_ended", "Sessions the server ended with a status (revoked, not "
                                      "reading, CRL unusable)", ["code"], registry=r)
        self.sessions_revoked = Counter("mor_sessions_revoked", "Open sessions ended because the CRL revoked them",
                                        registry=r)
        self.outbox_overflows = Counter("mor_outbox_overflows", "Sessions whose bounded outbox filled up (client not "
                                        "reading)", registry=r)
        self.crl_reloads = Counter("mor_crl_reloads", "Times the server loaded a new CRL", registry=r)
        self.crl_usable = Gauge("mor_crl_usable", "1 when the server's CRL is present, signed by the CA and fresh; 0 "
                                "when it is not (every client is refused)", registry=r)
        self.crl_next_update = Gauge("mor_crl_next_update_timestamp_seconds", "next_update of the loaded CRL (Unix "
                                     "time); re-sign before it passes", registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Expose /metrics over HTTP; returns (http_server, thread). Port 0 picks a free port."""
        return start_http_server(port, addr=addr, registry=self.registry)

    def value(self, name: str, labels: dict | None = None) -> float:
        """Current value of a sample (for tests and the demo summary); 0.0 if it was never set."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v
