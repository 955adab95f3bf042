"""The deployed pipeline against real clients over real sockets: the SDK, tritonclient.http
and raw HTTP (JSON and binary), bad input, metrics, attestation evidence, batching."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from smlaas.client import InferenceClient
from smlaas.deploy.deployment import Deployment
from smlaas.enclave import Policy
from smlaas.errors import AttestationError, PolicyError, ServingError
from tests.integration.serving_setup import (
    MODEL,
    cache_env,
    deployment,
    random_image,
    sealed_build,
    stage_metrics,
    wait_for_stage_metrics,
    whole_model_outputs,
)

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("served")
    with cache_env(root / "cache"):
        build, keys = sealed_build(root)
        with deployment(root, build, keys) as running:
            yield running


@pytest.fixture(scope="module")
def image_and_expected() -> tuple[np.ndarray, np.ndarray]:
    x = random_image(1)
    return x, whole_model_outputs(x)


def verify(served: Deployment) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(served.ca_path))


def client(served: Deployment) -> InferenceClient:
    return served.client()


def test_deployment_has_three_stages_and_batching(served: Deployment) -> None:
    assert served.stage_count >= 3
    assert served.max_batch_size == 8, served.batching_note


@pytest.mark.parametrize("binary", [True, False])
def test_sdk_output_equals_the_whole_model(served: Deployment, image_and_expected,
                                           binary: bool) -> None:
    x, expected = image_and_expected
    with client(served) as sdk:
        outputs = sdk.infer({"input": x}, binary=binary)
    np.testing.assert_allclose(outputs["fc"], expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_works_unmodified(served: Deployment, image_and_expected,
                                       binary: bool) -> None:
    triton = pytest.importorskip("tritonclient.http")
    x, expected = image_and_expected
    url = served.url.removeprefix("https://")
    triton_client = triton.InferenceServerClient(url, ssl=True,
                                                 ssl_options={"ca_certs": str(served.ca_path)})
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    metadata = triton_client.get_model_metadata(MODEL)
    assert metadata["inputs"][0]["shape"] == [-1, 3, 224, 224]
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = triton_client.infer(MODEL, [tensor], outputs=[
        triton.InferRequestedOutput("fc", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("fc"), expected, rtol=RTOL, atol=ATOL)
    triton_client.close()


def test_curl_json_request(served: Deployment, image_and_expected, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    x, expected = image_and_expected
    body = tmp_path / "request.json"
    body.write_text(json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                            "shape": list(x.shape),
                                            "data": x.ravel().tolist()}]}))
    result = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--cacert", str(served.ca_path), "-H",
         "Content-Type: application/json", "--data-binary", f"@{body}",
         f"{served.url}/v2/models/{MODEL}/infer"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout
    output = json.loads(result.stdout)["outputs"][0]
    got = np.asarray(output["data"], np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_plain_tls_client_without_the_ca_is_refused(served: Deployment) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{served.url}/v2/health/live", verify=ssl.create_default_context())


@pytest.mark.parametrize(("request_body", "headers", "message"), [
    (b"{not json", {}, "not valid JSON"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1],
                             "data": [1]}]}).encode(), {}, "unknown input 'image'"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 3, 224, 224],
                             "data": [0]}]}).encode(), {}, "expects FP32"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                             "data": [0.0] * 3072}]}).encode(), {}, "has shape [1, 3, 32, 32]"),
    (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224],
                             "parameters": {"binary_data_size": 12}}]}).encode() + bytes(12),
     {"Inference-Header-Content-Length": "124"}, "binary_data_size is 12"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "x"}, "must be an integer"),
], ids=["malformed-json", "wrong-name", "wrong-dtype", "wrong-shape", "wrong-byte-count",
        "malformed-binary-header"])
def test_bad_requests_get_400_naming_the_problem(served: Deployment, request_body: bytes,
                                                 headers: dict[str, str],
                                                 message: str) -> None:
    if "Inference-Header-Content-Length" in headers and headers[
            "Inference-Header-Content-Length"].isdigit():
        headers = {"Inference-Header-Content-Length":
                   str(request_body.index(b"}]}") + 3)}
    response = httpx.post(f"{served.url}/v2/models/{MODEL}/infer", content=request_body,
                          headers=headers, verify=verify(served))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_oversized_body_is_refused_before_it_is_read(served: Deployment) -> None:
    host, port = served.url.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            verify(served).wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\n"
                    f"Content-Length: {1 << 30}\r\n\r\n".encode())
        answer = ""
        while not answer.endswith("}"):
            chunk = tls.recv(65536).decode(errors="replace")
            if not chunk:
                break
            answer += chunk
    assert answer.startswith("HTTP/1.1 400") and "this model's inputs can take" in answer


def test_unknown_model_is_404(served: Deployment) -> None:
    response = httpx.get(f"{served.url}/v2/models/other", verify=verify(served))
    assert response.status_code == 404 and MODEL in response.json()["error"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
        served: Deployment) -> None:
    images = [random_image(seed) for seed in range(12)]
    with client(served) as sdk, ThreadPoolExecutor(6) as pool:
        outputs = list(pool.map(lambda x: sdk.infer({"input": x})["fc"], images))
    stacked = whole_model_outputs(np.concatenate(images))
    np.testing.assert_allclose(np.concatenate(outputs), stacked, rtol=RTOL, atol=ATOL)
    with client(served) as sdk:
        batch = np.concatenate(images[:3])
        np.testing.assert_allclose(sdk.infer({"input": batch})["fc"], stacked[:3],
                                   rtol=RTOL, atol=ATOL)


def test_metrics_count_requests_errors_and_stage_time(served: Deployment,
                                                      image_and_expected) -> None:
    with client(served) as sdk:
        sdk.infer({"input": image_and_expected[0]})
    text = httpx.get(f"{served.url}/metrics", verify=verify(served)).text
    assert f'smlaas_requests_total{{code="200",model="{MODEL}",protocol="rest"}}' in text
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in text
    for stage in range(served.stage_count):
        assert f'smlaas_stage_duration_seconds_count{{model="{MODEL}",stage="{stage}"}}' in text
    assert "smlaas_queue_depth" in text and "smlaas_batch_size_bucket" in text


def test_metrics_gathered_from_every_stage(served: Deployment, image_and_expected) -> None:
    stages = [str(k) for k in range(served.stage_count)]
    with client(served) as sdk:
        for _ in range(3):
            sdk.infer({"input": image_and_expected[0]})
    requests = wait_for_stage_metrics(served.url, served.ca_path, "smlaas_stage_requests_total",
                                      lambda v: all(v.get(s, 0) >= 3 for s in stages))
    assert all(requests.get(s, 0) >= 3 for s in stages), requests
    batches = stage_metrics(served.url, served.ca_path, "smlaas_stage_batches_total")
    assert all(0 < batches[s] <= requests[s] for s in stages), (batches, requests)
    run_time = stage_metrics(served.url, served.ca_path, "smlaas_stage_run_seconds_total")
    assert all(run_time[s] > 0 for s in stages), run_time
    assert set(stage_metrics(served.url, served.ca_path, "smlaas_stage_queue_depth")) == \
        set(stages)
    working_sets = stage_metrics(served.url, served.ca_path,
                                 "smlaas_stage_predicted_working_set_bytes")
    epc = stage_metrics(served.url, served.ca_path, "smlaas_stage_usable_epc_bytes")
    assert set(working_sets) == set(stages) and all(0 < working_sets[s] <= epc[s]
                                                    for s in stages), (working_sets, epc)
    ages = stage_metrics(served.url, served.ca_path, "smlaas_attestation_age_seconds")
    assert set(ages) == {"gateway", *(f"stage-{s}" for s in stages)}, ages
    assert all(0 <= age < 600 for age in ages.values()), ages
    restarts = stage_metrics(served.url, served.ca_path, "smlaas_stage_restarts_total")
    assert restarts == {s: 0.0 for s in stages}


def test_gateway_evidence_binds_its_https_key(served: Deployment) -> None:
    roots = served.trusted_roots
    assert len(roots) == 2 and roots[1].simulated
    expected = served.measurements["gateway"]
    policy = served.role_policy("gateway")
    assert policy.roles["gateway"].mrenclave == (expected,)
    with client(served) as sdk:
        verdict = sdk.attest(policy, roots)
        assert verdict.mrenclave == expected and verdict.simulated
        wrong = Policy.from_dict({"allow_simulation_insecure": True,
                                  "roles": {"gateway": {"mrenclave": ["00" * 32]}}})
        with pytest.raises(PolicyError, match="measurement"):
            sdk.attest(wrong, roots)
        refusing = Policy.from_dict({"roles": {"gateway": {"mrenclave": [expected]}}})
        with pytest.raises(PolicyError, match="SIMULATION"):
            sdk.attest(refusing, roots)
        assert served.manifest is not None
        sdk.attest(policy, roots, manifest_digest=served.manifest.digest())
        with pytest.raises(AttestationError, match="admitted under manifest"):
            sdk.attest(policy, roots, manifest_digest="00" * 32)


def test_sdk_raises_serving_error_with_status(served: Deployment) -> None:
    with client(served) as sdk, pytest.raises(ServingError) as caught:
        sdk.infer({"input": np.zeros((1, 3, 10, 10), np.float32)})
    assert caught.value.status == 400
