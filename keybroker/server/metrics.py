"""The key server's Prometheus metrics (prometheus-client), one registry per server.

Under ``keybroker serve`` the workers share them through prometheus-client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor): each worker writes its own file
and ``render`` sums them, so any worker answers /metrics for all.

Label values come from small fixed sets (route names, providers, results, denial causes),
never from what a client sends, so a hostile client cannot grow them.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

#: Request latency buckets in seconds: from a cached token check to a slow verification.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("keybroker_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("keybroker_http_request_duration_seconds", "Time to answer a request, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.attestations = Counter("keybroker_attestations", "Attestations, by TEE and result (verified, denied)",
                                    ["provider", "result"], registry=self.registry)
        self.releases = Counter("keybroker_releases", "Resources released, by TEE", ["provider"],
                                registry=self.registry)
        self.denials = Counter("keybroker_denials", "Refused attestations and releases, by cause", ["reason"],
                               registry=self.registry)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def attestation(self, provider: str, verified: bool) -> None:
        self.attestations.labels(provider or "unknown", "verified" if verified else "denied").inc()

    def release(self, provider: str) -> None:
        self.releases.labels(provider or "unknown").inc()

    def denial(self, reason: str) -> None:
        self.denials.labels(reason).inc()

    def render(self) -> bytes:
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not shared:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=shared)
        return generate_latest(registry)
