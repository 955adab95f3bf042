"""The Open Inference Protocol codec: what a client sends, what the gateway refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smlaas.client.inference import decode_infer_response
from smlaas.serving.protocol import TensorSpec
from smlaas.serving.v2 import (
    BadRequest,
    InferRequest,
    encode_infer_response,
    parse_infer_request,
)

INPUTS = [TensorSpec("x", "float32", [1, 3, 4]), TensorSpec("ids", "int64", [1, 2])]
OUTPUTS = [TensorSpec("y", "float32", [1, 5])]


def binary_body(items: list[tuple[dict, bytes]], extra: dict | None = None
                ) -> tuple[bytes, str]:
    request = {"inputs": [item for item, _ in items], **(extra or {})}
    head = json.dumps(request).encode()
    return head + b"".join(data for _, data in items), str(len(head))


def item(name: str, datatype: str, array: np.ndarray) -> tuple[dict, bytes]:
    return ({"name": name, "datatype": datatype, "shape": list(array.shape),
             "parameters": {"binary_data_size": array.nbytes}}, array.tobytes())


X = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
IDS = np.array([[3, 4]], dtype=np.int64)


def parse(body: bytes, length: str | None, max_batch_size: int = 0) -> InferRequest:
    return parse_infer_request(body, length, INPUTS, OUTPUTS, max_batch_size=max_batch_size)


def test_binary_and_json_requests_decode_to_the_same_tensors() -> None:
    binary = parse(*binary_body([item("x", "FP32", X), item("ids", "INT64", IDS)]))
    as_json = parse(json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 3, 4], "data": X.ravel().tolist()},
        {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [[3, 4]]}]}).encode(),
        None)
    for request in (binary, as_json):
        np.testing.assert_array_equal(request.inputs["x"], X)
        np.testing.assert_array_equal(request.inputs["ids"], IDS)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r["inputs"][0].update(name="z"), "unknown input 'z'"),
    (lambda r: r["inputs"].pop(), "missing input"),
    (lambda r: r["inputs"][0].update(datatype="FP64"), "expects FP32"),
    (lambda r: r["inputs"][0].update(datatype="BYTES"), "unsupported datatype"),
    (lambda r: r["inputs"][0].update(shape=[1, 4, 3]), "has shape [1, 4, 3]"),
    (lambda r: r["inputs"][0].update(data=[1.0, 2.0]), "2 values for shape"),
    (lambda r: r["inputs"][0].update(data="abc"), "data is not FP32"),
    (lambda r: r.update(outputs=[{"name": "nope"}]), "unknown output 'nope'"),
    (lambda r: r["inputs"].append(dict(r["inputs"][0])), "given twice"),
])
def test_json_request_problems_are_named(mutate, message: str) -> None:
    request = {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 3, 4], "data": X.ravel().tolist()},
        {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [3, 4]}]}
    mutate(request)
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(json.dumps(request).encode(), None)


def test_malformed_bodies_are_refused() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse(b"{nope", None)
    with pytest.raises(BadRequest, match="'inputs' list"):
        parse(b"[]", None)
    body, _ = binary_body([item("x", "FP32", X), item("ids", "INT64", IDS)])
    with pytest.raises(BadRequest, match="must be an integer"):
        parse(body, "ten")
    with pytest.raises(BadRequest, match="but the body has"):
        parse(body, str(len(body) + 1))


def test_binary_byte_counts_are_checked() -> None:
    x_item, x_data = item("x", "FP32", X)
    x_item["parameters"]["binary_data_size"] = 44
    with pytest.raises(BadRequest, match="binary_data_size is 44 but shape"):
        parse(*binary_body([(x_item, x_data), item("ids", "INT64", IDS)]))
    body, length = binary_body([item("x", "FP32", X), item("ids", "INT64", IDS)])
    with pytest.raises(BadRequest, match="binary data ends after"):
        parse(body[:-3], length)
    with pytest.raises(BadRequest, match="carries 100 bytes of binary data but its inputs "
                                         "declare 64"):
        parse(body + bytes(36), length)


def test_batch_dimension_is_free_only_when_batching() -> None:
    x4 = np.zeros((4, 3, 4), np.float32)
    ids4 = np.zeros((4, 2), np.int64)
    body, length = binary_body([item("x", "FP32", x4), item("ids", "INT64", ids4)])
    assert parse(body, length, max_batch_size=8).batch == 4
    with pytest.raises(BadRequest, match=r"expects \[1, 3, 4\]"):
        parse(body, length, max_batch_size=0)
    with pytest.raises(BadRequest, match="outside 1..2"):
        parse(body, length, max_batch_size=2)
    body, length = binary_body([item("x", "FP32", x4), item("ids", "INT64", ids4[:2])])
    with pytest.raises(BadRequest, match="disagree on the batch size"):
        parse(body, length, max_batch_size=8)


def test_response_round_trips_in_binary_and_json() -> None:
    y = np.linspace(0, 1, 5, dtype=np.float32).reshape(1, 5)
    for binary in (True, False):
        request = InferRequest(id="r1", inputs={}, batch=1, binary_default=binary)
        body, headers = encode_infer_response("m", request, {"y": y})
        decoded = decode_infer_response(body, headers.get("Inference-Header-Content-Length"))
        np.testing.assert_array_equal(decoded["y"], y)
        head = json.loads(body[:int(headers.get("Inference-Header-Content-Length",
                                                len(body)))])
        assert head["id"] == "r1" and head["model_name"] == "m"


def test_gateway_certificate_names_the_listen_address_and_this_host() -> None:
    import socket

    from smlaas.serving.gateway_process import certificate_hosts

    assert certificate_hosts("10.1.2.3") == ["10.1.2.3", "127.0.0.1", "localhost"]
    wildcard = certificate_hosts("0.0.0.0")
    assert "0.0.0.0" not in wildcard and socket.gethostname() in wildcard
