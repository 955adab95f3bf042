"""The gateway's REST front end and data plane in one process, over stages faked in memory
(``httpx.ASGITransport``), and its HTTP protocol's connection limits under a real uvicorn on
loopback with several 127.0.0.x source addresses: JSON output bounds, the ``timeout`` and
sequence parameters, Triton's model config, extensions and metric names, and connections
that cannot hold the request cap."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from smlaas.errors import Status
from smlaas.serving.data_plane import DataPlane, GatewaySettings
from smlaas.serving.gateway import create_app
from smlaas.serving.http_limits import CONNECTION_EXTENSION, ConnectionLedger, deadline_protocol
from smlaas.serving.protocol import Describe, Description, Failure, Infer, Outputs, TensorSpec

WIDTH, WIDE = 4, 1000
MODEL = "m"


class FakeStages:
    """The pipeline in memory: ``y = 2x`` and ``wide`` (x's first column repeated WIDE
    times), after ``delay_s``; a request past its deadline is refused as a stage would."""

    role = "stage-0"

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.runs: list[Infer] = []

    async def describe(self, message: Describe, **_: Any) -> Description:
        return Description(
            (TensorSpec("x", "float32", [None, WIDTH]),),
            (TensorSpec("y", "float32", [None, WIDTH]),
             TensorSpec("wide", "float32", [None, WIDE])),
            (0,))

    async def request(self, message: Infer, **_: Any) -> Outputs | Failure:
        self.runs.append(message)
        await asyncio.sleep(self.delay_s)
        if message.expired():
            return Failure(Status.DEADLINE, "deadline passed before stage 0")
        x = message.tensors["x"]
        return Outputs({"y": x * 2, "wide": np.repeat(x[:, :1], WIDE, 1)},
                       (self.delay_s * 1e3,))

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def gateway(stages: FakeStages, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    options: dict[str, Any] = {"model_name": MODEL, "max_batch_size": 8,
                               "max_queue_delay_us": 1000, **settings}
    gateway_settings = GatewaySettings(**options)
    plane = DataPlane(gateway_settings, stages)
    app = create_app(gateway_settings, stages, plane=plane)
    await plane.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gateway", timeout=10) as client:
            yield client
    finally:
        await plane.stop()


def infer_json(rows: int, *, parameters: dict[str, Any] | None = None,
               outputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    x = np.arange(rows * WIDTH, dtype=np.float32).reshape(rows, WIDTH)
    body: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, WIDTH],
                                        "data": x.ravel().tolist()}]}
    if parameters is not None:
        body["parameters"] = parameters
    if outputs is not None:
        body["outputs"] = outputs
    return body


URL = f"/v2/models/{MODEL}/infer"


def test_json_outputs_past_the_bound_are_refused_before_anything_runs() -> None:
    limit = 2 + 2 * WIDE * 25 + 2 + 2 * WIDTH * 25  # both outputs of 2 rows as JSON, at worst

    async def main() -> None:
        stages = FakeStages()
        async with gateway(stages, max_json_response_bytes=limit) as client:
            ok = await client.post(URL, json=infer_json(2))
            assert ok.status_code == 200, ok.text
            assert len(ok.json()["outputs"][1]["data"]) == 2 * WIDE
            runs = len(stages.runs)
            refused = await client.post(URL, json=infer_json(3))
            assert refused.status_code == 400
            message = refused.json()["error"]
            assert "ask for binary outputs" in message and "binary_data_output" in message
            assert len(stages.runs) == runs  # refused before the pipeline saw it
            binary = await client.post(URL, json=infer_json(8, parameters={
                "binary_data_output": True}))
            assert binary.status_code == 200
            only_small = await client.post(URL, json=infer_json(8, outputs=[
                {"name": "y"}, {"name": "wide", "parameters": {"binary_data": True}}]))
            assert only_small.status_code == 200, only_small.text

    asyncio.run(main())


def test_the_timeout_parameter_sets_the_deadline_capped_by_the_gateways() -> None:
    async def main() -> None:
        async with gateway(FakeStages(delay_s=0.4), request_timeout_s=1.0) as client:
            started = time.monotonic()
            short = await client.post(URL, json=infer_json(1, parameters={"timeout": 100_000}))
            assert short.status_code == 504, short.text
            assert time.monotonic() - started < 0.35
            assert "timeout of 100000 us" in short.json()["error"]
            generous = await client.post(URL, json=infer_json(1, parameters={
                "timeout": 5_000_000}))
            assert generous.status_code == 200, generous.text
            for bad in (-5, "soon", 0.5, True):
                response = await client.post(URL, json=infer_json(1, parameters={
                    "timeout": bad}))
                assert response.status_code == 400 and "timeout" in response.json()["error"]
        async with gateway(FakeStages(delay_s=1.5), request_timeout_s=0.3) as client:
            capped = await client.post(URL, json=infer_json(1, parameters={
                "timeout": 60_000_000}))
            assert capped.status_code == 504
            assert "gateway's request timeout of 0.3 s" in capped.json()["error"]

    asyncio.run(main())


def test_a_stage_gets_the_requests_deadline_and_the_batchs_request_count() -> None:
    async def main() -> None:
        stages = FakeStages(delay_s=0.05)
        async with gateway(stages, request_timeout_s=30.0) as client:
            before = time.time()
            answers = await asyncio.gather(*(client.post(URL, json=infer_json(1, parameters={
                "timeout": 2_000_000})) for _ in range(3)))
            assert all(a.status_code == 200 for a in answers)
        assert all(before < run.deadline < before + 2.5 for run in stages.runs)
        assert sum(run.requests for run in stages.runs) == 3

    asyncio.run(main())


def test_sequence_parameters_on_a_model_without_sequences_are_400() -> None:
    async def main() -> None:
        async with gateway(FakeStages()) as client:
            for parameters in ({"sequence_id": 42}, {"sequence_id": 1, "sequence_start": True},
                               {"sequence_end": True}):
                response = await client.post(URL, json=infer_json(1, parameters=parameters))
                assert response.status_code == 400
                assert "does not have" in response.json()["error"]
            zero = await client.post(URL, json=infer_json(1, parameters={"sequence_id": 0}))
            assert zero.status_code == 200

    asyncio.run(main())


def test_the_model_config_is_tritons_and_the_extensions_are_those_that_work() -> None:
    async def main() -> dict[str, Any]:
        async with gateway(FakeStages(), max_queue_delay_us=700) as client:
            config = (await client.get(f"/v2/models/{MODEL}/config")).json()
            extensions = (await client.get("/v2")).json()["extensions"]
            for path in (f"/v2/repository/models/{MODEL}/load",
                         f"/v2/repository/models/{MODEL}/unload"):
                assert (await client.post(path)).status_code == 404
            assert "model_repository" not in extensions
            assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(
                extensions)
            return dict(config)

    config = asyncio.run(main())
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 700}
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [WIDTH],
                                "format": "FORMAT_NONE"}]
    assert config["output"] == [{"name": "y", "data_type": "TYPE_FP32", "dims": [WIDTH]},
                                {"name": "wide", "data_type": "TYPE_FP32", "dims": [WIDE]}]
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import json_format

    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert list(parsed.input[0].dims) == [WIDTH] and parsed.max_batch_size == 8


def test_metrics_have_tritons_names_and_a_protocol_label() -> None:
    async def main() -> str:
        async with gateway(FakeStages()) as client:
            for _ in range(2):
                assert (await client.post(URL, json=infer_json(2))).status_code == 200
            assert (await client.post(URL, json={"inputs": []})).status_code == 400
            return (await client.get("/metrics")).text

    text = asyncio.run(main())
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text)
               for sample in family.samples}  # the parser names every counter ..._total
    assert 'nv_inference_request_success{model="m",version="1"} 2' in text.splitlines()
    triton = (("model", MODEL), ("version", "1"))
    assert samples[("nv_inference_request_success_total", triton)] == 2
    assert samples[("nv_inference_request_failure_total", triton)] == 1
    assert samples[("nv_inference_count_total", triton)] == 4
    assert 1 <= samples[("nv_inference_exec_count_total", triton)] <= 2
    for name in ("nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us"):
        assert (f"{name}_total", triton) in samples
    assert samples[("smlaas_requests_total", (("code", "200"), ("model", MODEL),
                                              ("protocol", "rest")))] == 2
    assert "# TYPE nv_inference_request_success counter" in text
    assert "# TYPE smlaas_abandoned_requests_total counter" in text \
        or "# TYPE smlaas_abandoned_requests counter" in text


# -- the HTTP protocol's connection limits, under uvicorn on loopback ------------------------
class _Connection:
    def __init__(self, source: str, *, served: int = 0, waiting: bool = True) -> None:
        self.source, self.served, self.waiting = source, served, waiting
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def test_the_ledger_makes_room_from_the_source_holding_the_most() -> None:
    ledger = ConnectionLedger(max_open=3, max_per_source=3)
    hog = [_Connection("10.0.0.1") for _ in range(3)]
    assert all(ledger.admit(c) for c in hog)
    hog[0].served = 1  # idle after a request: goes after those that never completed one
    assert ledger.admit(fourth := _Connection("10.0.0.1"))  # its own oldest new one goes
    assert hog[1].evicted and not hog[0].evicted and ledger.held_by("10.0.0.1") == 3
    other = _Connection("10.0.0.2")
    assert ledger.admit(other)  # at max_open: the largest source makes room
    assert hog[2].evicted and ledger.open == 3
    for connection in (hog[0], fourth, other):
        connection.waiting = False  # all busy: nothing to evict
    assert not ledger.admit(_Connection("10.0.0.3")) and ledger.refused == 1
    ledger.release(other)
    assert ledger.admit(_Connection("10.0.0.3")) and ledger.open == 3
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionLedger(max_open=0)


class _Server:
    """uvicorn with the gateway's HTTP protocol on 127.0.0.1, in a thread."""

    def __init__(self, app: Any, **limits: Any) -> None:
        protocol = deadline_protocol(header_timeout_s=limits.pop("header_timeout_s", 5.0),
                                     body_timeout_s=5.0, **limits)
        self.config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                     http=protocol, limit_concurrency=2, lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.ledger = protocol.ledger

    @contextlib.contextmanager
    def running(self) -> Iterator[int]:
        self.thread.start()
        end = time.monotonic() + 10
        while not self.server.started and time.monotonic() < end:
            time.sleep(0.02)
        assert self.server.started
        port = self.server.servers[0].sockets[0].getsockname()[1]
        try:
            yield port
        finally:
            self.server.should_exit = True
            self.thread.join(10)


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def _get(port: int, source: str, path: str = "/fast") -> int:
    with _connect(port, source) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(1024)
            if not chunk:
                return -1
            head += chunk
        return int(head.split(b" ", 2)[1])


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _app(seen_gone: list[bool], release: threading.Event) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            gone = scope["extensions"][CONNECTION_EXTENSION]["gone"]
            seen_gone.append(gone())
            while not release.is_set() and not gone():
                await asyncio.sleep(0.01)
            seen_gone.append(gone())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_connections_sending_headers_slowly_cannot_hold_the_request_cap() -> None:
    """uvicorn alone answers 503 once its *connections* reach limit_concurrency (2 here):
    idle and slow-header connections from many sources held it (issue 18)."""
    release = threading.Event()
    server = _Server(_app([], release), max_open_connections=6,
                     max_connections_per_source=2)
    with server.running() as port:
        slow = []
        for index in range(10):  # 5 sources, 2 each; past max_open the largest make room
            sock = _connect(port, f"127.0.0.{10 + index // 2}")
            sock.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(sock)
        time.sleep(0.2)
        assert server.ledger is not None and server.ledger.open <= 6
        assert [_get(port, "127.0.0.2") for _ in range(3)] == [200, 200, 200]
        more = [_connect(port, "127.0.0.10") for _ in range(3)]  # past its 2: own old ones go
        time.sleep(0.2)
        assert server.ledger.held_by("127.0.0.10") <= 2 and server.ledger.open <= 6
        assert sum(_closed_by_server(sock) for sock in slow + more) >= len(slow + more) - 6
        assert _get(port, "127.0.0.3") == 200
        for sock in slow + more:
            sock.close()


def test_requests_in_progress_still_meet_the_cap_and_see_their_client_go() -> None:
    seen_gone: list[bool] = []
    release = threading.Event()
    server = _Server(_app(seen_gone, release), max_connections_per_source=4)
    with server.running() as port:
        busy = [_connect(port, f"127.0.0.{20 + n}") for n in range(2)]
        for sock in busy:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        assert _get(port, "127.0.0.30") == 503  # two requests in progress: the cap
        busy[0].close()  # its client goes: the request sees it at once
        deadline = time.monotonic() + 5
        while len(seen_gone) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen_gone[:2] == [False, False] and seen_gone[2] is True
        release.set()
        assert busy[1].recv(64).startswith(b"HTTP/1.1 200")
        busy[1].close()
        time.sleep(0.05)
        assert _get(port, "127.0.0.30") == 200


def test_the_body_budget_bounds_bytes_read_at_once_in_all_and_per_source() -> None:
    from smlaas.serving.http_bodies import BodyBudget

    async def main() -> None:
        budget = BodyBudget(100, per_source_bytes=40)
        order: list[str] = []

        async def read(source: str, size: int, hold_s: float, name: str) -> None:
            async with budget.reserve(source, size, timeout_s=2):
                order.append(name)
                await asyncio.sleep(hold_s)

        first = asyncio.ensure_future(read("a", 40, 0.1, "a1"))
        await asyncio.sleep(0.01)
        same_source = asyncio.ensure_future(read("a", 10, 0, "a2"))  # past a's share: waits
        others = [asyncio.ensure_future(read(s, 30, 0.1, s)) for s in ("b", "c")]
        await asyncio.sleep(0.01)
        assert order == ["a1", "b", "c"] and budget.held_bytes == 100
        late = asyncio.ensure_future(read("d", 30, 0, "d"))  # past the total: waits
        await asyncio.sleep(0.01)
        assert "d" not in order
        await asyncio.gather(first, same_source, *others, late)
        assert set(order[3:]) == {"a2", "d"} and budget.held_bytes == 0
        async with budget.reserve("e", 10**9):  # larger than the budget: read alone
            assert budget.held_bytes == 100
            with pytest.raises(TimeoutError):
                async with budget.reserve("f", 1, timeout_s=0.05):
                    pass
        assert budget.held_bytes == 0 and not budget._waiters

    asyncio.run(main())
