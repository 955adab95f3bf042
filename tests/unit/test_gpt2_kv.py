"""The KV-cache decoders (the zoo's and the Hugging-Face-layout test one), their tokenizer and
reference decoding: a cache gives the logits of full recomputation, a left-padded row those it
gets alone, and the zoo entries export with their tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smlaas import zoo
from smlaas.cli.main import main
from smlaas.errors import GenerationError
from smlaas.generation.reference import decode_batch, decode_whole_model
from smlaas.generation.sampling import SamplingParams
from smlaas.zoo.gpt2 import GPT2Config
from smlaas.zoo.gpt2_kv import build_gpt2_kv
from smlaas.zoo.tokenizer import (
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    byte_level_tokenizer,
    byte_symbols,
    tokenizer_json,
)
from tests.hf_decoder import build_hf_decoder

SMALL = GPT2Config(layers=2, d_model=64, heads=4, vocab_size=VOCAB_SIZE)
CACHE_TOLERANCE = 1e-4
"""Incremental against full recomputation: different MatMul shapes sum in other orders."""
PADDING_TOLERANCE = 1e-5
"""A left-padded row against itself alone: masked keys weigh exactly 0."""


class _Runner:
    """One decoder session, fed and read by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.session = ort.InferenceSession(model.SerializeToString(),
                                            providers=["CPUExecutionProvider"])
        self.pasts = [i for i in self.session.get_inputs() if i.name.startswith("past")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.vocab = self.session.get_outputs()[0].shape[-1]

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        return {p.name: np.zeros((batch, p.shape[1], 0, p.shape[3]), np.float32)
                for p in self.pasts}

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            pasts: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **pasts}
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        presents = {name.replace("present", "past_key_values"): value
                    for name, value in out.items() if name.startswith("present")}
        return out["logits"], presents


DECODERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "zoo": lambda: build_gpt2_kv("small_kv", SMALL),
    "hf": lambda: build_hf_decoder(layers=2, d_model=64, heads=4, vocab=300),
}


@pytest.fixture(scope="module", params=list(DECODERS))
def runner(request: pytest.FixtureRequest) -> _Runner:
    return _Runner(DECODERS[request.param]())


def _ones(batch: int, length: int) -> np.ndarray:
    return np.ones((batch, length), np.int64)


def test_incremental_decoding_equals_full_recomputation(runner: _Runner) -> None:
    ids = np.random.default_rng(1).integers(0, runner.vocab, (2, 9))
    positions = np.broadcast_to(np.arange(9), (2, 9))
    full, _ = runner.run(ids, _ones(2, 9), positions, runner.empty(2))
    logits, pasts = runner.run(ids[:, :5], _ones(2, 5), positions[:, :5], runner.empty(2))
    np.testing.assert_allclose(logits, full[:, :5], atol=CACHE_TOLERANCE)
    for t in range(5, 9):
        logits, pasts = runner.run(ids[:, t:t + 1], _ones(2, t + 1), positions[:, t:t + 1],
                                   pasts)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=CACHE_TOLERANCE)
    # Several tokens at once on top of a cache too (a second chunk of a prompt).
    _, pasts = runner.run(ids[:, :3], _ones(2, 3), positions[:, :3], runner.empty(2))
    chunk, _ = runner.run(ids[:, 3:], _ones(2, 9), positions[:, 3:], pasts)
    np.testing.assert_allclose(chunk, full[:, 3:], atol=CACHE_TOLERANCE)


def test_left_padded_batch_gives_each_row_its_own_logits(runner: _Runner) -> None:
    rng = np.random.default_rng(2)
    lengths = [3, 7, 5]
    prompts = [rng.integers(0, runner.vocab, n) for n in lengths]
    steps = rng.integers(0, runner.vocab, (3, len(lengths)))  # the tokens fed after prefill
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
    batch_logits, batch_pasts = runner.run(ids, mask, positions, runner.empty(len(lengths)))
    batch_steps = []
    for tokens in steps:
        mask = np.concatenate([mask, _ones(len(lengths), 1)], axis=1)
        positions = positions[:, -1:] + 1
        logits, batch_pasts = runner.run(tokens[:, None], mask, positions, batch_pasts)
        batch_steps.append(logits[:, 0])
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        alone, pasts = runner.run(prompt[None], _ones(1, n), np.arange(n)[None],
                                  runner.empty(1))
        np.testing.assert_allclose(batch_logits[row, width - n:], alone[0],
                                   atol=PADDING_TOLERANCE)
        for step, tokens in enumerate(steps):
            logits, pasts = runner.run(tokens[row:row + 1, None], _ones(1, n + step + 1),
                                       np.array([[n + step]]), pasts)
            np.testing.assert_allclose(batch_steps[step][row], logits[0, 0],
                                       atol=PADDING_TOLERANCE)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_zoo_decoder_has_the_genai_layout() -> None:
    model = build_gpt2_kv("small_kv", SMALL)
    onnx.checker.check_model(model, full_check=True)
    inputs = {i.name: _dims(i) for i in model.graph.input}
    outputs = {o.name: _dims(o) for o in model.graph.output}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["position_ids"] == ["batch", "sequence"]
    assert inputs["past_key_values.1.value"] == ["batch", 4, "past_sequence", 16]
    assert list(outputs)[0] == "logits" and outputs["logits"] == ["batch", "sequence", 257]
    assert outputs["present.1.key"] == ["batch", 4, "total_sequence", 16]
    assert len(inputs) == 3 + 2 * SMALL.layers and len(outputs) == 1 + 2 * SMALL.layers


def test_only_a_layers_own_nodes_touch_its_cache() -> None:
    model = build_gpt2_kv("small_kv", SMALL)
    for node in model.graph.node:
        for name in [*node.input, *node.output]:
            if name.startswith(("past_key_values.", "present.")):
                layer = name.split(".")[-2]
                assert node.name.startswith(f"transformer.h.{layer}."), (node.name, name)
    bias_readers = [n.name for n in model.graph.node if "transformer.attention_bias" in n.input]
    assert bias_readers == [f"transformer.h.{i}.attn.mask" for i in range(SMALL.layers)]


def test_zoo_entries_are_decoders_with_a_tokenizer() -> None:
    entry = zoo.get("gpt2_small4_kv")
    assert entry.is_decoder and entry.tokenizer_json is not None
    assert zoo.get("gpt2_small_kv").is_decoder
    assert not zoo.get("gpt2_small4").is_decoder and zoo.get("gpt2_small4").tokenizer_json is None
    assert entry.size_parameter((1, 16)) == entry.size_parameter(None)  # sizes are ignored


def test_export_writes_model_and_tokenizer(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "export", "gpt2_small4_kv", "-o", str(tmp_path / "m.onnx")]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    assert (tmp_path / "tokenizer.json").read_text(encoding="utf-8") == tokenizer_json()
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    # GPT-2 small's 124,439,808 parameters less 8 blocks and 50,000 of its 50,257 tokens.
    assert zoo.count_parameters(model) == 124_439_808 - 8 * 7_087_872 - 50_000 * 768
    assert main(["zoo", "export", "gpt2_small4_kv", "-o", str(tmp_path / "f.onnx"),
                 "--input-size", "1,16"]) == 2
    assert "without --input-size" in capsys.readouterr().err
    assert not (tmp_path / "f.onnx").exists()


def test_zoo_list_shows_the_decoders(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "list", "--json"]) == 0
    listing = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listing["gpt2_small4_kv"]["kv_cache"] and listing["gpt2_small_kv"]["kv_cache"]
    assert not listing["gpt2_small4"]["kv_cache"]


# -- tokenizer -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_round_trips_byte_by_byte(text: str) -> None:
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(text).ids
    if "<|endoftext|>" not in text:
        assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_end_of_text_is_token_256() -> None:
    tokenizer = byte_level_tokenizer()
    assert EOS_TOKEN_ID == 256 == tokenizer.token_to_id("<|endoftext|>")
    assert tokenizer.get_vocab_size() == VOCAB_SIZE == 257
    assert tokenizer.encode("a<|endoftext|>").ids == [97, EOS_TOKEN_ID]
    assert tokenizer.decode([104, 105, EOS_TOKEN_ID]) == "hi"
    assert len(set(byte_symbols())) == 256


def test_tokenizer_json_is_the_same_in_every_process() -> None:
    code = "from smlaas.zoo.tokenizer import tokenizer_json; print(tokenizer_json(), end='')"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                           timeout=60).stdout.decode("utf-8")
    assert other == tokenizer_json() == tokenizer_json()
    assert json.loads(other)["added_tokens"][0]["id"] == EOS_TOKEN_ID


# -- reference decoding ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_session() -> ort.InferenceSession:
    return ort.InferenceSession(build_gpt2_kv("small_kv", SMALL).SerializeToString(),
                                providers=["CPUExecutionProvider"])


PROMPTS = [[72, 101, 108, 108, 111], [1, 2], [200, 3, 4, 5, 6, 7, 8, 9, 10], [33]]


@pytest.mark.parametrize("params", [SamplingParams(),
                                    SamplingParams(temperature=1.0, top_k=40, seed=5)],
                         ids=["greedy", "sampled"])
def test_batch_decoding_equals_each_prompt_alone(zoo_session: ort.InferenceSession,
                                                 params: SamplingParams) -> None:
    alone = [decode_whole_model(zoo_session, p, 16, params) for p in PROMPTS]
    assert all(len(tokens) == 16 for tokens in alone)
    assert decode_batch(zoo_session, PROMPTS, 16, params) == alone
    assert [decode_whole_model(zoo_session, p, 16, params) for p in PROMPTS] == alone


def test_decoding_stops_at_end_of_text(zoo_session: ort.InferenceSession) -> None:
    params = SamplingParams(temperature=2.0, seed=11)
    free = decode_whole_model(zoo_session, PROMPTS[0], 40, params)
    eos = free[5]
    stopped = decode_whole_model(zoo_session, PROMPTS[0], 40, params, eos_id=eos)
    assert stopped == free[:free.index(eos) + 1]
    batch = decode_batch(zoo_session, [PROMPTS[0], PROMPTS[1]], 40, params, eos_id=eos)
    assert batch[0] == stopped
    assert decode_whole_model(zoo_session, PROMPTS[0], 0, params) == []


@pytest.mark.parametrize("prompt", [[], [-1], [VOCAB_SIZE]])
def test_bad_prompts_are_refused(zoo_session: ort.InferenceSession, prompt: list[int]) -> None:
    with pytest.raises(GenerationError):
        decode_whole_model(zoo_session, prompt, 4, SamplingParams())


def test_reference_decoding_runs_the_hf_layout() -> None:
    session = ort.InferenceSession(build_hf_decoder().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    alone = [decode_whole_model(session, p, 8, SamplingParams()) for p in PROMPTS]
    assert decode_batch(session, PROMPTS, 8, SamplingParams()) == alone
    assert len({tuple(tokens) for tokens in alone}) > 1
