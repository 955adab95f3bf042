"""The gateway's Prometheus metrics (one registry per gateway, served at ``/metrics``): smlaas's
own, with a ``protocol`` label (rest, grpc) on the request counters, and beside them Triton's
``nv_inference_*`` counters with Triton's names and labels (``model``, ``version``), so that
existing Triton dashboards work (:func:`triton_metrics_text`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from smlaas.coordinator.manifest import GATEWAY_ROLE, stage_role
from smlaas.serving.batcher import BatchStats
from smlaas.serving.statistics import ModelStatistics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)


class StageReports(Collector):
    """What the stages said about themselves in the last describe that passed through them
    (see ``StageStats`` in the worker), as Prometheus metrics: per stage its requests, errors,
    expired requests, run time, queue depth, restarts (a new incarnation of the process, each
    one attested again), predicted working set and usable EPC, and for every role the seconds
    since its enclave was attested."""

    def __init__(self, model: str, *, gateway_attested_at: float | None = None) -> None:
        self.model = model
        self.gateway_attested_at = gateway_attested_at
        self._stages: dict[tuple[int, int], dict[str, Any]] = {}
        self._restarts: dict[tuple[int, int], int] = {}

    def update(self, reports: list[dict[str, Any]]) -> None:
        for report in reports:
            try:
                key = (int(report["index"]), int(report.get("replica", 0)))
            except (KeyError, TypeError, ValueError):
                continue
            previous = self._stages.get(key)
            if previous is not None and previous.get("incarnation") != report.get("incarnation"):
                self._restarts[key] = self._restarts.get(key, 0) + 1
            self._stages[key] = dict(report)

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "stage", "replica"]
        counters = {key: CounterMetricFamily(f"smlaas_stage_{key}", text, labels=labels)
                    for key, text in (
                        ("requests", "Requests a stage ran (a batch of n requests counts n), "
                                     "since its process started"),
                        ("batches", "Batches (runs of the model) a stage ran, since its "
                                    "process started"),
                        ("errors", "Requests a stage refused (bad input), since it started"),
                        ("expired", "Requests whose deadline passed before a stage ran them"),
                        ("run_seconds", "Seconds a stage spent running requests"),
                        ("receipt_seconds", "Seconds a stage spent hashing and signing "
                                            "receipts (outside its runs)"),
                        ("restarts", "New incarnations of a stage seen by the gateway"))}
        gauges = {key: GaugeMetricFamily(name, text, labels=labels) for key, name, text in (
            ("queue_depth", "smlaas_stage_queue_depth", "Requests waiting in a stage"),
            ("working_set_bytes", "smlaas_stage_predicted_working_set_bytes",
             "The plan's PREDICTED working set of a stage (cost model, not measured)"),
            ("usable_epc_bytes", "smlaas_stage_usable_epc_bytes",
             "The usable EPC the plan assumed for a stage's enclave"))}
        age = GaugeMetricFamily("smlaas_attestation_age_seconds",
                                "Seconds since the role's enclave was attested", labels=["role"])
        now = time.time()
        if self.gateway_attested_at is not None:
            age.add_metric([GATEWAY_ROLE], now - self.gateway_attested_at)
        for (index, replica), report in sorted(self._stages.items()):
            values = [self.model, str(index), str(replica)]
            for key in ("requests", "errors", "expired", "run_seconds", "receipt_seconds"):
                counters[key].add_metric(values, float(report.get(key, 0)))
            # A stage that does not count batches apart counts each run as one request.
            counters["batches"].add_metric(values, float(report.get("batches",
                                                                    report.get("requests", 0))))
            counters["restarts"].add_metric(values, float(self._restarts.get((index, replica),
                                                                             0)))
            gauges["queue_depth"].add_metric(values, float(report.get("queue_depth", 0)))
            for key in ("working_set_bytes", "usable_epc_bytes"):
                value = (report.get("predicted") or {}).get(key)
                if value is not None:
                    gauges[key].add_metric(values, float(value))
            if report.get("attested_at") is not None:
                age.add_metric([stage_role(index) + (f".r{replica}" if replica else "")],
                               now - float(report["attested_at"]))
        yield from counters.values()
        yield from gauges.values()
        yield age


class GatewayMetrics:
    def __init__(self, model: str = "", *, attested_at: float | None = None) -> None:
        self.registry = CollectorRegistry()
        self.stages = StageReports(model, gateway_attested_at=attested_at)
        self.registry.register(self.stages)
        ProcessCollector(registry=self.registry)  # CPU, resident memory, open files
        PlatformCollector(registry=self.registry)
        self.requests = Counter("smlaas_requests",
                                "Inference requests by HTTP status (gRPC: its HTTP equivalent)",
                                ["model", "code", "protocol"], registry=self.registry)
        self.errors = Counter("smlaas_errors", "Failed inference requests by reason",
                              ["model", "reason", "protocol"], registry=self.registry)
        self.latency = Histogram("smlaas_request_duration_seconds",
                                 "Time from request received to response ready",
                                 ["model", "protocol"], buckets=_LATENCY_BUCKETS,
                                 registry=self.registry)
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
        self.abandoned = Counter("smlaas_abandoned_requests",
                                 "Requests withdrawn unrun because their client had gone",
                                 ["model"], registry=self.registry)
        self.pipeline_up = Gauge("smlaas_pipeline_up",
                                 "1 when every stage answered the last readiness probe",
                                 ["model"], registry=self.registry)

        self.generation = GenerationMetrics(model, self.registry)

    def record_batch(self, model: str, stats: BatchStats) -> None:
        self.batch_rows.labels(model).observe(stats.rows)
        for wait in stats.queue_wait_s:
            self.queue_wait.labels(model).observe(wait)

    def record_stages(self, model: str, stage_ms: list[float]) -> None:
        for index, ms in enumerate(stage_ms):
            self.stage_time.labels(model, str(index)).observe(ms / 1e3)


class GenerationMetrics:
    """A decoder's generation: sequences in flight, tokens, time to first token, step rows."""

    def __init__(self, model: str, registry: CollectorRegistry) -> None:
        self.model = model
        self.sequences = Gauge("smlaas_generation_sequences",
                               "Sequences being generated", ["model"], registry=registry)
        self.tokens = Counter("smlaas_generation_tokens",
                              "Tokens of generation requests: the prompts' and the generated",
                              ["model", "kind"], registry=registry)
        self.first_token = Histogram("smlaas_time_to_first_token_seconds",
                                     "Time from a sequence's start to its first token",
                                     ["model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.step_rows = Histogram("smlaas_generation_step_rows",
                                   "Sequences batched in one generation step", ["model"],
                                   buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.sequences.labels(model)

    def started(self, prompt_tokens: int) -> None:
        self.sequences.labels(self.model).inc()
        self.tokens.labels(self.model, "prompt").inc(prompt_tokens)

    def ended(self) -> None:
        self.sequences.labels(self.model).dec()

    def generated(self, *, first_after_s: float | None = None) -> None:
        self.tokens.labels(self.model, "generated").inc()
        if first_after_s is not None:
            self.first_token.labels(self.model).observe(first_after_s)

    def step(self, rows: int) -> None:
        self.step_rows.labels(self.model).observe(rows)


def _us(phase: str) -> Callable[[ModelStatistics], int]:
    return lambda statistics: statistics.phases[phase].ns // 1000


def _count(phase: str) -> Callable[[ModelStatistics], int]:
    return lambda statistics: statistics.phases[phase].count


TRITON_COUNTERS: tuple[tuple[str, Callable[[ModelStatistics], int], str], ...] = (
    ("nv_inference_request_success", _count("success"),
     "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", _count("fail"),
     "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", lambda statistics: statistics.inference_count,
     "Number of inferences performed (does not include cached requests)"),
    ("nv_inference_exec_count", lambda statistics: statistics.execution_count,
     "Number of model executions performed (does not include cached requests)"),
    ("nv_inference_request_duration_us", _us("success"),
     "Cumulative inference request duration in microseconds (includes cached requests)"),
    ("nv_inference_queue_duration_us", _us("queue"),
     "Cumulative inference queuing duration in microseconds (includes cached requests)"),
    ("nv_inference_compute_input_duration_us", _us("compute_input"),
     "Cumulative compute input duration in microseconds (does not include cached requests)"),
    ("nv_inference_compute_infer_duration_us", _us("compute_infer"),
     "Cumulative compute inference duration in microseconds (does not include cached "
     "requests)"),
    ("nv_inference_compute_output_duration_us", _us("compute_output"),
     "Cumulative inference compute output duration in microseconds (does not include cached "
     "requests)"),
)
"""Triton's per-model counters: name, its value from the statistics extension's figures
(:class:`~smlaas.serving.statistics.ModelStatistics`, one source for both), Triton's help."""


def triton_metrics_text(statistics: ModelStatistics) -> bytes:
    """Triton's counters for one model, in the Prometheus text format exactly as Triton
    writes them: counters without the ``_total`` suffix (which prometheus_client would add),
    labelled ``model`` and ``version``."""
    labels = (f'{{model="{_label_value(statistics.name)}",'
              f'version="{_label_value(statistics.version)}"}}')
    lines = []
    for name, value, text in TRITON_COUNTERS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter",
                  f"{name}{labels} {value(statistics)}"]
    return ("\n".join(lines) + "\n").encode()


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
