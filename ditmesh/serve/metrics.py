"""The server's Prometheus metrics, on a registry of their own (one per app, nothing global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Requests by outcome, latency, queue depth, what reached the ranks, and restarts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ditmesh_requests", "Generation requests by mode (json, sse) and status "
                                "(499: the client left)", ["mode", "status"], registry=self.registry)
        self.latency = Histogram("ditmesh_request_seconds", "Generation requests served, arrival to response",
                                 ["mode"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.mesh_seconds = Histogram("ditmesh_mesh_seconds", "Time of each request on the ranks (the runner call)",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sent = Counter("ditmesh_mesh_requests", "Requests sent to the ranks", registry=self.registry)
        self.queue_depth = Gauge("ditmesh_queue_depth", "Requests waiting for the mesh", registry=self.registry)
        self.in_flight = Gauge("ditmesh_requests_in_flight", "Requests on the mesh now (0 or 1)",
                               registry=self.registry)
        self.restarts = Counter("ditmesh_worker_restarts", "Restarts of the ranks after a rank died or hung",
                                registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
