"""The service's Prometheus metrics, in a registry of their own (one per app, so several apps can live in one process)."""

from __future__ import annotations

__all__ = ["ServeMetrics", "endpoint_label"]

_ENDPOINTS = {"/", "/search", "/search/batch", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def endpoint_label(path: str) -> str:
    """The route a request path belongs to (a bounded label set: every thumbnail is one label)."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/items/"):
        return "/items/{id}/thumbnail"
    return "other"


class ServeMetrics:
    """Requests by endpoint and status, errors by kind, latency and micro-batch size histograms."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("clipret_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("clipret_errors", "Requests refused or failed, by kind (too_large, bad_image, bad_vector, "
                              "bad_option, bad_request, no_text, unknown_id, unauthorized, not_found, not_ready, internal).",
                              ["kind"], registry=self.registry)
        self.latency = Histogram("clipret_request_seconds", "Time from request to response, by endpoint.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("clipret_batch_size", "Queries per micro-batch (one forward pass).",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("clipret_requests_in_flight", "Requests being answered now.", registry=self.registry)
        self.queries = Counter("clipret_queries", "Search queries answered, by kind (image, vector, id, text).", ["kind"],
                               registry=self.registry)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def observe(self, path: str, status: int, seconds: float) -> None:
        label = endpoint_label(path)
        self.requests.labels(endpoint=label, status=str(status)).inc()
        self.latency.labels(endpoint=label).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

