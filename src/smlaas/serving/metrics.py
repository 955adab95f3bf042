"""The gateway's Prometheus metrics (one registry per gateway, served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from smlaas.serving.batcher import BatchStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU, resident memory, open files
        PlatformCollector(registry=self.registry)
        self.requests = Counter("smlaas_requests", "Inference requests by HTTP status",
                                ["model", "code"], registry=self.registry)
        self.errors = Counter("smlaas_errors", "Failed inference requests by reason",
                              ["model", "reason"], registry=self.registry)
        self.latency = Histogram("smlaas_request_duration_seconds",
                                 "Time from request received to response ready", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("smlaas_queue_depth", "Requests waiting for a batch",
                                 ["model"], registry=self.registry)
        self.queue_wait = Histogram("smlaas_queue_wait_seconds",
                                    "Time requests waited in the batching queue", ["model"],
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("smlaas_batch_size", "Rows per batch sent to the pipeline",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=self.registry)
        self.stage_time = Histogram("smlaas_stage_duration_seconds",
                                    "Run time of each stage per batch", ["model", "stage"],
                                    buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.abandoned = Gauge("smlaas_abandoned_requests",
                               "Requests withdrawn unrun because their client had gone",
                               ["model"], registry=self.registry)
        self.pipeline_up = Gauge("smlaas_pipeline_up",
                                 "1 when every stage answered the last readiness probe",
                                 ["model"], registry=self.registry)

    def record_batch(self, model: str, stats: BatchStats) -> None:
        self.batch_rows.labels(model).observe(stats.rows)
        for wait in stats.queue_wait_s:
            self.queue_wait.labels(model).observe(wait)

    def record_stages(self, model: str, stage_ms: list[float]) -> None:
        for index, ms in enumerate(stage_ms):
            self.stage_time.labels(model, str(index)).observe(ms / 1e3)
