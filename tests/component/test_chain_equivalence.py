"""The chain of extracted sub-models computes what the whole model computes, at every cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from smlaas import zoo
from smlaas.export import StageExtractor, verify_chain
from smlaas.graph import ModelGraph, resolve_input_sizes
from smlaas.partition import ModelSource, analyse
from smlaas.zoo.bert import build_bert_base
from tests.models import chain_model, exporter_style_model, if_model, multi_input_model, skip_model

RTOL, ATOL = 1e-4, 1e-5


def _source(model: onnx.ModelProto) -> ModelSource:
    return ModelSource(name=model.graph.name, source="test", sha256="-", model=model)


CASES = {
    "chain": (chain_model, {"": (2, 8)}),
    "skip": (skip_model, {}),
    "if": (if_model, {}),
    "multi_input": (multi_input_model, {"ids": (2, 5), "feat": (2, 6)}),
    "exporter_style": (exporter_style_model, {"": (2, 3, 8, 8)}),
    "mobilenet_v2": (lambda: zoo.build_model("mobilenet_v2", (1, 3, 32, 32)),
                     {"": (1, 3, 32, 32)}),
    "bert_2_layers": (lambda: build_bert_base(sequence_length=4, layers=2,
                                                          vocab_size=1000), {"": (1, 4)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_two_stage_split_matches_the_whole_model(case: str) -> None:
    make, sizes = CASES[case]
    model = make()
    shapes = resolve_input_sizes(model, sizes)
    analysis = analyse(_source(model), shapes, threads=1)
    graph: ModelGraph = analysis.graph
    extractor = StageExtractor(analysis.prepared, graph)
    n = graph.node_count
    # Every cut for small graphs; an even spread of 25 for the larger ones.
    positions = range(1, n) if n <= 40 else np.linspace(1, n - 1, 15).astype(int)
    for cut in positions:
        stages = [extractor.extract(0, int(cut), name="s0"),
                  extractor.extract(int(cut), n, name="s1")]
        for stage in stages:
            onnx.checker.check_model(stage)
        report = verify_chain(model, stages, shapes, threads=1, seeds=(0,), rtol=RTOL,
                              atol=ATOL)
        assert report.ok, f"cut {cut}: {report.summary()}"


def test_three_stages_hold_only_their_own_weights() -> None:
    model = zoo.build_model("resnet18", (1, 3, 64, 64))
    shapes = resolve_input_sizes(model, {"": (1, 3, 64, 64)})
    analysis = analyse(_source(model), shapes, threads=1)
    extractor = StageExtractor(analysis.prepared, analysis.graph)
    n = analysis.graph.node_count
    cuts = [0, n // 3, 2 * n // 3, n]
    stages = [extractor.extract(a, b, name=f"s{k}") for k, (a, b) in
              enumerate(zip(cuts, cuts[1:]))]
    names = [{t.name for t in s.graph.initializer} for s in stages]
    assert not (names[0] & names[1]) and not (names[1] & names[2])
    total = sum(len(x) for x in names)
    assert total == len({t.name for t in analysis.prepared.graph.initializer
                         if t.name.endswith((".weight", ".bias", "running_mean",
                                             "running_var"))} | set().union(*names))
    report = verify_chain(model, stages, shapes, threads=1, seeds=(0, 1))
    assert report.ok and report.stage_count == 3


def test_a_changed_stage_is_caught(tmp_path: Path) -> None:
    model = chain_model()
    shapes = resolve_input_sizes(model, {"": (2, 8)})
    analysis = analyse(_source(model), shapes, threads=1)
    extractor = StageExtractor(analysis.prepared, analysis.graph)
    first = extractor.extract(0, 6, name="s0")
    second = extractor.extract(6, analysis.graph.node_count, name="s1")
    weight = next(t for t in second.graph.initializer if t.name == "w2")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[0, 0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(values, "w2"))
    report = verify_chain(model, [first, second], shapes, threads=1)
    assert not report.ok and report.max_abs_error > 1e-3
