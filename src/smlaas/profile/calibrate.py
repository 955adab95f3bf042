"""Measuring what the cost model needs and this machine can show: CPU clock, AES-GCM rate,
loopback transfer rate and latency, and native compute speed."""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from onnx import TensorProto, helper

from smlaas.profile.session import create_session, run_session

MIB = 1024 * 1024


@dataclass(frozen=True)
class Calibration:
    cpu_ghz: float | None
    aead_mib_per_s: float
    loopback_mib_per_s: float
    loopback_hop_latency_ms: float
    matmul_gflop_per_s: float
    threads: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def cpu_ghz() -> float | None:
    """The current clock of the first CPU from /proc/cpuinfo (None where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) / 1000.0
    except (OSError, ValueError):
        return None
    return None


def aead_rate_mib_per_s(*, chunk_bytes: int = 4 * MIB, seconds: float = 0.5) -> float:
    """AES-256-GCM encryption throughput of one core (the cryptography library, OpenSSL)."""
    cipher = AESGCM(AESGCM.generate_key(bit_length=256))
    data = os.urandom(chunk_bytes)
    nonce = os.urandom(12)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        cipher.encrypt(nonce, data, None)  # a fixed nonce is fine: nothing is kept
        done += chunk_bytes
    return done / MIB / (time.perf_counter() - start)


def loopback_rate(*, total_bytes: int = 256 * MIB, pings: int = 200,
                  timeout_s: float = 30.0) -> tuple[float, float]:
    """(MiB/s, one-way latency ms) of a TCP connection over 127.0.0.1."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(timeout_s)
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout_s)
            for _ in range(pings):
                conn.sendall(conn.recv(1))
            remaining = total_bytes
            while remaining:
                data = conn.recv(min(remaining, MIB))
                if not data:
                    break
                remaining -= len(data)
            conn.sendall(b"k")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        round_trips = []
        for _ in range(pings):
            start = time.perf_counter()
            client.sendall(b"p")
            client.recv(1)
            round_trips.append(time.perf_counter() - start)
        block = b"\0" * MIB
        start = time.perf_counter()
        for _ in range(total_bytes // MIB):
            client.sendall(block)
        client.recv(1)
        elapsed = time.perf_counter() - start
    thread.join(timeout_s)
    server.close()
    return total_bytes / MIB / elapsed, statistics.median(round_trips) * 1000.0 / 2


def matmul_gflop_per_s(*, threads: int, size: int = 1024, runs: int = 10) -> float:
    """Native compute speed: a size x size float32 MatMul in ONNX Runtime."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = create_session(model, threads=threads)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((size, size), dtype=np.float32) for n in "ab"}
    run_session(session, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run_session(session, feeds)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def calibrate(*, threads: int) -> Calibration:
    rate, latency = loopback_rate()
    return Calibration(cpu_ghz=cpu_ghz(), aead_mib_per_s=aead_rate_mib_per_s(),
                       loopback_mib_per_s=rate, loopback_hop_latency_ms=latency,
                       matmul_gflop_per_s=matmul_gflop_per_s(threads=threads),
                       threads=threads)


# -- the working-set constants ---------------------------------------------------------------
@dataclass(frozen=True)
class MemorySample:
    """One stage: the bytes the cost model sees and the working set measured natively."""

    label: str
    touched_weight_bytes: int
    peak_activation_bytes: int
    measured_bytes: int


@dataclass(frozen=True)
class MemoryFit:
    """``weight_factor`` and ``runtime_overhead_mib`` fitted to measured working sets."""

    weight_factor: float
    runtime_overhead_mib: float
    samples: int

    def predict_bytes(self, sample: MemorySample) -> float:
        return (self.weight_factor * sample.touched_weight_bytes + sample.peak_activation_bytes
                + self.runtime_overhead_mib * MIB)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fit_memory_constants(samples: list[MemorySample]) -> MemoryFit:
    """Least squares for ``measured = k_w * W + A + R`` over ``samples`` (W touched weight
    bytes, A peak activation bytes; the activations' coefficient stays 1), with k_w >= 0 and
    R >= 0.

    Residuals are relative (each divided by its measured size): the figure that matters is
    the relative error per stage, and in absolute terms the largest stages would decide R,
    which matters most for the small ones.

    Raises:
        ValueError: fewer than two samples, or every sample with the same weight bytes (k_w
            and R cannot be told apart).
    """
    usable = [s for s in samples if s.measured_bytes > 0]
    if len(usable) < 2 or len({s.touched_weight_bytes for s in usable}) < 2:
        raise ValueError(f"fitting weight_factor and runtime_overhead_mib needs at least two "
                         f"measured stages with different weight bytes, got {len(usable)}")
    measured = np.array([s.measured_bytes for s in usable], dtype=float)
    weights = np.array([s.touched_weight_bytes for s in usable], dtype=float)
    target = (measured - np.array([s.peak_activation_bytes for s in usable], dtype=float))
    scale = 1.0 / measured
    design = np.column_stack([weights, np.ones_like(weights)]) * scale[:, None]
    (k_w, runtime), *_ = np.linalg.lstsq(design, target * scale, rcond=None)
    if k_w < 0:  # the constrained optimum lies on an edge: refit on it
        k_w, runtime = 0.0, float(np.sum(target * scale * scale) / np.sum(scale * scale))
    if runtime < 0:
        k_w = float(np.sum(design[:, 0] * target * scale) / np.sum(design[:, 0] ** 2))
        runtime = 0.0
    return MemoryFit(weight_factor=float(max(k_w, 0.0)),
                     runtime_overhead_mib=float(max(runtime, 0.0)) / MIB, samples=len(usable))
