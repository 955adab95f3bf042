"""find_kv_pairs pairs each past input with its present output under every exporter's naming,
finds the batch and sequence axes from the shapes, and refuses what it cannot pair."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import pytest
from onnx import TensorProto, helper

from smlaas.errors import UnsupportedModelError
from smlaas.graph.kv_cache import KvPair, cache_names, find_kv_pairs, is_decoder
from smlaas.zoo.gpt2 import GPT2Config
from smlaas.zoo.gpt2_kv import build_gpt2_kv
from tests.hf_decoder import build_hf_decoder

Shape = Sequence[int | str]


def _signature_model(inputs: dict[str, Shape], outputs: dict[str, Shape], *,
                     elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A graph without nodes: find_kv_pairs reads only the inputs and outputs."""
    def values(tensors: dict[str, Shape]) -> list[onnx.ValueInfoProto]:
        return [helper.make_tensor_value_info(
            name, TensorProto.INT64 if name == "input_ids" else elem_type, list(shape))
            for name, shape in tensors.items()]
    graph = helper.make_graph([], "signature", values(inputs), values(outputs))
    return helper.make_model(graph)


IDS: dict[str, Shape] = {"input_ids": ["batch", "sequence"]}


def test_zoo_decoder_pairs() -> None:
    model = build_gpt2_kv("tiny_kv", GPT2Config(layers=2, d_model=64, heads=4, vocab_size=257))
    pairs = find_kv_pairs(model)
    assert [(p.past, p.present, p.layer, p.kind) for p in pairs] == [
        (f"past_key_values.{layer}.{kind}", f"present.{layer}.{kind}", layer, kind)
        for layer in (0, 1) for kind in ("key", "value")]
    assert {(p.batch_axis, p.sequence_axis) for p in pairs} == {(0, 2)}
    assert pairs[0].shape == ("batch", 4, "past_sequence", 16)
    assert pairs[0].elem_type == TensorProto.FLOAT
    assert {p.bytes_per_token() for p in pairs} == {4 * 16 * 4}
    assert is_decoder(model)


def test_hf_layout_pairs() -> None:
    pairs = find_kv_pairs(build_hf_decoder(layers=3, d_model=48, heads=6))
    assert len(pairs) == 6 and pairs[-1].past == "past_key_values.2.value"
    assert pairs[0].shape == ("batch_size", 6, "past_sequence_length", 8)
    assert {(p.batch_axis, p.sequence_axis, p.bytes_per_token()) for p in pairs} == {
        (0, 2, 6 * 8 * 4)}


def test_pairs_are_sorted_by_layer_then_kind() -> None:
    past: Shape = ["batch", 2, "past", 8]
    present: Shape = ["batch", 2, "total", 8]
    inputs = {**IDS, **{f"past_key_values.{layer}.{kind}": past
                        for layer in (10, 2) for kind in ("value", "key")}}
    outputs = {f"present.{layer}.{kind}": present for layer in (2, 10) for kind in ("key",
                                                                                    "value")}
    pairs = find_kv_pairs(_signature_model(inputs, outputs))
    assert [(p.layer, p.kind) for p in pairs] == [(2, "key"), (2, "value"), (10, "key"),
                                                  (10, "value")]


@pytest.mark.parametrize("past_name, present_name, kind", [
    ("past.3.key", "present.3.key", "key"),
    ("past_key.3", "present_key.3", "key"),
    ("past_value.3", "present_value.3", "value"),
])
def test_other_exporters_names(past_name: str, present_name: str, kind: str) -> None:
    model = _signature_model({**IDS, past_name: ["batch", 2, "past", 8]},
                             {present_name: ["batch", 2, "total", 8]})
    (pair,) = find_kv_pairs(model)
    assert (pair.past, pair.present, pair.layer, pair.kind) == (past_name, present_name, 3, kind)


def test_stacked_past_of_old_gpt2_exports() -> None:
    model = _signature_model({"input_ids": ["N", "S"], "past_0": [2, "N", 12, "P", 64]},
                             {"present_0": [2, "N", 12, "P + S", 64]})
    assert find_kv_pairs(model) == [KvPair(
        past="past_0", present="present_0", layer=0, kind="", sequence_axis=3, batch_axis=1,
        shape=(2, "N", 12, "P", 64), elem_type=TensorProto.FLOAT)]
    assert find_kv_pairs(model)[0].bytes_per_token() == 2 * 12 * 64 * 4


def test_fixed_sizes_and_half_precision() -> None:
    model = _signature_model({"input_ids": [1, 1], "past_key_values.0.key": [1, 2, 16, 8]},
                             {"present.0.key": [1, 2, 17, 8]}, elem_type=TensorProto.FLOAT16)
    (pair,) = find_kv_pairs(model)
    assert (pair.batch_axis, pair.sequence_axis) == (0, 2)
    assert pair.bytes_per_token() == 2 * 8 * 2


def test_a_model_without_a_cache_has_no_pairs() -> None:
    model = _signature_model({**IDS, "attention_mask": ["batch", "sequence"]},
                             {"logits": ["batch", "sequence", 10], "present.0.key": ["b", 1]})
    assert find_kv_pairs(model) == [] and not is_decoder(model)


@pytest.mark.parametrize("inputs, outputs, message", [
    ({"past_key_values.1.key": ["b", 2, "p", 8]}, {"present.0.key": ["b", 2, "t", 8]},
     "past_key_values.1.key needs exactly one present output of layer 1 key"),
    ({"past_key_values.0.key": ["b", 2, "p", 8]},
     {"present.0.key": ["b", 2, "t", 8], "present_key.0": ["b", 2, "t", 8]},
     "found present.0.key, present_key.0"),
    ({"past_key_values.0.key": ["b", 2, "p", 8]}, {"present.0.key": ["b", 2, "p", 8]},
     "cannot tell the sequence axis of KV cache input past_key_values.0.key"),
    ({"past_key_values.0.key": ["b", 2, "p", 8]}, {"present.0.key": ["b", 3, "t", 8]},
     "cannot tell the sequence axis"),
    ({"past_key_values.0.key": ["b", 2, "p", 8]}, {"present.0.key": ["b", "t", 8]},
     "has rank 4 but its present present.0.key has rank 3"),
])
def test_refusals_name_the_past(inputs: dict[str, Shape], outputs: dict[str, Shape],
                                message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message) as raised:
        find_kv_pairs(_signature_model(inputs, outputs))
    assert "\n" not in str(raised.value)


def test_symbolic_heads_cannot_be_sized() -> None:
    model = _signature_model({**IDS, "past_key_values.0.key": ["batch", "heads", "p", 8]},
                             {"present.0.key": ["batch", "heads", "t", 8]})
    (pair,) = find_kv_pairs(model)
    with pytest.raises(UnsupportedModelError, match="symbolic dimensions"):
        pair.bytes_per_token()


def test_cache_names_pair_a_stage_by_name() -> None:
    assert cache_names(["hidden", "past_key_values.4.value", "past_key_values.4.key"],
                       ["present.4.key", "out", "present.4.value"]) == {
        "past_key_values.4.value": "present.4.value", "past_key_values.4.key": "present.4.key"}
    assert cache_names(["x"], ["present.0.key"]) == {}
    with pytest.raises(UnsupportedModelError, match="past_4"):
        cache_names(["past_4"], ["present.4.key"])


@pytest.mark.parametrize("with_input_ids", [True, False], ids=["model", "stage"])
def test_the_batch_named_two_ways_is_one_axis(with_input_ids: bool) -> None:
    """A prepared model names its inputs' batch axis, while an output whose shape inference
    cannot reach (behind ONNX Runtime GenAI's GroupQueryAttention) keeps the exporter's name:
    the pair differs in its sequence axis alone. A stage has no input_ids: its batch is
    axis 0."""
    inputs: dict[str, Shape] = {"past_key_values.0.key": ["batch", 2, "past", 16]}
    if with_input_ids:
        inputs = {"input_ids": ["batch", "sequence"], **inputs}
    model = _signature_model(inputs, {"present.0.key": ["batch_size", 2, "total", 16]})
    (pair,) = find_kv_pairs(model)
    assert (pair.batch_axis, pair.sequence_axis) == (0, 2)


def test_a_second_difference_beyond_the_batch_is_still_refused() -> None:
    model = _signature_model({"input_ids": ["batch", "sequence"],
                              "past_key_values.0.key": ["batch", 2, "past", 16]},
                             {"present.0.key": ["batch_size", 4, "total", 16]})
    with pytest.raises(UnsupportedModelError, match="past_key_values.0.key"):
        find_kv_pairs(model)
