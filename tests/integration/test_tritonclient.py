"""tritonclient.http, tritonclient.grpc and tritonclient.grpc.aio, unmodified, over TLS with the
deployment CA, against a deployed resnet18 with gRPC on: every call a Triton user makes,
streaming included, and what it returned (the list is printed with -s, and each result is
asserted)."""

from __future__ import annotations

import asyncio
import queue

import numpy as np
import pytest

from smlaas.coordinator.server import free_port
from tests.integration.serving_setup import (
    MODEL,
    cache_env,
    deployment,
    random_image,
    sealed_build,
    whole_model_outputs,
)

RTOL, ATOL = 1e-4, 1e-5
http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
grpc_aio = pytest.importorskip("tritonclient.grpc.aio")
grpc_utils = pytest.importorskip("tritonclient.utils")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("triton")
    with cache_env(root / "cache"):
        build, keys = sealed_build(root, machines=2)
        labels = root / "labels.txt"
        labels.write_text("\n".join(f"class {i}" for i in range(1000)) + "\n")
        with deployment(root, build, keys, grpc_port=free_port(),
                        labels_path=labels) as running:
            yield running


def _top3(expected: np.ndarray) -> list[bytes]:
    order = np.argsort(-expected[0], kind="stable")[:3]
    return [f"{expected[0][i]:f}:{i}:class {i}".encode() for i in order]


def _assert_classified(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == (1, 3)
    for text, want in zip(got.reshape(-1), _top3(expected)):
        raw = text.encode() if isinstance(text, str) else bytes(text)  # JSON gives str
        score, index, label = raw.split(b":")
        want_score, want_index, want_label = want.split(b":")
        assert (index, label) == (want_index, want_label)
        assert abs(float(score) - float(want_score)) < 1e-3


@pytest.fixture(scope="module")
def image() -> tuple[np.ndarray, np.ndarray]:
    x = random_image(21)
    return x, whole_model_outputs(x)


def test_every_tritonclient_http_call(served, image) -> None:
    x, expected = image
    client = http.InferenceServerClient(served.url.removeprefix("https://"), ssl=True,
                                        ssl_options={"ca_certs": str(served.ca_path)})
    calls = {
        "is_server_live": client.is_server_live(),
        "is_server_ready": client.is_server_ready(),
        "is_model_ready": client.is_model_ready(MODEL),
        "get_server_metadata": client.get_server_metadata(),
        "get_model_metadata": client.get_model_metadata(MODEL),
        "get_model_config": client.get_model_config(MODEL),
        "get_model_repository_index": client.get_model_repository_index(),
    }
    for binary in (True, False):
        tensor = http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        result = client.infer(MODEL, [tensor], outputs=[
            http.InferRequestedOutput("fc", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("fc"), expected, rtol=RTOL, atol=ATOL)
        calls[f"infer(binary={binary})"] = "equal to the whole model"
    tensor = http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):
        result = client.infer(MODEL, [tensor], request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("fc"), expected, rtol=RTOL, atol=ATOL)
        calls[f"infer(compression={algorithm})"] = "equal to the whole model"
    for binary in (True, False):
        classified = client.infer(MODEL, [tensor], outputs=[
            http.InferRequestedOutput("fc", binary_data=binary, class_count=3)])
        _assert_classified(classified.as_numpy("fc"), expected)
        calls[f"infer(class_count=3, binary={binary})"] = list(classified.as_numpy("fc")[0])
    pending = client.async_infer(MODEL, [tensor])
    np.testing.assert_allclose(pending.get_result().as_numpy("fc"), expected, rtol=RTOL,
                               atol=ATOL)
    calls["async_infer"] = "equal to the whole model"
    calls["get_inference_statistics(model)"] = client.get_inference_statistics(MODEL)
    calls["get_inference_statistics(all)"] = client.get_inference_statistics()
    with pytest.raises(grpc_utils.InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")
    calls["get_model_metadata(unknown)"] = "InferenceServerException: unknown model"
    client.close()
    _report("http", calls)
    assert calls["is_server_live"] and calls["is_server_ready"] and calls["is_model_ready"]
    assert calls["get_server_metadata"]["extensions"] == [
        "binary_tensor_data", "classification", "model_configuration", "statistics",
        "smlaas_attestation"]
    assert calls["get_model_metadata"]["inputs"][0]["shape"] == [-1, 3, 224, 224]
    assert calls["get_model_config"]["max_batch_size"] == 8
    assert calls["get_model_repository_index"][0]["name"] == MODEL
    stats = calls["get_inference_statistics(model)"]["model_stats"][0]
    assert stats["name"] == MODEL and stats["inference_count"] >= 5
    assert stats["inference_stats"]["success"]["count"] >= 5
    assert calls["get_inference_statistics(all)"]["model_stats"][0]["name"] == MODEL


def test_every_tritonclient_grpc_call(served, image) -> None:
    x, expected = image
    assert served.grpc_address is not None
    client = grpc.InferenceServerClient(served.grpc_address, ssl=True,
                                        root_certificates=str(served.ca_path))
    calls = {
        "is_server_live": client.is_server_live(),
        "is_server_ready": client.is_server_ready(),
        "is_model_ready": client.is_model_ready(MODEL),
        "is_model_ready(unknown)": client.is_model_ready("nope"),
        "get_server_metadata": client.get_server_metadata(as_json=True),
        "get_model_metadata": client.get_model_metadata(MODEL, as_json=True),
        "get_model_config": client.get_model_config(MODEL, as_json=True),
        "get_model_repository_index": client.get_model_repository_index(as_json=True),
    }
    tensor = grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(MODEL, [tensor], outputs=[grpc.InferRequestedOutput("fc")])
    np.testing.assert_allclose(result.as_numpy("fc"), expected, rtol=RTOL, atol=ATOL)
    calls["infer"] = "equal to the whole model"
    classified = client.infer(MODEL, [tensor], outputs=[
        grpc.InferRequestedOutput("fc", class_count=3)])
    _assert_classified(classified.as_numpy("fc"), expected)
    calls["infer(class_count=3)"] = list(classified.as_numpy("fc")[0])
    answers: queue.Queue = queue.Queue()
    client.async_infer(MODEL, [tensor], callback=lambda result, error: answers.put(
        (result, error)))
    result, error = answers.get(timeout=60)
    assert error is None
    np.testing.assert_allclose(result.as_numpy("fc"), expected, rtol=RTOL, atol=ATOL)
    calls["async_infer"] = "equal to the whole model"
    calls.update(_stream_calls(served, client, tensor, expected))
    calls["get_inference_statistics"] = client.get_inference_statistics(MODEL, as_json=True)
    errors = {}
    for label, call, status in (
            ("infer(unknown model)", lambda: client.infer("nope", [tensor]), "NOT_FOUND"),
            ("infer(bad shape)", lambda: client.infer(MODEL, [_bad_input()]),
             "INVALID_ARGUMENT"),
            ("infer(deadline 1 ms)", lambda: client.infer(MODEL, [tensor], client_timeout=0.001),
             "DEADLINE_EXCEEDED")):
        with pytest.raises(grpc_utils.InferenceServerException) as caught:
            call()
        errors[label] = caught.value.status()
        assert status in str(caught.value.status()), (label, caught.value)
    calls.update(errors)
    client.close()
    _report("grpc", calls)
    assert calls["is_server_live"] and calls["is_server_ready"] and calls["is_model_ready"]
    assert calls["is_model_ready(unknown)"] is False
    assert "statistics" in calls["get_server_metadata"]["extensions"]
    assert calls["get_model_metadata"]["inputs"][0]["shape"] == ["-1", "3", "224", "224"]
    config = calls["get_model_config"]["config"]
    assert config["max_batch_size"] == 8
    assert [(t["name"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("input", [3, 224, 224])]
    stats = calls["get_inference_statistics"]["model_stats"][0]
    assert stats["name"] == MODEL and int(stats["execution_count"]) >= 2


def _stream_calls(served, client, tensor, expected: np.ndarray) -> dict[str, object]:
    """start_stream / async_stream_infer / stop_stream: every answer by its request id, equal
    to the whole model, and a bad request answered on the stream with its id."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for index in range(4):
        client.async_stream_infer(MODEL, [tensor], request_id=f"stream-{index}",
                                  outputs=[grpc.InferRequestedOutput("fc")])
    client.async_stream_infer(MODEL, [_bad_input()], request_id="stream-bad")
    client.stop_stream()  # waits for every answer
    results, errors = {}, []
    while not answers.empty():
        result, error = answers.get_nowait()
        if error is not None:
            errors.append(str(error))
            continue
        results[result.get_response().id] = result.as_numpy("fc")
    assert sorted(results) == [f"stream-{index}" for index in range(4)]
    for got in results.values():
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert len(errors) == 1 and "[request id: stream-bad] INVALID_ARGUMENT" in errors[0], errors
    return {"start_stream/async_stream_infer x4/stop_stream": "equal to the whole model",
            "async_stream_infer(bad shape)": errors[0],
            **asyncio.run(_aio_calls(served, tensor, expected))}


async def _aio_calls(served, tensor, expected: np.ndarray) -> dict[str, object]:
    """tritonclient.grpc.aio's infer and stream_infer over its own channel."""
    client = grpc_aio.InferenceServerClient(served.grpc_address, ssl=True,
                                            root_certificates=str(served.ca_path))
    try:
        result = await client.infer(MODEL, [tensor], request_id="aio")
        assert result.get_response().id == "aio"
        np.testing.assert_allclose(result.as_numpy("fc"), expected, rtol=RTOL, atol=ATOL)

        async def requests():
            for index in range(3):
                yield {"model_name": MODEL, "inputs": [tensor], "request_id": f"aio-{index}"}

        ids = []
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            np.testing.assert_allclose(result.as_numpy("fc"), expected, rtol=RTOL, atol=ATOL)
            ids.append(result.get_response().id)
        assert sorted(ids) == ["aio-0", "aio-1", "aio-2"]
        server_ready = await client.is_server_ready()
    finally:
        await client.close()
    assert server_ready
    return {"aio infer": "equal to the whole model",
            "aio stream_infer x3": "equal to the whole model"}


def _bad_input():
    tensor = grpc.InferInput("input", [1, 3, 10, 10], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 10, 10), np.float32))
    return tensor


def _report(protocol: str, calls: dict) -> None:
    print(f"\ntritonclient.{protocol}:")
    for name, result in calls.items():
        text = str(result)
        print(f"  {name}: {text[:160]}{'...' if len(text) > 160 else ''}")
