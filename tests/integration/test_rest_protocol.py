"""The V2 REST protocol as Triton users meet it, over real sockets against a deployed model
with a large output (``x[N,16]`` -> ``wide = tile(relu(x))``, 131072 values a row, and
``total = sum(relu(x))``): the ``timeout`` parameter, sequence parameters, Triton's model
config, the extensions advertised, Triton's metric names, and JSON outputs bounded by their
size."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from smlaas.deploy.deployment import Deployment
from smlaas.deploy.launchers import LocalLauncher
from smlaas.export.sealed_build import seal_build
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileSettings
from tests.integration.serving_setup import cache_env, deployment, owner_key_path

WIDTH, REPEATS = 16, 8192
WIDE_VALUES = WIDTH * REPEATS
WIDE_MODEL = "wide"


def wide_model() -> onnx.ModelProto:
    """``x[N,16]`` -> ``wide[N,131072]`` (relu(x) tiled) and ``total[N,1]``: a 64-byte row in,
    512 KiB out, several MiB as JSON."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Tile", ["r", "repeats"], ["wide"], name="tile"),
             helper.make_node("ReduceSum", ["r", "axes"], ["total"], name="sum", keepdims=1)]
    graph = helper.make_graph(
        nodes, WIDE_MODEL, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("wide", TensorProto.FLOAT, ["N", WIDE_VALUES]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([1, REPEATS], np.int64), "repeats"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def wide_outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    relu = np.maximum(x, 0)
    return {"wide": np.tile(relu, (1, REPEATS)), "total": relu.sum(axis=1, keepdims=True)}


@contextlib.contextmanager
def wide_deployment(root: Path) -> Iterator[tuple[Deployment, LocalLauncher]]:
    """The wide model partitioned for 2 machines, sealed and deployed (batching as sealed)."""
    with cache_env(root / "cache"):
        path, build, keys = root / "wide.onnx", root / "build", root / "owner-keys.json"
        onnx.save(wide_model(), str(path))
        partition(str(path), build, input_size_specs=[f"x:1,{WIDTH}"],
                  cost_model=preset("sgx1"), options=PlanOptions(Planner.DP_THROUGHPUT, 2),
                  settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=1),
                  verify=False)
        seal_build(build, keys)
        from smlaas.coordinator.owner import OwnerKey

        OwnerKey.load_or_create(owner_key_path(root))
        launcher = LocalLauncher(root / "logs")
        with deployment(root, build, keys, launcher=launcher) as running:
            yield running, launcher


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with wide_deployment(tmp_path_factory.mktemp("rest-protocol")) as (running, _):
        yield running


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, WIDTH)).astype(np.float32)


def infer_body(x: np.ndarray, *, parameters: dict[str, Any] | None = None,
               outputs: list[dict[str, Any]] | None = None) -> tuple[bytes, dict[str, str]]:
    """``x`` as a binary input; outputs as JSON unless the parameters say otherwise."""
    request: dict[str, Any] = {"inputs": [{"name": "x", "datatype": "FP32",
                                           "shape": list(x.shape),
                                           "parameters": {"binary_data_size": x.nbytes}}]}
    if parameters is not None:
        request["parameters"] = parameters
    if outputs is not None:
        request["outputs"] = outputs
    head = json.dumps(request).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                "Accept-Encoding": "identity"}


def client(running: Deployment) -> httpx.Client:
    return httpx.Client(base_url=running.url, timeout=30,
                        verify=ssl.create_default_context(cafile=str(running.ca_path)))


def infer(running: Deployment, x: np.ndarray, **options: Any) -> httpx.Response:
    body, headers = infer_body(x, **options)
    with client(running) as http:
        return http.post(f"/v2/models/{WIDE_MODEL}/infer", content=body, headers=headers)


def test_the_timeout_parameter_gives_504_when_it_passes_and_400_when_malformed(
        served: Deployment) -> None:
    x = rows(1)
    late = infer(served, x, parameters={"timeout": 1})
    assert late.status_code == 504, late.text
    assert "timeout of 1 us" in late.json()["error"]
    generous = infer(served, x, parameters={"timeout": 60_000_000})  # capped at the gateway's
    assert generous.status_code == 200, generous.text
    for bad in (-1, "1s", 2.5):
        response = infer(served, x, parameters={"timeout": bad})
        assert response.status_code == 400 and "'timeout'" in response.json()["error"]
    triton = pytest.importorskip("tritonclient.http")
    utils = pytest.importorskip("tritonclient.utils")
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with _triton(served, triton) as connection, pytest.raises(
            utils.InferenceServerException, match="timeout of 1 us"):
        connection.infer(WIDE_MODEL, [tensor], timeout=1)


def test_sequence_parameters_are_400_on_a_model_without_sequences(served: Deployment) -> None:
    x = rows(1)
    for parameters in ({"sequence_id": 7}, {"sequence_id": "s", "sequence_start": True},
                       {"sequence_end": True}):
        response = infer(served, x, parameters=parameters)
        assert response.status_code == 400
        assert "sequence batching, which this model does not have" in response.json()["error"]
    triton = pytest.importorskip("tritonclient.http")
    utils = pytest.importorskip("tritonclient.utils")
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with _triton(served, triton) as connection:
        with pytest.raises(utils.InferenceServerException, match="sequence_id"):
            connection.infer(WIDE_MODEL, [tensor], sequence_id=3, sequence_start=True)
        assert connection.infer(WIDE_MODEL, [tensor]).as_numpy("total").shape == (1, 1)


def test_the_model_config_has_tritons_shape(served: Deployment) -> None:
    with client(served) as http:
        config = http.get(f"/v2/models/{WIDE_MODEL}/config").json()
    assert config["max_batch_size"] == served.max_batch_size == 8
    assert config["platform"] == "onnxruntime_onnx"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    # As in Triton: with batching, dims leave the batch dimension out.
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [WIDTH],
                                "format": "FORMAT_NONE"}]
    assert sorted(config["output"], key=lambda o: o["name"]) == [
        {"name": "total", "data_type": "TYPE_FP32", "dims": [1]},
        {"name": "wide", "data_type": "TYPE_FP32", "dims": [WIDE_VALUES]}]
    grpc_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import json_format

    parsed = json_format.ParseDict(config, grpc_config.ModelConfig())  # the gRPC form too
    assert parsed.input[0].data_type == grpc_config.TYPE_FP32


def test_only_the_extensions_that_work_are_advertised(served: Deployment) -> None:
    with client(served) as http:
        extensions = http.get("/v2").json()["extensions"]
        assert "model_repository" not in extensions
        assert http.post(f"/v2/repository/models/{WIDE_MODEL}/load").status_code == 404
        assert http.post("/v2/repository/index").status_code == 200  # the index alone
        assert http.get(f"/v2/models/{WIDE_MODEL}/stats").status_code == 200
        assert http.get(f"/v2/models/{WIDE_MODEL}/config").status_code == 200
    assert {"binary_tensor_data", "classification", "model_configuration",
            "statistics"} <= set(extensions)


def test_tritons_metric_names_are_there_after_a_request(served: Deployment) -> None:
    assert infer(served, rows(2), parameters={"binary_data_output": True}).status_code == 200
    with client(served) as http:
        text = http.get("/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    labels = f'{{model="{WIDE_MODEL}",version="1"}}'
    for name in ("nv_inference_request_success", "nv_inference_request_failure",
                 "nv_inference_count", "nv_inference_exec_count",
                 "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us"):
        assert f"# TYPE {name} counter" in text
        assert name + labels in values, name
    assert values["nv_inference_request_success" + labels] >= 1
    assert values["nv_inference_count" + labels] >= 2
    assert values["nv_inference_request_duration_us" + labels] > 0
    assert values[f'smlaas_requests_total{{code="200",model="{WIDE_MODEL}",'
                  f'protocol="rest"}}'] >= 1
    assert "# TYPE smlaas_abandoned_requests_total counter" in text
    assert any(key.startswith("smlaas_stage_batches_total{") for key in values)


def test_json_outputs_are_bounded_by_their_size(served: Deployment) -> None:
    x = rows(8, seed=3)
    refused = infer(served, x)
    assert refused.status_code == 400
    message = refused.json()["error"]
    assert "wide" in message and "ask for binary outputs" in message, message
    binary = infer(served, x, parameters={"binary_data_output": True})
    assert binary.status_code == 200
    length = int(binary.headers["Inference-Header-Content-Length"])
    head = json.loads(binary.content[:length])
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in head["outputs"]}
    offset, expected = length, wide_outputs(x)
    for output in head["outputs"]:
        got = np.frombuffer(binary.content, np.float32, count=sizes[output["name"]] // 4,
                            offset=offset).reshape(output["shape"])
        offset += sizes[output["name"]]
        np.testing.assert_allclose(got, expected[output["name"]], rtol=1e-6)
    small = infer(served, x, outputs=[{"name": "total"}])  # a small output as JSON is fine
    assert small.status_code == 200
    np.testing.assert_allclose(np.array(small.json()["outputs"][0]["data"]).reshape(8, 1),
                               expected["total"], rtol=1e-5)
    one_row = infer(served, x[:1])  # the large output of one row fits the bound
    assert one_row.status_code == 200
    wide = next(o for o in one_row.json()["outputs"] if o["name"] == "wide")
    np.testing.assert_allclose(np.array(wide["data"], np.float32), expected["wide"][0],
                               rtol=1e-6)


@contextlib.contextmanager
def _triton(running: Deployment, triton: Any) -> Iterator[Any]:
    connection = triton.InferenceServerClient(
        running.url.removeprefix("https://"), ssl=True,
        ssl_options={"ca_certs": str(running.ca_path)})
    try:
        yield connection
    finally:
        connection.close()
