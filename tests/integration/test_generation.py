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
import onnx
import onnxruntime as ort
import pytest

from smlaas.coordinator.owner import OwnerKey
from smlaas.export.sealed_build import seal_build
from smlaas.generation.reference import decode_whole_model
from smlaas.generation.sampling import SamplingParams
from smlaas.partition import GenerationSizes, PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileSettings
from smlaas.zoo.gpt2 import GPT2Config
from smlaas.zoo.gpt2_kv import build_gpt2_kv
from smlaas.zoo.tokenizer import EOS_TOKEN_ID, byte_level_tokenizer, tokenizer_json
from tests.integration.serving_setup import cache_env, deployment, owner_key_path

CONTEXT, SEQUENCES = 128, 4
MODEL = "tiny_kv"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("generation")
    model_path = root / f"{MODEL}.onnx"
    onnx.save(build_gpt2_kv(MODEL, GPT2Config(layers=3, d_model=64, heads=4, vocab_size=257,
                                              max_positions=256)), str(model_path))
    (root / "tokenizer.json").write_text(tokenizer_json())
    with cache_env(root / "cache"):
        build, keys = root / "build", root / "owner-keys.json"
        result = partition(str(model_path), build, cost_model=preset("sgx1"),
                           options=PlanOptions(Planner.DP_THROUGHPUT, 3, True),
                           settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=2),
                           verify=True, measure_memory=False,
                           generation=GenerationSizes(CONTEXT, SEQUENCES))
        assert result.plan.generation is not None and len(result.plan.stages) == 3
        seal_build(build, keys, tokenizer=root / "tokenizer.json")
        OwnerKey.load_or_create(owner_key_path(root))
        with deployment(root, build, keys) as running:
            running.model_path = model_path  # type: ignore[attr-defined]
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
                             json={"input_ids": [1] * CONTEXT,
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
