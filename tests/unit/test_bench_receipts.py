"""The receipts benchmark's pure parts: options, the verdict, the time breakdown, the signers'
costs and the table (the measurement itself is `smlaas bench receipts`)."""

from __future__ import annotations

import numpy as np
import pytest

from smlaas.bench.gateway import ServerCounters
from smlaas.bench.receipt_costs import receipt_costs
from smlaas.bench.receipts import (
    ReceiptBenchOptions,
    _results,
    markdown,
    server_breakdown,
    targets_verdict,
)


def test_options_report_every_problem_at_once() -> None:
    assert ReceiptBenchOptions().validate() == []
    problems = ReceiptBenchOptions(clients=0, latency_requests=3, inputs=1).validate()
    assert len(problems) == 3
    assert any("clients" in p for p in problems) and any("inputs" in p for p in problems)


def test_verdict_judges_p50_latency_and_throughput_against_the_targets() -> None:
    latency = {"off": {"p50_ms": 50.0, "p99_ms": 60.0}, "on": {"p50_ms": 51.0, "p99_ms": 66.0}}
    verdict = targets_verdict(latency, {"off": 40.0, "on": 39.0})
    assert verdict["latency_p50_increase"] == pytest.approx(0.02)
    assert verdict["latency_p99_increase"] == pytest.approx(0.10)
    assert verdict["latency_met"]  # p99 is reported, the target is on p50
    assert verdict["throughput_loss"] == pytest.approx(0.025)
    assert not verdict["throughput_met"]


def test_breakdown_splits_a_request_into_its_parts() -> None:
    blocks = [ServerCounters(requests=10, gateway_s=0.5, stage_runs=30, stage_s=0.42,
                             pipeline_us=460_000.0)] * 2
    parts = server_breakdown(blocks, client_mean_ms=52.0)
    assert parts["requests"] == 20
    assert parts["stage_ms"] == pytest.approx(42.0)
    assert parts["hop_ms"] == pytest.approx(4.0)
    assert parts["front_end_ms"] == pytest.approx(4.0)
    assert parts["outside_ms"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no requests"):
        server_breakdown([], client_mean_ms=1.0)


def test_costs_time_every_signer_and_the_table_renders() -> None:
    x = np.zeros((1, 3, 8, 8), np.float32)
    costs = receipt_costs([(x.nbytes, 64), (64, 40)], b"request" * 10, b"response",
                          {"input": x}, {"output": np.zeros((1, 10), np.float32)}, repeats=2)
    assert [s["hashed_bytes"] for s in costs["stages"]] == [x.nbytes + 64, 40]  # sent only
    assert costs["total_ms"] > 0 and costs["receipt_bytes"] > 0
    server = {mode: [ServerCounters(4, 0.2, 12, 0.16, 180_000.0)] for mode in ("off", "on")}
    windows = {"off": [(40.0, [0.1, 0.1], 0)], "on": [(38.0, [0.11, 0.1], 0)]}
    verified = {"verified": 3, "simulated": True, "refused_against_other_request": True}
    results = _results(ReceiptBenchOptions(), {"stages": 2},
                       {"off": [0.05, 0.05, 0.051], "on": [0.052, 0.053, 0.052]}, windows,
                       verified, costs, server=server, receipt_sizes=[1800, 1900])
    assert results["verdict"]["throughput_loss"] == pytest.approx(0.05)
    text = markdown(results)
    assert "| on - off |" in text and "NOT met" in text and "SIMULATED" in text
