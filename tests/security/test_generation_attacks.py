"""Attacks on generation, against a real deployment of a decoder (sim backend, real processes
on 127.0.0.1): a client naming another's sequence, a client holding every sequence slot,
and hostile generate bodies and messages, over REST and gRPC. The KV cache never leaving a
stage is driven in process, where every message between stages can be read:
tests/component/test_generation_pipeline.py
(``test_no_message_between_stages_carries_a_kv_cache``, and a forged step out of step with a
stage's cache: ``test_a_stage_refuses_a_step_out_of_step_with_its_cache``)."""

from __future__ import annotations

import json
import ssl
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from smlaas.coordinator.server import free_port
from smlaas.serving.grpc_generate import MAX_PROMPT_BYTES
from tests.integration.serving_setup import (
    DECODER_CONTEXT,
    DECODER_SEQUENCES,
    cache_env,
    decoder_deployment,
)
from tests.integration.test_grpc_fuzz import (
    DATATYPES,
    INFER,
    NEVER,
    PARAMETER_VALUES,
    STREAM,
    contents,
    message,
)

HOG = "127.0.0.2"  # another loopback source address: another client


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("generation-attacks")
    with cache_env(root / "cache"), decoder_deployment(root, grpc_port=free_port()) as running:
        yield running


def _client(running, source: str = "127.0.0.1") -> httpx.Client:
    context = ssl.create_default_context(cafile=str(running.ca_path))
    return httpx.Client(verify=context, timeout=60,
                        transport=httpx.HTTPTransport(verify=context, local_address=source))


def test_a_client_cannot_name_or_extend_a_sequence(served) -> None:
    """Sequence ids are the gateway's, never a client's: a body naming one is refused, and
    what a client gets back names none it could use."""
    url = f"{served.url}/v2/models/{served.model_name}/generate"
    with _client(served) as http:
        for body in ({"input_ids": [1, 2], "sequence_id": "a" * 32},
                     {"input_ids": [1, 2], "parameters": {"sequence_id": 7}},
                     {"input_ids": [1, 2], "parameters": {"sequence_start": False}}):
            answer = http.post(url, json=body)
            assert answer.status_code == 400, answer.text
        ok = http.post(url, json={"input_ids": [1, 2], "parameters": {"max_tokens": 2}})
        assert ok.status_code == 200
        assert not {"sequence", "sequence_id", "id"} & set(ok.json())


def test_one_client_cannot_hold_every_sequence_slot(served) -> None:
    """A client (one source address) may hold half the slots: its next stream is refused
    503 at once, while another client is still served; when the hog's streams end, their
    slots are free again."""
    url = f"{served.url}/v2/models/{served.model_name}/generate_stream"
    share = DECODER_SEQUENCES // 2
    reading: list[object] = []  # each stream's line iterator: dropping one closes its stream
    with _client(served, HOG) as hog:
        streams = [hog.stream("POST", url, json={"input_ids": [5, 6, 7],
                                                 "parameters": {"max_tokens": 500,
                                                                "stop": False}})
                   for _ in range(share)]
        try:
            for stream in streams:
                response = stream.__enter__()
                assert response.status_code == 200
                lines = response.iter_lines()
                reading.append(lines)
                next(lines)  # its first token: the sequence is running
            refused = hog.post(url.replace("generate_stream", "generate"),
                               json={"input_ids": [1], "parameters": {"max_tokens": 1}})
            assert refused.status_code == 503, refused.text
            assert "one client" in refused.text
            with _client(served) as other:
                served_other = other.post(url.replace("generate_stream", "generate"),
                                          json={"input_ids": [1],
                                                "parameters": {"max_tokens": 2}})
                assert served_other.status_code == 200, served_other.text
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    # the hog hung up: its sequences end in every stage, and a full share is served again
    done = []

    def one() -> None:
        with _client(served, HOG) as again:
            done.append(again.post(url.replace("generate_stream", "generate"),
                                   json={"input_ids": [3], "parameters": {"max_tokens": 2}}
                                   ).status_code)

    for _ in range(3):
        threads = [threading.Thread(target=one) for _ in range(share)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        if done[-share:] == [200] * share:
            break
    assert done[-share:] == [200] * share, done


def test_hostile_generate_bodies_get_4xx_and_the_gateway_stays_up(served) -> None:
    base = f"{served.url}/v2/models/{served.model_name}"
    bodies: list[bytes] = [
        b"", b"null", b"[]", b"{", json.dumps({"input_ids": "abc"}).encode(),
        json.dumps({"input_ids": [-1]}).encode(),
        json.dumps({"input_ids": [10**12]}).encode(),
        json.dumps({"input_ids": [1], "parameters": {"temperature": -1}}).encode(),
        json.dumps({"input_ids": [1], "parameters": {"top_p": "x"}}).encode(),
        json.dumps({"text_input": "a" * 5000}).encode(),
        b"[" * 100_000,
        json.dumps({"input_ids": [1] * 200_000}).encode(),
    ]
    with _client(served) as http:
        for body in bodies:
            for route in ("generate", "generate_stream"):
                answer = http.post(f"{base}/{route}", content=body,
                                   headers={"content-type": "application/json"})
                assert 400 <= answer.status_code < 500, \
                    (route, body[:60], answer.status_code, answer.text[:200])
        # a max_tokens past the context is served up to the context, no further
        long = http.post(f"{base}/generate", json={"input_ids": [1], "parameters": {
            "max_tokens": 10**9, "stop": False}})
        assert long.status_code == 200 and long.json()["finish_reason"] == "length"
        assert long.json()["usage"]["completion_tokens"] == DECODER_CONTEXT - 1
        assert http.get(f"{served.url}/v2/health/ready").status_code == 200
        ok = http.post(f"{base}/generate", json={"input_ids": [1, 2],
                                                 "parameters": {"max_tokens": 2}})
        assert ok.status_code == 200


def _grpc(running):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    return grpcclient, grpcclient.InferenceServerClient(
        running.grpc_address, ssl=True, root_certificates=str(running.ca_path))


def _ids(grpcclient, ids, *, stream: bool = False):
    tensor = grpcclient.InferInput("input_ids", [len(ids)], "INT64")
    tensor.set_data_from_numpy(np.array(ids, dtype=np.int64))
    flag = grpcclient.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream]))
    return [tensor, flag]


def test_a_grpc_client_holds_only_its_share_and_hanging_up_frees_it(served) -> None:
    """The share a client's address may hold counts gRPC streams too: with its share running
    on one stream, its next generation is refused UNAVAILABLE at once while another client is
    served; cancelling the stream ends its sequences in every stage, and its share is
    served again."""
    import queue

    from tritonclient.utils import InferenceServerException

    grpcclient, hog = _grpc(served)
    model, share = served.model_name, DECODER_SEQUENCES // 2
    answers: queue.Queue = queue.Queue()
    hog.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for k in range(share):
            hog.async_stream_infer(model, _ids(grpcclient, [5, 6, 7], stream=True),
                                   request_id=str(k),
                                   parameters={"max_tokens": 500, "stop": False})
        started: set[str] = set()
        while len(started) < share:
            result, error = answers.get(timeout=60)
            assert error is None, error
            started.add(result.get_response().id)
        _, again = _grpc(served)
        with pytest.raises(InferenceServerException, match="one client") as caught:
            again.infer(model, _ids(grpcclient, [1]), parameters={"max_tokens": 1})
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        again.close()
        with _client(served, HOG) as other:
            answer = other.post(f"{served.url}/v2/models/{model}/generate",
                                json={"input_ids": [1], "parameters": {"max_tokens": 2}})
            assert answer.status_code == 200, answer.text
    finally:
        hog.stop_stream(cancel_requests=True)
    served_again = []
    for _ in range(20):
        try:
            results = [hog.infer(model, _ids(grpcclient, [3]), parameters={"max_tokens": 2})
                       for _ in range(share)]
            served_again = [list(r.as_numpy("output_ids")) for r in results]
            break
        except InferenceServerException as err:  # the stages are still ending them
            assert "one client" in str(err) or "no free" in str(err), err
            time.sleep(0.5)
    assert len(served_again) == share and all(len(ids) == 2 for ids in served_again)
    hog.close()


def test_hostile_grpc_generation_messages_are_refused_and_the_gateway_stays_up(served
                                                                                ) -> None:
    """Inference messages a hostile client sends a decoder over gRPC: wrong datatypes,
    shapes that disagree with their contents, raw contents of the wrong size, text that is
    not UTF-8, far too many token ids. Each is refused with a 4xx-class code, and the
    gateway still answers health and generates."""
    import grpc
    from tritonclient.grpc import service_pb2

    grpcclient, client = _grpc(served)
    model = served.model_name

    def built(*tensors, raw=None, **parameters):
        request = service_pb2.ModelInferRequest(model_name=model)
        for name, kind, shape, typed in tensors:
            tensor = request.inputs.add(name=name, datatype=kind, shape=shape)
            for field, values in (typed or {}).items():
                getattr(tensor.contents, field).extend(values)
        for key, value in parameters.items():
            request.parameters[key].string_param = value
        if raw is not None:
            request.raw_input_contents.extend(raw)
        return request.SerializeToString()

    hostile = [
        built(("input_ids", "FP32", [2], {"fp32_contents": [1.0, 2.0]})),
        built(("input_ids", "INT64", [3], {"int64_contents": [1, 2]})),
        built(("input_ids", "INT64", [-1], {"int64_contents": [1]})),
        built(("input_ids", "INT64", [2], None), raw=[b"\x01" * 5]),
        built(("text_input", "BYTES", [1], None), raw=[b"\x09\x00\x00\x00ab"]),
        built(("text_input", "BYTES", [1], {"bytes_contents": [b"\xff\xfe"]})),
        built(("text_input", "BYTES", [2], {"bytes_contents": [b"a", b"b"]})),
        built(("input_ids", "INT64", [1], {"int64_contents": [1]}),
                ("input_ids", "INT64", [1], {"int64_contents": [1]})),
        built(("other", "INT64", [1], {"int64_contents": [1]})),
        built(("x" * 100_000, "INT64", [1], {"int64_contents": [1]})),
        built(("input_ids", "Z" * 100_000, [1], {"int64_contents": [1]})),
        built(("input_ids", "INT64", [200_000], {"int64_contents": [1] * 200_000})),
        built(("input_ids", "INT64", [1], {"int64_contents": [1]}), max_tokens="many"),
        built(("input_ids", "INT64", [1], {"int64_contents": [1]}), max_tokens="9" * 5000),
        built(),
        # counts checked before anything is converted, whatever the message claims
        built(("input_ids", "INT64", [2**63 - 1] * 20_000, None)),
        built(("input_ids", "INT64", [1], {"int64_contents": [7] * 300_000})),
        built(("text_input", "BYTES", [1], None), raw=[b"\x00" * 800_000]),
        built(("text_input", "BYTES", [1], {"bytes_contents": [b""] * 200_000})),
        built(("text_input", "BYTES", [1], {"bytes_contents": [b"a" * (MAX_PROMPT_BYTES + 1)]})),
        built(("input_ids", "INT64", [1], {"int64_contents": [1]}),
              ("sampling_parameters", "BYTES", [1],
               {"bytes_contents": [b"[" * 20_000 + b"]" * 20_000]})),
    ]
    oversize = [  # larger than any inference message: gRPC refuses it unread
        built(("input_ids", "INT64", [1], {"int64_contents": [7] * 5_000_000}))]
    channel = grpc.secure_channel(served.grpc_address, grpc.ssl_channel_credentials(
        served.ca_path.read_bytes()))
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    cases = [(data, grpc.StatusCode.INVALID_ARGUMENT) for data in hostile] + \
        [(data, grpc.StatusCode.RESOURCE_EXHAUSTED) for data in oversize]
    for data, code in cases:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            infer(data, timeout=30)
        assert caught.value.code() == code, (data[:80], caught.value)
        assert len(caught.value.details() or "") < 2000  # no client value echoed at length
        assert time.monotonic() - started < 10.0, data[:80]  # refused, not worked through
    long_name = service_pb2.ModelInferRequest(model_name="m" * 100_000).SerializeToString()
    with pytest.raises(grpc.RpcError) as caught:
        infer(long_name, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value
    channel.close()
    assert client.is_server_ready()
    result = client.infer(model, _ids(grpcclient, [1, 2]), parameters={"max_tokens": 3})
    assert len(result.as_numpy("output_ids")) == 3
    client.close()


# -- gRPC generation fuzzed over the real socket ----------------------------------------------
GENERATION_NAMES = st.sampled_from(["text_input", "input_ids", "stream", "sampling_parameters",
                                    "exclude_input_in_output"]) | st.text(max_size=5)
GENERATION_PARAMETERS = st.dictionaries(
    st.sampled_from(["max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
                     "sequence_id", "triton_enable_empty_final_response"]) | st.text(max_size=5),
    st.sampled_from(sorted(PARAMETER_VALUES)).flatmap(
        lambda kind: st.tuples(st.just(kind), PARAMETER_VALUES[kind])), max_size=3)
SMALL_RUN = st.fixed_dictionaries({"max_tokens": st.tuples(st.just("int64_param"),
                                                           st.integers(1, 4) | st.just(0))})
GENERATION_INPUT = st.fixed_dictionaries({
    "name": GENERATION_NAMES, "datatype": DATATYPES, "shape": st.lists(
        st.integers(-2, 5) | st.sampled_from([2**31, 2**63 - 1]), max_size=3),
    "contents": contents(), "parameters": st.just({})})
GENERATION_REQUESTS = st.fixed_dictionaries({
    "model_name": st.sampled_from(["decoder", "decoder", "decoder", "nope"]),
    "model_version": st.sampled_from(["", "", "1", "2"]),
    "id": st.text(max_size=10),
    "inputs": st.lists(GENERATION_INPUT, max_size=3),
    "raw": st.none() | st.lists(st.binary(max_size=40), max_size=3),
    "outputs": st.just([]),
    "parameters": SMALL_RUN.flatmap(lambda small: GENERATION_PARAMETERS.map(
        lambda other: {**other, **small}))})


@st.composite
def near_valid_generation(draw) -> dict:
    """A request close to a right one (token ids or text, maybe a stream flag), so that some
    generate."""
    if draw(st.booleans()):
        ids = draw(st.lists(st.integers(0, 256), min_size=1, max_size=8)
                   | st.lists(st.sampled_from([-1, 0, 257, 2**40]), max_size=2))
        prompt = {"name": "input_ids", "datatype": draw(st.sampled_from(["INT64", "INT32"])),
                  "shape": [len(ids) + draw(st.sampled_from([0, 0, 0, 1]))],
                  "contents": {"int64_contents": ids}, "parameters": {}}
        if prompt["datatype"] == "INT32":
            prompt["contents"] = {"int_contents": [max(min(i, 2**31 - 1), -2**31)
                                                   for i in ids]}
    else:
        prompt = {"name": "text_input", "datatype": "BYTES", "shape": [1],
                  "contents": {"bytes_contents": [draw(
                      st.text(min_size=1, max_size=12).map(str.encode)
                      | st.binary(max_size=12))]},
                  "parameters": {}}
    extra = draw(st.lists(st.sampled_from([
        {"name": "stream", "datatype": "BOOL", "shape": [1],
         "contents": {"bool_contents": [draw(st.booleans())]}, "parameters": {}},
        {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1],
         "contents": {"bytes_contents": [draw(st.sampled_from(
             [b"{}", b'{"temperature": "0.5", "seed": "3"}', b'{"top_k": -1}', b"{"]))]},
         "parameters": {}}]), max_size=2, unique_by=lambda item: item["name"]))
    return {"model_name": "decoder", "model_version": "", "id": draw(st.text(max_size=4)),
            "inputs": [prompt, *extra], "raw": None, "outputs": [],
            "parameters": draw(SMALL_RUN)}


def _generation_message(request: dict, model: str) -> bytes:
    if request["model_name"] == "decoder":
        request = {**request, "model_name": model}
    return message(request)


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=st.one_of(near_valid_generation(), near_valid_generation(), GENERATION_REQUESTS))
def test_fuzzed_grpc_generation_is_never_internal(served, request: dict) -> None:
    """Random generation requests to the decoder over gRPC, through ModelInfer and
    ModelStreamInfer: no answer is INTERNAL or UNKNOWN, and every request on a stream is
    answered."""
    import grpc

    data = _generation_message(request, served.model_name)
    credentials = grpc.ssl_channel_credentials(served.ca_path.read_bytes())
    with grpc.secure_channel(served.grpc_address, credentials) as channel:
        try:
            channel.unary_unary(INFER)(data, timeout=60)
            event("ModelInfer OK")
        except grpc.RpcError as err:
            event(f"{err.code().name} {err.details()[:50]}")
            assert err.code() not in NEVER, (err.code(), err.details(), data[:200])
        answers = [service_pb2.ModelStreamInferResponse.FromString(raw) for raw in
                   channel.stream_stream(STREAM)(iter([data]), timeout=60)]
    assert answers
    for answer in answers:
        reason = answer.error_message.split("] ", 1)[-1]
        event(f"stream {reason.split(':')[0] or 'OK'}")
        assert not reason.startswith(("INTERNAL", "UNKNOWN")), answer.error_message


# -- REST generation routes fuzzed over the real socket ----------------------------------------
SMALL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.integers()
    | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=3), max_leaves=8)
REST_FIELDS = ["text_input", "input_ids", "parameters", "id", "model", "prompt", "max_tokens",
               "stream", "temperature", "top_k", "top_p", "seed", "n", "stop", "logprobs",
               "stream_options"]
SMALL_PARAMETERS = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(-1, 3) | SMALL_JSON, "temperature": SMALL_JSON,
    "top_k": SMALL_JSON, "top_p": SMALL_JSON, "seed": SMALL_JSON, "stop": SMALL_JSON})
REST_BODIES = st.fixed_dictionaries({}, optional={
    "text_input": st.text(max_size=12) | SMALL_JSON,
    "input_ids": st.lists(st.integers(-2, 300), max_size=6) | SMALL_JSON,
    "parameters": SMALL_PARAMETERS | SMALL_JSON,
    "model": st.sampled_from(["decoder", "decoder", "other"]) | SMALL_JSON,
    "prompt": st.text(max_size=12) | st.lists(st.integers(-1, 300), max_size=4) | SMALL_JSON,
    "max_tokens": st.integers(-1, 3) | SMALL_JSON,
    **{name: SMALL_JSON for name in REST_FIELDS[7:]}})


NEAR_VALID_PARAMETERS = st.fixed_dictionaries(
    {"max_tokens": st.integers(1, 3)},
    optional={"temperature": st.floats(0, 2), "top_k": st.integers(0, 50),
              "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**64 - 1),
              "stop": st.booleans()})
NEAR_VALID_GENERATE = st.one_of(
    st.fixed_dictionaries({"input_ids": st.lists(st.integers(0, 256), min_size=1, max_size=6),
                           "parameters": NEAR_VALID_PARAMETERS}),
    st.fixed_dictionaries({"text_input": st.text(min_size=1, max_size=12),
                           "parameters": NEAR_VALID_PARAMETERS}))
NEAR_VALID_COMPLETIONS = st.fixed_dictionaries(
    {"model": st.just("decoder"), "prompt": st.text(min_size=1, max_size=12)
     | st.lists(st.integers(0, 256), min_size=1, max_size=6), "max_tokens": st.integers(1, 3)},
    optional={"stream": st.booleans(), "temperature": st.floats(0, 2),
              "top_p": st.floats(0.01, 1), "seed": st.integers(0, 2**32)})


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(["generate", "generate_stream", "completions"]),
       data=st.data())
def test_fuzzed_rest_generation_never_gets_a_5xx(served, route: str, data) -> None:
    """Random bodies to generate, generate_stream and /v1/completions, half of them close to
    right for the route (max_tokens kept small): never a 5xx, and a stream that starts
    ends."""
    near = NEAR_VALID_COMPLETIONS if route == "completions" else NEAR_VALID_GENERATE
    body = data.draw(st.one_of(near.map(json.dumps), near.map(json.dumps),
                               REST_BODIES.map(json.dumps), SMALL_JSON.map(json.dumps),
                               st.text(max_size=40)))
    body = body.replace('"decoder"', json.dumps(served.model_name))
    url = (f"{served.url}/v1/completions" if route == "completions" else
           f"{served.url}/v2/models/{served.model_name}/{route}")
    with _client(served) as http, http.stream(
            "POST", url, content=body.encode(),
            headers={"content-type": "application/json"}) as answer:
        event(f"{route} {answer.status_code}")
        assert answer.status_code < 500, (route, body[:200], answer.read()[:200])
        for _ in answer.iter_bytes():  # to its end (a bounded generation)
            pass
