"""gRPC ``ModelInfer`` and ``ModelStreamInfer`` fuzzed over a real socket (TLS, 127.0.0.1) on a
deployed chain model: random model names and versions, input names, datatypes, shapes, typed
contents in any field, raw contents, request and output parameters, and bytes that are no
message at all. No answer is ever INTERNAL or UNKNOWN, and the server answers a correct
request correctly afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from smlaas.coordinator.server import free_port
from smlaas.profile.session import create_session, run_session
from smlaas.serving.grpc_gateway import UNARY_REQUESTS
from tests.builds import sealed_chain_build
from tests.integration.serving_setup import cache_env, deployment
from tests.models import chain_model

WIDTH, DEPTH, MODEL = 8, 6, "m"
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("grpc-fuzz")
    with cache_env(root / "cache"):
        build, keys, _ = sealed_chain_build(root, width=WIDTH, depth=DEPTH, machines=2)
        with deployment(root, build, keys, grpc_port=free_port()) as running:
            assert running.grpc_address is not None and running.model_name == MODEL
            credentials = grpc.ssl_channel_credentials(Path(running.ca_path).read_bytes())
            with grpc.secure_channel(running.grpc_address, credentials) as opened:
                yield opened


# -- what a fuzzed request is made of --------------------------------------------------------
CONTENTS = {"bool_contents": st.booleans(),
            "int_contents": st.integers(-2**31, 2**31 - 1),
            "int64_contents": st.integers(-2**63, 2**63 - 1),
            "uint_contents": st.integers(0, 2**32 - 1),
            "uint64_contents": st.integers(0, 2**64 - 1),
            "fp32_contents": st.floats(width=32),
            "fp64_contents": st.floats(),
            "bytes_contents": st.binary(max_size=8)}
PARAMETER_VALUES = {"bool_param": st.booleans(), "int64_param": st.integers(-2**63, 2**63 - 1),
                    "string_param": st.text(max_size=8), "double_param": st.floats(),
                    "uint64_param": st.integers(0, 2**64 - 1)}
PARAMETER_KEYS = st.sampled_from(["timeout", "sequence_id", "sequence_start", "sequence_end",
                                  "priority", "classification", "binary_data_output",
                                  "binary_data_size", "triton_enable_empty_final_response"]) \
    | st.text(max_size=8)
PARAMETERS = st.dictionaries(PARAMETER_KEYS, st.sampled_from(sorted(PARAMETER_VALUES)).flatmap(
    lambda kind: st.tuples(st.just(kind), PARAMETER_VALUES[kind])), max_size=3)
DATATYPES = st.sampled_from(["FP32", "FP32", "FP64", "FP16", "BF16", "INT8", "INT32", "INT64",
                             "UINT8", "UINT64", "BOOL", "BYTES", "", "fp32"]) | st.text(max_size=5)
SHAPES = st.lists(st.integers(-2, 9) | st.sampled_from([WIDTH, 2**31, 2**62, 2**63 - 1]),
                  max_size=4)


@st.composite
def contents(draw: Any) -> dict[str, list[Any]]:
    fields = draw(st.lists(st.sampled_from(sorted(CONTENTS)), max_size=2, unique=True))
    return {field: draw(st.lists(CONTENTS[field], max_size=80)) for field in fields}


@st.composite
def fitting_input(draw: Any) -> dict[str, Any]:
    """An input close to what the model takes (so that some requests run)."""
    rows = draw(st.integers(0, 9))
    values = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False,
                                     min_value=-10, max_value=10),
                           min_size=rows * WIDTH, max_size=rows * WIDTH + draw(
                               st.sampled_from([0, 0, 0, 1]))))
    return {"name": "x", "datatype": "FP32", "shape": [rows, WIDTH],
            "contents": {"fp32_contents": values}, "parameters": draw(PARAMETERS)}


INPUTS = st.fixed_dictionaries({
    "name": st.sampled_from(["x", "x", "y", ""]) | st.text(max_size=6),
    "datatype": DATATYPES, "shape": SHAPES, "contents": contents(), "parameters": PARAMETERS})
REQUESTS = st.fixed_dictionaries({
    "model_name": st.sampled_from([MODEL, MODEL, MODEL, "nope", ""]),
    "model_version": st.sampled_from(["", "", "1", "2"]) | st.text(max_size=3),
    "id": st.text(max_size=10),
    "inputs": st.lists(fitting_input() | INPUTS, max_size=3),
    "raw": st.none() | st.lists(st.binary(max_size=300), max_size=3),
    "outputs": st.lists(st.tuples(st.sampled_from(["y", "x", ""]), PARAMETERS), max_size=2),
    "parameters": PARAMETERS})

NEAR_VALID = st.fixed_dictionaries({
    "model_name": st.just(MODEL), "model_version": st.sampled_from(["", "1"]),
    "id": st.text(max_size=10), "inputs": st.lists(fitting_input(), min_size=1, max_size=1),
    "raw": st.none(),
    "outputs": st.lists(st.tuples(st.just("y"), st.just({}) | st.fixed_dictionaries({
        "classification": st.tuples(st.just("int64_param"), st.integers(0, 12))})),
        max_size=1),
    "parameters": st.just({}) | st.fixed_dictionaries({"timeout": st.tuples(
        st.just("int64_param"), st.integers(0, 10**8))})})


def message(request: dict[str, Any]) -> bytes:
    built = service_pb2.ModelInferRequest(model_name=request["model_name"],
                                          model_version=request["model_version"],
                                          id=request["id"])
    for item in request["inputs"]:
        tensor = built.inputs.add(name=item["name"], datatype=item["datatype"],
                                  shape=item["shape"])
        for field, values in item["contents"].items():
            getattr(tensor.contents, field).extend(values)
        _parameters(tensor.parameters, item["parameters"])
    for name, parameters in request["outputs"]:
        _parameters(built.outputs.add(name=name).parameters, parameters)
    _parameters(built.parameters, request["parameters"])
    if request["raw"] is not None:
        built.raw_input_contents.extend(request["raw"])
    return bytes(built.SerializeToString())


def _parameters(target: Any, parameters: dict[str, tuple[str, Any]]) -> None:
    for key, (kind, value) in parameters.items():
        setattr(target[key], kind, value)


MESSAGES = NEAR_VALID.map(message) | REQUESTS.map(message) | st.binary(max_size=64)


# -- the fuzzing -----------------------------------------------------------------------------
@FUZZ
@given(data=MESSAGES)
def test_fuzzed_model_infer_is_never_internal(channel, data: bytes) -> None:
    try:
        answer = channel.unary_unary(INFER)(data, timeout=30)
    except grpc.RpcError as err:
        event(err.code().name)  # --hypothesis-show-statistics shows how the answers spread
        assert err.code() not in NEVER, (err.code(), err.details(), data[:200])
        return
    event("OK")
    response = service_pb2.ModelInferResponse.FromString(answer)
    assert response.model_name == MODEL and [o.name for o in response.outputs]


@settings(FUZZ, max_examples=30)
@given(stream=st.lists(MESSAGES, min_size=1, max_size=5))
def test_fuzzed_streams_answer_every_request_and_never_internal(channel, stream: list[bytes]
                                                                ) -> None:
    """Each request, whatever it holds, is answered on the stream, which ends OK."""
    answers = [service_pb2.ModelStreamInferResponse.FromString(raw)
               for raw in channel.stream_stream(STREAM)(iter(stream), timeout=30)]
    assert len(answers) == len(stream)
    for answer in answers:
        event(answer.error_message.split("] ", 1)[-1].split(":")[0] or "OK")
        if answer.error_message:
            reason = answer.error_message.split("] ", 1)[-1]
            assert not reason.startswith(("INTERNAL", "UNKNOWN")), answer.error_message
        else:
            assert answer.infer_response.model_name == MODEL


OTHER_CALLS = UNARY_REQUESTS
NAMED = st.fixed_dictionaries({"name": st.sampled_from([MODEL, "nope", ""]) | st.text(max_size=5),
                               "version": st.sampled_from(["", "1", "2"])})


@settings(FUZZ, max_examples=40)
@given(method=st.sampled_from(sorted(OTHER_CALLS)), fields=NAMED, garbage=st.none()
       | st.binary(max_size=32))
def test_fuzzed_health_and_metadata_calls_are_never_internal(
        channel, method: str, fields: dict[str, str], garbage: bytes | None) -> None:
    message_type = OTHER_CALLS[method]
    if garbage is None:
        known = {key: value for key, value in fields.items()
                 if key in message_type.DESCRIPTOR.fields_by_name}
        data = bytes(message_type(**known).SerializeToString())
    else:
        data = garbage
    try:
        channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(data, timeout=30)
        event("OK")
    except grpc.RpcError as err:
        event(err.code().name)
        assert err.code() not in NEVER, (method, err.code(), err.details(), data)


def test_after_fuzzing_the_server_answers_correctly(channel) -> None:
    x = np.random.default_rng(4).standard_normal((3, WIDTH)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="after",
                                            raw_input_contents=[x.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    response = service_pb2.ModelInferResponse.FromString(
        channel.unary_unary(INFER)(request.SerializeToString(), timeout=30))
    assert response.id == "after"
    got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, WIDTH)
    session = create_session(chain_model(width=WIDTH, depth=DEPTH), threads=1)
    np.testing.assert_allclose(got, run_session(session, {"x": x})[0], rtol=1e-4, atol=1e-5)
