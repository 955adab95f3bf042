"""The floor under a hop: the same tensor messages over the same mutual TLS, and nothing else.

``smlaas bench gateway`` measures a hop (the gateway's wait for the pipeline minus the stage's
run) at 1.3 to 1.4 ms for a ResNet-50 input. This measures, in the same run, what moving those
bytes costs by itself: a process that only echoes (``python -m smlaas.bench.transport_floor``,
on 127.0.0.1) answers each request with a reply of the stage's output size, over
:class:`~smlaas.transport.streams.MessageStream` with the deployment's TLS settings
(:func:`~smlaas.transport.tls.server_context` and ``client_context``: TLS 1.3, certificates
from a :class:`~smlaas.coordinator.ca.DeploymentCA`), and once over plain TCP. What a hop costs
beyond this round trip is the handling on both sides: the link's bookkeeping, the worker's
decoding and queue, and the hand-over to the stage's run thread and back.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.bench.serving import percentiles
from smlaas.coordinator.ca import DeploymentCA
from smlaas.coordinator.server import free_port
from smlaas.errors import DeployError
from smlaas.serving.link import run_event_loop
from smlaas.transport.streams import MessageStream, open_stream, start_stream_server
from smlaas.transport.tensors import TensorMessage
from smlaas.transport.tls import client_context, server_context

START_TIMEOUT_S = 30.0
"""How long the echo process may take to listen."""
MANIFEST = "00" * 32
ECHO, ASKER = "stage-0", "gateway"


def transport_round_trip(tensors: Mapping[str, np.ndarray], reply_bytes: int, *,
                         requests: int = 200, warmup: int = 20) -> dict[str, Any]:
    """Round trips of ``tensors`` out and ``reply_bytes`` back, one at a time: p50 and p99
    (ms) over mutual TLS (``tls``) and plain TCP (``plain``), after ``warmup`` each."""
    with tempfile.TemporaryDirectory(prefix="smlaas-floor-") as tmp:
        folder = Path(tmp)
        ca = DeploymentCA.create()
        (folder / "ca.pem").write_text(ca.cert_pem())
        for role in (ECHO, ASKER):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = ca.issue(role, key.public_key(), manifest_digest=MANIFEST)
            (folder / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            key_path = folder / f"{role}.key"
            key_path.touch(mode=0o600)
            key_path.write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        tls_port, plain_port = free_port(), free_port()
        echo = subprocess.Popen(
            [sys.executable, "-m", "smlaas.bench.transport_floor", str(folder), str(tls_port),
             str(plain_port), str(reply_bytes)], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            context = client_context(*_identity(folder, ASKER), ca.cert_pem())
            samples = run_event_loop(_measure(
                {"tls": (tls_port, context), "plain": (plain_port, None)}, tensors,
                requests=requests, warmup=warmup, echo=echo))
        finally:
            echo.kill()
            echo.wait(timeout=30)
    return {**{mode: percentiles(values) for mode, values in samples.items()},
            "request_bytes": sum(np.asarray(v).nbytes for v in tensors.values()),
            "reply_bytes": reply_bytes, "requests": requests}


async def _measure(targets: Mapping[str, tuple[int, Any]], tensors: Mapping[str, np.ndarray],
                   *, requests: int, warmup: int, echo: subprocess.Popen[bytes]
                   ) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    for mode, (port, context) in targets.items():
        stream = await _connect(port, context, echo)
        try:
            durations = []
            for number in range(warmup + requests):
                started = time.perf_counter()
                stream.write(TensorMessage(str(number), dict(tensors), {"kind": "infer"}))
                await stream.drain()
                await asyncio.wait_for(stream.read(), START_TIMEOUT_S)
                durations.append(time.perf_counter() - started)
            samples[mode] = durations[warmup:]
        finally:
            stream.close()
    return samples


async def _connect(port: int, context: Any, echo: subprocess.Popen[bytes]) -> MessageStream:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            return await open_stream("127.0.0.1", port, ssl_context=context)
        except OSError as err:
            if echo.poll() is not None or time.monotonic() > deadline:
                error = echo.stderr.read().decode(errors="replace") if echo.stderr else ""
                raise DeployError(f"the echo process did not listen: {err} {error}") from err
            await asyncio.sleep(0.1)


def _identity(folder: Path, role: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = serialization.load_pem_private_key((folder / f"{role}.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return (folder / f"{role}.pem").read_text(), key


async def _echo(folder: Path, tls_port: int, plain_port: int, reply_bytes: int) -> None:
    reply = {"output": np.zeros(max(1, reply_bytes // 4), np.float32)}

    async def answer(stream: MessageStream) -> None:
        try:
            while True:
                frame = await stream.read()
                stream.write(TensorMessage(frame.request_id, reply, {"kind": "outputs"}))
                await stream.drain()
        except (EOFError, OSError):
            stream.close()

    context = server_context(*_identity(folder, ECHO), (folder / "ca.pem").read_text())
    await start_stream_server(answer, "127.0.0.1", tls_port, ssl_context=context)
    await start_stream_server(answer, "127.0.0.1", plain_port, ssl_context=None)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    run_event_loop(_echo(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                         int(sys.argv[4])))


def floor_lines(floor: Mapping[str, Any], hops_ms: Mapping[str, float]) -> list[str]:
    """Markdown: the round trip beside each served path's hop (mean ms)."""
    tls, plain = floor["tls"]["p50_ms"], floor["plain"]["p50_ms"]
    lines = ["", f"The transport alone, in the same run ({floor['request_bytes']:,} bytes out, "
                 f"{floor['reply_bytes']:,} back, an echo process, {floor['requests']} round "
                 f"trips): p50 **{tls:.2f} ms** over mutual TLS, {plain:.2f} ms over plain TCP."]
    lines += [f"- {path}: hop {hop:.2f} ms, of which {max(0.0, hop - tls):.2f} ms beyond moving "
              f"its bytes" for path, hop in hops_ms.items()]
    return lines
