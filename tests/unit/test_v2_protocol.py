"""The Open Inference Protocol codec: what a client sends, what the gateway refuses."""

from __future__ import annotations

import contextlib
import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smlaas.client.inference import decode_infer_response
from smlaas.errors import BadRequest
from smlaas.transport.tensors import TensorSpec
from smlaas.transport.v2 import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
)
from smlaas.transport.v2_limits import HEADER_ALLOWANCE_BYTES, RequestLimits, check_json_bounds

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
    (lambda r: r["inputs"][0].update(datatype="STRING"), "unsupported datatype"),
    (lambda r: r["inputs"][0].update(datatype="BYTES"), "expects FP32"),
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


def _json_request(**x_changes: object) -> bytes:
    x = {"name": "x", "datatype": "FP32", "shape": [1, 3, 4], "data": X.ravel().tolist()}
    x.update(x_changes)
    ids = {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [3, 4]}
    return json.dumps({"inputs": [x, ids]}).encode()


@pytest.mark.parametrize("body", [
    _json_request(shape=[2**32, 2**32, 1, 1]),
    _json_request(shape=[2**63, 1, 1]),
    _json_request(shape=[True, 3, 4]),
    _json_request(name=["x"]),
    _json_request(name={"x": 1}),
    _json_request(datatype=["FP32"]),
    _json_request(parameters=[1, 2]),
    _json_request(parameters={"binary_data_size": True}),
    _json_request(data=[10**400] * 12),
    b'{"inputs": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
    b'{"inputs": []' + b",[]" * 50_000 + b"}",
    json.dumps({"inputs": [], "parameters": []}).encode(),
    json.dumps({"inputs": [], "id": 7}).encode(),
    json.dumps({"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}
               ).encode(),
    b"\xff\xfe",
])
def test_malformed_requests_are_bad_requests(body: bytes) -> None:
    with pytest.raises(BadRequest):
        parse(body, None)


def test_limits_follow_the_model() -> None:
    limits = RequestLimits.for_model(INPUTS, max_batch_size=8)
    assert limits.max_elements == 8 * 12 + 8 * 2
    assert limits.max_body_bytes == HEADER_ALLOWANCE_BYTES + limits.max_elements * 32
    with pytest.raises(BadRequest, match="nests deeper"):
        check_json_bounds(b"[" * 65 + b"]" * 65, limits)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["inputs", "name", "datatype", "shape", "data", "parameters",
                         "outputs", "id", "binary_data_size", "x", "ids"]), inner, max_size=5),
    max_leaves=25).map(lambda value: json.dumps(value).encode()))
def test_any_bytes_parse_or_are_a_bad_request(body: bytes) -> None:
    with contextlib.suppress(BadRequest):
        parse(body, None, max_batch_size=4)


def test_compressed_bodies_are_bounded() -> None:
    import gzip
    import zlib

    from smlaas.transport.compression import decode_content, encode_content

    body = b'{"inputs": []}' * 100
    assert decode_content(gzip.compress(body), "gzip", limit=len(body)) == body
    assert decode_content(zlib.compress(body), "deflate", limit=len(body)) == body
    assert decode_content(body, None, limit=len(body)) == body
    bomb = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(BadRequest, match="expands past"):
        decode_content(bomb, "gzip", limit=1 << 20)
    with pytest.raises(BadRequest, match="truncated"):
        decode_content(gzip.compress(body)[:-10], "gzip", limit=len(body))
    with pytest.raises(BadRequest, match="unsupported Content-Encoding"):
        decode_content(body, "br", limit=len(body))
    packed, coding = encode_content(body, "deflate, gzip;q=0.9")
    assert coding == "gzip" and gzip.decompress(packed) == body
    assert encode_content(body, "identity") == (body, None)


def test_classification_and_bytes_round_trip() -> None:
    from smlaas.transport.classification import classify
    from smlaas.transport.v2 import decode_infer_response, deserialize_bytes, serialize_bytes

    scores = np.array([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0]], np.float32)
    top = classify(scores, 2, ["a", "b", "c"])
    assert top.shape == (2, 2)
    assert list(top[0]) == [b"0.900000:1:b", b"0.500000:2:c"]
    assert list(classify(scores, 5)[1]) == [b"3.000000:0", b"2.000000:2", b"1.000000:1"]
    assert deserialize_bytes(serialize_bytes(top)) == list(top.reshape(-1))
    request = parse(*binary_body([item("x", "FP32", X), item("ids", "INT64", IDS)], {
        "outputs": [{"name": "y", "parameters": {"classification": 2, "binary_data": True}}]}))
    assert request.classification == {"y": 2}
    y = np.linspace(0, 1, 5, dtype=np.float32).reshape(1, 5)
    for binary in (True, False):
        request.binary = {"y": binary}
        body, headers = encode_infer_response("m", request, {"y": y})
        got = decode_infer_response(body, headers.get("Inference-Header-Content-Length"))["y"]
        assert list(got[0]) == [b"1.000000:4", b"0.750000:3"]
    with pytest.raises(BadRequest, match="classification must be an integer"):
        parse(*binary_body([item("x", "FP32", X), item("ids", "INT64", IDS)], {
            "outputs": [{"name": "y", "parameters": {"classification": 0}}]}))


TEXT_INPUTS = [TensorSpec("text", "bytes", [None]), TensorSpec("h", "bfloat16", [None, 2])]
TEXT_OUTPUTS = [TensorSpec("y", "bfloat16", [None, 2])]


def parse_text(body: bytes, length: str | None) -> InferRequest:
    return parse_infer_request(body, length, TEXT_INPUTS, TEXT_OUTPUTS, max_batch_size=4)


def test_bytes_and_bf16_inputs_decode_from_binary_and_json() -> None:
    text = np.array([b"caf\xc3\xa9", b""], dtype=object)
    hidden = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=ml_dtypes.bfloat16)
    for binary in (True, False):
        body, headers = encode_infer_request({"text": text, "h": hidden}, binary=binary)
        request = parse_text(body, headers.get(HEADER_LENGTH))
        assert request.inputs["text"].tolist() == [b"caf\xc3\xa9", b""]
        assert request.inputs["h"].dtype == hidden.dtype
        np.testing.assert_array_equal(request.inputs["h"].astype(np.float32),
                                      hidden.astype(np.float32))


def test_bf16_and_bytes_outputs_round_trip_through_the_client_codec() -> None:
    request = InferRequest(id=None, inputs={}, batch=1, binary_default=True)
    outputs = {"y": np.array([[1.5, -2.0]], dtype=ml_dtypes.bfloat16),
               "s": np.array([b"\x00\xff", b"ok"], dtype=object)}
    for binary in (True, False):
        request.binary_default = binary
        body, headers = encode_infer_response("m", request, outputs)
        decoded = decode_infer_response(body, headers.get(HEADER_LENGTH))
        assert decoded["y"].dtype == outputs["y"].dtype
        assert decoded["y"].tobytes() == outputs["y"].tobytes()
        if binary:  # JSON carries strings, so only valid UTF-8 survives it
            assert decoded["s"].tolist() == [b"\x00\xff", b"ok"]


@pytest.mark.parametrize(("text_item", "message"), [
    ({"datatype": "BYTES", "shape": [2], "data": ["a", 3]}, "must be strings"),
    ({"datatype": "BYTES", "shape": [3], "data": ["a", "b"]}, "2 BYTES elements"),
    ({"datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 3}}, "cut short"),
])
def test_malformed_bytes_inputs_are_named(text_item: dict, message: str) -> None:
    hidden = {"name": "h", "datatype": "BF16", "shape": [1, 2], "data": [1.0, 2.0]}
    request = {"inputs": [{"name": "text", **text_item}, hidden]}
    head = json.dumps(request).encode()
    binary = b"\x09\x00\x00" if "parameters" in text_item else b""
    with pytest.raises(BadRequest, match=message):
        parse_text(head + binary, str(len(head)) if binary else None)


def _with_parameters(parameters: dict) -> InferRequest:
    return parse(*binary_body([item("x", "FP32", X), item("ids", "INT64", IDS)],
                              {"parameters": parameters}))


def test_json_that_orjson_refuses_but_python_reads_is_still_read() -> None:
    """Requests are read by orjson, with Python's json for what orjson refuses: NaN and
    infinities (Python's json writes them), 1e400, UTF-16, a UTF-8 BOM. An integer input's
    value past 64 bits, or not whole, is refused by its type. What neither reads is a 400
    naming JSON."""
    x = [float("nan"), float("inf"), -1.0] + [0.5] * 9

    def body(ids: list[int], encoding: str = "utf-8") -> bytes:
        return json.dumps({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 3, 4], "data": x},
            {"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": ids}]}
        ).encode(encoding)

    read = parse(body([3, 4]), None).inputs["x"].reshape(-1)
    assert np.isnan(read[0]) and read[1] == np.inf and read[2] == -1.0
    assert parse(body([3, 4], "utf-16"), None).inputs["ids"].tolist() == [[3, 4]]
    assert parse(body([3, 4], "utf-8-sig"), None).inputs["ids"].tolist() == [[3, 4]]
    assert parse(body([3, 4]).replace(b"-1.0", b"1e400"), None).inputs["x"][0, 0, 2] == np.inf
    assert parse(body([3, -2**63]), None).inputs["ids"].tolist() == [[3, -2**63]]
    assert parse(body([3, 4]).replace(b"[3, 4]", b"[3.0, 4]"), None
                 ).inputs["ids"].tolist() == [[3, 4]]
    # past 64 bits (orjson reads these as floats, -2**63 - 1 rounding to -2**63), or not whole
    for ids in ([3, 2**70], [3, -2**63 - 1], [3, -2**63 - 1000], [3, 2**64], [3, 1.5]):
        with pytest.raises(BadRequest, match="input 'ids': data is not INT64"):
            parse(body(ids), None)
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse(b'{"inputs": [', None)


def test_the_timeout_parameter_is_carried_in_microseconds() -> None:
    assert _with_parameters({}).timeout_us == 0
    assert _with_parameters({"timeout": 0}).timeout_us == 0
    assert _with_parameters({"timeout": 250_000}).timeout_us == 250_000
    assert _with_parameters({"timeout": 2**64 - 1}).timeout_us == 2**64 - 1  # the gateway caps it
    for bad in (-1, 1.5, "100", True, None, [1], 2**64, 10**30):
        with pytest.raises(BadRequest, match="'timeout' must be a non-negative 64-bit integer"):
            _with_parameters({"timeout": bad})


@pytest.mark.parametrize("parameters", [
    {"sequence_id": 7}, {"sequence_id": "session-a"}, {"sequence_start": True},
    {"sequence_end": True}, {"sequence_id": 3, "sequence_start": True, "sequence_end": False}])
def test_sequence_parameters_are_refused_naming_the_parameter(parameters: dict) -> None:
    with pytest.raises(BadRequest, match="asks for sequence batching, which this model does "
                                         "not have") as caught:
        _with_parameters(parameters)
    assert next(iter(k for k, v in parameters.items() if v)) in str(caught.value)


def test_saying_no_sequence_is_not_a_sequence() -> None:
    """tritonclient sends no sequence parameters for sequence_id 0; other clients may send
    the defaults themselves."""
    request = _with_parameters({"sequence_id": 0, "sequence_start": False,
                                "sequence_end": False})
    assert request.batch == 1


WIDE = [TensorSpec("wide", "float32", [None, 1000]), TensorSpec("ids", "int64", [None, 4]),
        TensorSpec("text", "bytes", [None]), TensorSpec("free", "float32", [None, None])]


def test_json_output_bounds_follow_the_models_output_shapes() -> None:
    from smlaas.transport.v2 import json_output_bounds
    from smlaas.transport.v2_limits import FLOAT_JSON_BYTES, JSON_VALUE_BYTES

    request = InferRequest(id=None, inputs={}, batch=8, binary={"ids": True})
    bounds = json_output_bounds(request, WIDE, batching=True)
    assert bounds == {"wide": 2 + 8 * 1000 * FLOAT_JSON_BYTES, "text": None, "free": None}
    request = InferRequest(id=None, inputs={}, batch=2, outputs=["ids"],
                           classification={"ids": 3})
    assert json_output_bounds(request, WIDE, batching=True) == {"ids": None}
    request = InferRequest(id=None, inputs={}, batch=1, outputs=["ids"])
    assert json_output_bounds(request, WIDE, batching=True) == {
        "ids": 2 + 4 * JSON_VALUE_BYTES["int64"]}


def test_json_outputs_past_the_bound_are_refused_with_what_to_do() -> None:
    from smlaas.transport.v2_limits import check_json_outputs, json_bytes_bound

    check_json_outputs({"a": 600, "b": None, "c": 400}, limit=1000)
    with pytest.raises(BadRequest, match="ask for binary outputs") as caught:
        check_json_outputs({"a": 600, "b": None, "c": 401}, limit=1000)
    assert "(a, c) can take up to 1001 bytes" in str(caught.value)
    values = np.full((3, 7), -1.2345678901234567e-308)
    compact = {"separators": (",", ":")}
    assert json_bytes_bound(values) >= len(json.dumps(values.ravel().tolist(), **compact))
    strings = np.array([b"\x00" * 10, "\u00e9".encode(), b"\xff\xfe"], dtype=object)
    assert json_bytes_bound(strings) >= len(json.dumps([s.decode("utf-8", "replace")
                                                        for s in strings], **compact))
    request = InferRequest(id=None, inputs={}, batch=1)
    big = {"y": np.zeros((1, 50_000), np.float32)}
    with pytest.raises(BadRequest, match="binary_data_output"):
        encode_infer_response("m", request, big, max_json_bytes=1 << 20)
    request.binary_default = True
    body, _ = encode_infer_response("m", request, big, max_json_bytes=1 << 20)
    assert len(body) > 200_000  # binary outputs are not bounded by the JSON limit


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 3), width=st.integers(0, 40_000), dtype=st.sampled_from(
    ["float32", "float64", "float16", "int64", "int8", "uint8", "uint64", "bool", "bfloat16"]),
    special=st.sampled_from([None, np.nan, np.inf, -np.inf]))
def test_json_data_encoded_in_slices_reads_back_exactly(rows: int, width: int, dtype: str,
                                                        special: float | None) -> None:
    """Every value, read back as JSON and converted to its own type, is the value encoded
    (floats written short, NaN and infinities as Python's json writes them)."""
    from smlaas.transport.v2_json import json_data_text

    rng = np.random.default_rng(rows * 7 + width)
    value = (rng.standard_normal((rows, width)) * 100).astype(dtype)
    if special is not None and value.dtype.kind == "f" and value.size:
        value.reshape(-1)[value.size // 2] = special
    text = json_data_text(value)
    read = json.loads(text)
    assert len(read) == value.size
    back = np.asarray(read, dtype=np.float32 if dtype == "bfloat16" else dtype).astype(dtype)
    np.testing.assert_array_equal(back, value.reshape(-1))


def test_json_data_of_a_non_contiguous_or_big_endian_tensor() -> None:
    from smlaas.transport.v2_json import json_data_text

    value = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    assert json.loads(json_data_text(value)) == value.astype(np.float32).reshape(-1).tolist()


def test_a_receipt_does_not_make_raw_tensors_worth_compressing() -> None:
    """A response of raw float bytes stays as it is once a receipt's base64 is added to it:
    the decision is made on the response without the receipt."""
    import base64
    import os

    from smlaas.transport.compression import encode_content

    plain = b'{"outputs":[]}' + np.random.default_rng(0).random(1000).astype(np.float32).tobytes()
    with_receipt = plain + b',"receipt":"' + base64.b64encode(os.urandom(1800)) * 3 + b'"'
    assert encode_content(with_receipt, "gzip")[1] == "gzip"  # judged alone, it would be
    assert encode_content(with_receipt, "gzip", judged_by=plain) == (with_receipt, None)
