"""Triton's statistics extension: per-model counts and cumulative durations, in the JSON
shape of ``GET /v2/models/{name}/stats`` (``tritonclient``'s ``get_inference_statistics``
reads it; the gRPC ``ModelStatistics`` call returns the same figures).

Phases as Triton names them: ``queue`` (waiting in the batcher), ``compute_input`` (decoding
and checking the request), ``compute_infer`` (the pipeline, every stage), ``compute_output``
(encoding the response); ``success``/``fail`` are whole requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from smlaas.serving.batcher import BatchStats


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStatistics:
    name: str
    version: str = "1"
    inference_count: int = 0
    """Rows inferred (a batch of 4 counts 4)."""
    execution_count: int = 0
    """Pipeline runs (a batch of 4 requests counts 1)."""
    last_inference_ms: int = 0
    phases: dict[str, Duration] = field(default_factory=lambda: {
        phase: Duration() for phase in ("success", "fail", "queue", "compute_input",
                                        "compute_infer", "compute_output", "cache_hit",
                                        "cache_miss")})
    batches: dict[int, _BatchSizeStats] = field(default_factory=dict)

    def record_batch(self, stats: BatchStats) -> None:
        self.execution_count += 1
        self.inference_count += stats.rows
        for wait in stats.queue_wait_s:
            self.phases["queue"].add(wait)
        self.phases["compute_infer"].add(stats.run_s * stats.requests, stats.requests)
        self.batches.setdefault(stats.rows, _BatchSizeStats()).compute_infer.add(stats.run_s)

    def record_request(self, *, ok: bool, total_s: float, decode_s: float = 0.0,
                       encode_s: float = 0.0) -> None:
        self.phases["success" if ok else "fail"].add(total_s)
        if ok:
            self.phases["compute_input"].add(decode_s)
            self.phases["compute_output"].add(encode_s)
            self.last_inference_ms = int(time.time() * 1000)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {k: v.to_dict() for k, v in self.phases.items()},
                "batch_stats": [{"batch_size": size,
                                 "compute_input": b.compute_input.to_dict(),
                                 "compute_infer": b.compute_infer.to_dict(),
                                 "compute_output": b.compute_output.to_dict()}
                                for size, b in sorted(self.batches.items())]}
