"""The transport floor: tensor messages over the deployment's mutual TLS to an echo process."""

from __future__ import annotations

import numpy as np

from smlaas.bench.transport_floor import floor_lines, transport_round_trip


def test_round_trips_over_mutual_tls_and_plain_tcp() -> None:
    tensors = {"input": np.ones((1, 64, 64), np.float32)}
    floor = transport_round_trip(tensors, reply_bytes=400, requests=10, warmup=2)
    assert floor["request_bytes"] == 64 * 64 * 4 and floor["requests"] == 10
    for mode in ("tls", "plain"):
        assert 0 < floor[mode]["p50_ms"] <= floor[mode]["p99_ms"] < 1000
    lines = floor_lines(floor, {"grpc": 1.5})
    assert "over mutual TLS" in lines[1]
    assert lines[2].startswith("- grpc: hop 1.50 ms, of which ")
