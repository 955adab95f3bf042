"""The gateway benchmark's server-side figures, read from the gateway's own /metrics text."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from smlaas.bench.gateway import (
    SERVER_SIDE_TARGET_MS,
    ServerCounters,
    markdown,
    server_side_summary,
    threads_verdict,
)
from smlaas.serving.metrics import GatewayMetrics, triton_metrics_text
from smlaas.serving.statistics import ModelStatistics


def metrics_text(*, rest_s: list[float], grpc_s: list[float], stage_ms: list[float],
                 pipeline_s: float) -> str:
    """What a gateway serving model ``m`` shows at /metrics after those requests."""
    metrics, statistics = GatewayMetrics("m"), ModelStatistics("m")
    for seconds in rest_s:
        metrics.latency.labels("m", "rest").observe(seconds)
    for seconds in grpc_s:
        metrics.latency.labels("m", "grpc").observe(seconds)
    metrics.record_stages("m", stage_ms)
    statistics.phases["compute_infer"].add(pipeline_s)
    return (generate_latest(metrics.registry) + triton_metrics_text(statistics)).decode()


def test_one_request_is_the_difference_of_two_readings() -> None:
    before = ServerCounters.from_metrics(
        metrics_text(rest_s=[], grpc_s=[0.5], stage_ms=[], pipeline_s=0.0),
        model="m", protocol="rest")
    after = ServerCounters.from_metrics(
        metrics_text(rest_s=[0.045], grpc_s=[0.5], stage_ms=[43.0], pipeline_s=0.044),
        model="m", protocol="rest")
    one = after.minus(before)
    assert (one.requests, one.stage_runs) == (1, 1)  # the gRPC request is not counted
    assert one.server_side_ms == pytest.approx(2.0)
    assert one.hop_ms == pytest.approx(1.0)
    assert one.front_end_ms == pytest.approx(1.0)


def test_every_stage_run_counts_as_the_stage_time() -> None:
    counters = ServerCounters.from_metrics(
        metrics_text(rest_s=[], grpc_s=[0.05], stage_ms=[20.0, 25.0], pipeline_s=0.047),
        model="m", protocol="grpc")
    assert counters.stage_runs == 2
    assert counters.server_side_ms == pytest.approx(5.0)


def test_a_reading_that_is_not_one_request_is_refused() -> None:
    two = ServerCounters(requests=2, gateway_s=0.09, stage_runs=2, stage_s=0.086,
                         pipeline_us=88_000)
    with pytest.raises(ValueError, match="not one request"):
        server_side_summary([two])


def test_summary_judges_the_mean_against_the_target() -> None:
    costs = [ServerCounters(1, 0.0435, 1, 0.043, 43_200),
             ServerCounters(1, 0.0445, 1, 0.043, 43_300)]
    summary = server_side_summary(costs)
    assert summary["mean_ms"] == pytest.approx(1.0)
    assert summary["target_met"] is (summary["mean_ms"] <= SERVER_SIDE_TARGET_MS)
    assert server_side_summary(costs, judged=False)["target_met"] is None


def test_threads_verdict_and_table() -> None:
    entries = {label: {"threads": threads, "threads_per_stage": threads or 1, "stages": 3,
                       "max_batch_size": 8, "throughput_per_s": tput,
                       "throughput_per_round": [tput], "latency": {"p50_ms": 90.0,
                                                                   "p99_ms": 120.0},
                       "failed": 0}
               for label, threads, tput in (("default", None, 36.0), ("--threads 1", 1, 40.0),
                                            ("--threads 2", 2, 28.0))}
    verdict = threads_verdict(entries)
    assert verdict["best"] == "--threads 1"
    assert verdict["default_within_best"] is True  # 36 >= 0.9 * 40
    entries["default"]["throughput_per_s"] = 35.9
    assert threads_verdict(entries)["default_within_best"] is False
    table = markdown({"model": "resnet50", "clients": 4, "rounds": 1, "seconds_per_block": 10,
                      "warmup_s": 2, "threads_comparison": entries,
                      "verdict": threads_verdict(entries)})
    assert "NOT within 10% of the best" in table
