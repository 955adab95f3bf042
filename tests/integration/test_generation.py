"""Generation from a real deployment (sim backend, real processes on 127.0.0.1): a small
GPT-2-style decoder partitioned by `smlaas partition --max-context --max-sequences` into 3
stages, sealed with its tokenizer, deployed, and asked through the KServe generate extension,
its streaming form, the OpenAI completions API and the SDK. Tokens equal plain ONNX Runtime
greedy decoding of the whole model with its cache."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest

from smlaas.coordinator.server import free_port
from smlaas.generation.reference import decode_whole_model
from smlaas.generation.sampling import SamplingParams
from smlaas.zoo.tokenizer import EOS_TOKEN_ID, byte_level_tokenizer
from tests.integration.serving_setup import DECODER_CONTEXT, cache_env, decoder_deployment


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("generation")
    with cache_env(root / "cache"), decoder_deployment(root, grpc_port=free_port()) as running:
        running.test_cache = root / "cache"  # type: ignore[attr-defined]
        yield running


def expected(model_path: Path, prompt: list[int], tokens: int) -> list[int]:
    """Greedy decoding of the whole model with its cache, ending at end-of-text (which it
    includes), as the deployment does by default."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return decode_whole_model(session, prompt, tokens, SamplingParams(), eos_id=EOS_TOKEN_ID)


def test_generate_equals_whole_model_greedy_decoding(served) -> None:
    tokenizer = byte_level_tokenizer()
    prompt_text = "The enclave keeps the cache; the tokens stream out. " * 1
    prompt = tokenizer.encode(prompt_text).ids[:32]
    want = expected(served.model_path, prompt, 64)
    with served.client() as client:
        result = client.generate(prompt, max_tokens=64, temperature=0.0)
    assert result.output_ids == want
    assert result.text == tokenizer.decode(want, skip_special_tokens=True)


def test_generate_stream_and_openai_completions(served) -> None:
    prompt = "Hello, enclave"
    ids = byte_level_tokenizer().encode(prompt).ids
    want = expected(served.model_path, ids, 12)
    with served.client() as client:
        pieces = list(client.generate(prompt, max_tokens=12, stream=True))
    streamed = [i for piece in pieces for i in piece.output_ids]
    assert streamed == want
    assert pieces[-1].finish_reason in ("stop", "length")
    context = ssl.create_default_context(cafile=str(served.ca_path))
    with httpx.Client(verify=context, timeout=60) as http:
        answer = http.post(f"{served.url}/v1/completions",
                           json={"model": served.model_name, "prompt": prompt,
                                 "max_tokens": 12, "temperature": 0})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == byte_level_tokenizer().decode(
            want, skip_special_tokens=True)
        lines = []
        with http.stream("POST", f"{served.url}/v1/completions",
                         json={"model": served.model_name, "prompt": prompt,
                               "max_tokens": 12, "temperature": 0, "stream": True}) as events:
            assert events.status_code == 200
            lines = [line for line in events.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(line[5:])["choices"][0]["text"] for line in lines[:-1])
        assert text == body["choices"][0]["text"]
        bad = http.post(f"{served.url}/v2/models/{served.model_name}/generate",
                        content=b"{not json")
        assert bad.status_code == 400
        too_long = http.post(f"{served.url}/v2/models/{served.model_name}/generate",
                             json={"input_ids": [1] * DECODER_CONTEXT,
                                   "parameters": {"max_tokens": 2}})
        assert too_long.status_code == 400, too_long.text
        assert "tokens" in json.dumps(too_long.json())


def test_smlaas_generate_cli_streams_the_tokens(served, tmp_path: Path) -> None:
    import subprocess
    import sys

    prompt = "Hello, enclave"
    want = expected(served.model_path, byte_level_tokenizer().encode(prompt).ids, 8)
    result = subprocess.run(
        [sys.executable, "-m", "smlaas", "generate", prompt, "--url", served.url,
         "--ca", str(served.ca_path), "--max-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "SMLAAS_CACHE_DIR": str(served.test_cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["output_ids"] == want


def test_plain_infer_on_a_decoder_is_a_clear_4xx(served) -> None:
    context = ssl.create_default_context(cafile=str(served.ca_path))
    with httpx.Client(verify=context, timeout=60) as http:
        body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2],
                            "data": [1, 2]}]}
        answer = http.post(f"{served.url}/v2/models/{served.model_name}/infer", json=body)
    assert 400 <= answer.status_code < 500, answer.text


def test_generation_shows_in_the_gateways_metrics(served) -> None:
    with served.client() as client:
        result = client.generate([1, 2, 3], max_tokens=5, temperature=0.0)
    context = ssl.create_default_context(cafile=str(served.ca_path))
    text = httpx.get(f"{served.url}/metrics", verify=context, timeout=30).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("smlaas_generation")
              or line.startswith("smlaas_time_to_first_token")}
    model = served.model_name
    assert values[f'smlaas_generation_tokens_total{{kind="generated",model="{model}"}}'] >= \
        len(result.output_ids)
    assert values[f'smlaas_generation_tokens_total{{kind="prompt",model="{model}"}}'] >= 3
    assert values[f'smlaas_time_to_first_token_seconds_count{{model="{model}"}}'] >= 1
    assert values[f'smlaas_generation_sequences{{model="{model}"}}'] == 0


def test_the_async_client_generates_and_streams(served) -> None:
    import asyncio

    from smlaas.client import AsyncInferenceClient

    want = expected(served.model_path, [5, 6, 7], 10)

    async def run() -> tuple[list[int], list[int]]:
        client = AsyncInferenceClient(
            served.url, ca=served.ca_path, policy=served.role_policy("gateway"),
            roots=served.trusted_roots, owner_public_key=served.owner_public_key_path)
        async with client:
            whole = await client.generate([5, 6, 7], max_tokens=10)
            streamed = [i async for piece in client.generate_stream([5, 6, 7], max_tokens=10)
                        for i in piece.output_ids]
            assert client.verdict is not None  # attested before the first request
            return whole.output_ids, streamed

    whole, streamed = asyncio.run(run())
    assert whole == want and streamed == want


def test_a_stage_killed_mid_generation_ends_the_stream_and_the_next_one_is_right(served
                                                                                  ) -> None:
    """SIGKILL a stage while a stream runs: the stream ends promptly with an error event (no
    hang, no wrong tokens); once the stage is back, generation is right again."""
    import os
    import signal
    import threading
    import time

    url = f"{served.url}/v2/models/{served.model_name}/generate_stream"
    context = ssl.create_default_context(cafile=str(served.ca_path))
    events: list[dict] = []
    started = threading.Event()

    def read() -> None:
        with httpx.Client(verify=context, timeout=60) as http, http.stream(
                "POST", url, json={"input_ids": [4, 5, 6],
                                   "parameters": {"max_tokens": 500, "stop": False}}) as answer:
            for line in answer.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    started.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(30)
    launcher = served.launcher
    before = launcher.restarts()["stage-1"]
    os.kill(launcher.pid("stage-1"), signal.SIGKILL)
    killed_at = time.monotonic()
    reader.join(30)
    assert not reader.is_alive(), "the stream hung after its stage died"
    assert time.monotonic() - killed_at < 30
    assert "error" in events[-1] or events[-1].get("finish_reason"), events[-1]
    deadline = time.monotonic() + 30
    while launcher.restarts()["stage-1"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # past the gateway's cached readiness
    served.wait_ready(timeout_s=60)
    with served.client() as client:
        result = client.generate([7, 8, 9], max_tokens=12, temperature=0.0)
    assert result.output_ids == expected(served.model_path, [7, 8, 9], 12)


def _grpc_inputs(grpcclient, **values):
    """tritonclient InferInputs for the named generation inputs."""
    import numpy as np

    kinds = {"text_input": "BYTES", "sampling_parameters": "BYTES", "input_ids": "INT64",
             "stream": "BOOL", "exclude_input_in_output": "BOOL"}
    inputs = []
    for name, value in values.items():
        array = np.array(value if isinstance(value, list) else [value],
                         dtype={"BYTES": object, "INT64": np.int64, "BOOL": bool}[kinds[name]])
        tensor = grpcclient.InferInput(name, list(array.shape), kinds[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_tritonclient_grpc_generates_whole_and_streamed(served) -> None:
    """tritonclient.grpc as Triton's LLM clients use it: ModelInfer answers the whole text,
    ModelStreamInfer (start_stream / async_stream_infer) a response per token, ending with the
    final flag; tokens equal the whole model's greedy decoding; the model's config says it
    is decoupled."""
    import queue

    grpcclient = pytest.importorskip("tritonclient.grpc")
    tokenizer = byte_level_tokenizer()
    prompt = "Hello, enclave"
    ids = tokenizer.encode(prompt).ids
    want = expected(served.model_path, ids, 12)
    client = grpcclient.InferenceServerClient(served.grpc_address, ssl=True,
                                              root_certificates=str(served.ca_path))
    model = served.model_name
    config = client.get_model_config(model, as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True
    metadata = client.get_model_metadata(model, as_json=True)
    assert {"text_input", "input_ids"} <= {i["name"] for i in metadata["inputs"]}

    whole = client.infer(model, _grpc_inputs(grpcclient, text_input=prompt.encode()),
                         parameters={"max_tokens": 12, "temperature": 0})
    assert list(whole.as_numpy("output_ids")) == want
    assert whole.as_numpy("text_output")[0].decode() == tokenizer.decode(
        want, skip_special_tokens=True)
    assert whole.get_response().parameters["finish_reason"].string_param in ("stop", "length")
    with_prompt = client.infer(model, _grpc_inputs(
        grpcclient, text_input=prompt.encode(), exclude_input_in_output=False,
        sampling_parameters=json.dumps({"max_tokens": "12", "temperature": "0"}).encode()))
    assert with_prompt.as_numpy("text_output")[0].decode() == \
        prompt + tokenizer.decode(want, skip_special_tokens=True)

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(model, _grpc_inputs(grpcclient, input_ids=ids, stream=True),
                                  request_id="r1", parameters={"max_tokens": 12},
                                  enable_empty_final_response=True)
        streamed, text, last = [], "", None
        while True:
            result, error = answers.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            assert response.id == "r1"
            streamed += list(result.as_numpy("output_ids"))
            text += result.as_numpy("text_output")[0].decode()
            if response.parameters["triton_final_response"].bool_param:
                last = response
                break
        assert streamed == want
        assert text == tokenizer.decode(want, skip_special_tokens=True)
        assert last.parameters["completion_tokens"].int64_param == len(want)
        client.async_stream_infer(model, _grpc_inputs(grpcclient, input_ids=[1, 2],
                                                      text_input=b"both"),
                                  request_id="bad")
        result, error = answers.get(timeout=60)
        assert error is not None and "exactly one" in str(error)
    finally:
        client.stop_stream()
        client.close()


def test_grpc_generation_refuses_what_it_cannot_do(served) -> None:
    from tritonclient.utils import InferenceServerException

    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(served.grpc_address, ssl=True,
                                              root_certificates=str(served.ca_path))
    model = served.model_name
    for inputs, options, message in (
            ({"text_input": b"hi", "stream": True}, {}, "ModelStreamInfer"),
            ({"text_input": b"hi"}, {"parameters": {"max_tokens": 0}}, "max_tokens"),
            ({"text_input": b"hi"}, {"parameters": {"temperature": "hot"}}, "temperature"),
            ({"text_input": b"hi"}, {"sequence_id": 3}, "unknown parameters"),
            ({"input_ids": [1, 2, 10**6]}, {}, "vocabulary"),
            ({"text_input": b"x" * (DECODER_CONTEXT + 1)}, {}, "keeps"),
            ({"sampling_parameters": b"[1]", "text_input": b"hi"}, {}, "JSON object")):
        with pytest.raises(InferenceServerException, match=message) as caught:
            client.infer(model, _grpc_inputs(grpcclient, **inputs), **options)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    client.close()


def test_a_decoder_exported_by_hugging_face_optimum_generates_its_own_tokens(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A GPT-2 exported by Hugging Face optimum itself (tests/data/hf_decoder), partitioned
    into 3 stages, sealed and deployed: its tokens, greedy and seeded, over REST and gRPC,
    equal plain ONNX Runtime decoding of the exported file with its cache."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    source = Path(__file__).parents[1] / "data" / "hf_decoder" / "gpt2_tiny_optimum.onnx"
    root = tmp_path_factory.mktemp("optimum-decoder")
    with cache_env(root / "cache"), decoder_deployment(
            root, source=source, context=128, grpc_port=free_port()) as running:
        prompt = byte_level_tokenizer().encode("Exported by optimum").ids
        session = ort.InferenceSession(str(running.model_path),
                                       providers=["CPUExecutionProvider"])
        sampled = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
        greedy_want = decode_whole_model(session, prompt, 48, SamplingParams(),
                                         eos_id=EOS_TOKEN_ID)
        sampled_want = decode_whole_model(session, prompt, 48, sampled, eos_id=EOS_TOKEN_ID)
        assert len(set(greedy_want)) > 5  # its tokens vary: the equality means something
        with running.client() as client:
            assert client.generate(prompt, max_tokens=48, temperature=0.0).output_ids == \
                greedy_want
            assert client.generate(prompt, max_tokens=48, temperature=0.9, top_k=40,
                                   top_p=0.95, seed=11).output_ids == sampled_want
        grpc = grpcclient.InferenceServerClient(running.grpc_address, ssl=True,
                                                root_certificates=str(running.ca_path))
        result = grpc.infer(running.model_name, _grpc_inputs(grpcclient, input_ids=prompt),
                            parameters={"max_tokens": 48})
        assert list(result.as_numpy("output_ids")) == greedy_want
        grpc.close()
