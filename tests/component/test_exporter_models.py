"""The partition job and the CLI on models with real exporters' constructs (see
tests/exporter_models.py): each partitions and verifies, or is refused with exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from smlaas.cli.main import EXIT_BAD_INPUT, main
from smlaas.export import StageExtractor, read_plan, verify_chain
from smlaas.export.batching import batching_problem
from smlaas.export.sealed_build import ServingNote, seal_build
from smlaas.partition import ModelSource, PlanOptions, analyse, partition, verify_build
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings
from smlaas.profile.inputs import random_inputs
from smlaas.profile.samples import SAMPLES_FILE
from tests.exporter_models import (
    dynamic_attention_model,
    fp16_model,
    nonzero_model,
    paddle_style_model,
    qdq_cnn_model,
    value_switched_lstm_model,
    zipmap_classifier_model,
)

FAST = ProfileSettings(threads=1, warmup_runs=1, measured_runs=1)


def _partition(model: onnx.ModelProto, tmp_path: Path, sizes=(), *, build: str = "build",
               input_values=(), **options):
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    plan_options = PlanOptions(**{"planner": Planner.DP_THROUGHPUT, "machines": 2, **options})
    return partition(str(path), tmp_path / build, input_size_specs=list(sizes),
                     cost_model=preset("sgx1"), options=plan_options, settings=FAST,
                     cache=ProfileCache(tmp_path / "cache"), input_values=input_values)


def test_paddle_export_with_minus_one_dims_partitions_and_verifies(tmp_path: Path) -> None:
    result = _partition(paddle_style_model(), tmp_path, ["1,3,6,8"])
    assert result.verification is not None and result.verification.ok
    assert verify_build(tmp_path / "build", threads=1).ok


def _cli_partition(model: onnx.ModelProto, tmp_path: Path, *args: str) -> int:
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return main(["partition", "--model", str(path), "--build-dir", str(tmp_path / "build"),
                 "--threads", "1", "--runs", "1", "--no-cache", *args])


def test_zipmap_output_is_refused_in_one_line_with_exit_code_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli_partition(zipmap_classifier_model(), tmp_path, "--input-size", "2,4") \
        == EXIT_BAD_INPUT
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "node 'ZipMap' (ai.onnx.ml.ZipMap)" in message
    assert "'probabilities', a sequence of maps" in message and "unsupported by design" in message
    assert not (tmp_path / "build").exists()



@pytest.mark.parametrize("fp32_io", [True, False], ids=["fp32-io-casts", "fp16-io"])
def test_fp16_models_verify_at_every_cut_with_fp16_tolerances(fp32_io: bool) -> None:
    model = fp16_model(fp32_io=fp32_io)
    shapes = {"x": (4, 64)}
    analysis = analyse(ModelSource("fp16", "test", "-", model), shapes, threads=1)
    extractor = StageExtractor(analysis.prepared, analysis.graph)
    n = analysis.graph.node_count
    for cut in range(1, n):
        stages = [extractor.extract(0, cut, name="s0"), extractor.extract(cut, n, name="s1")]
        report = verify_chain(model, stages, shapes, threads=1, seeds=(0, 1), served=False)
        assert report.ok, f"cut {cut}: {report.summary()}"
        assert report.tolerances["probs"].precision == "float16"
        assert "float16: rtol 0.00977, atol 0.000977 x max|expected|" in report.summary()
    # The fp16 tolerance still catches a changed stage.
    first, second = (extractor.extract(0, 7, name="s0"), extractor.extract(7, n, name="s1"))
    weight = next(t for t in second.graph.initializer if t.name == "w3")
    values = onnx.numpy_helper.to_array(weight) * np.float16(1.5)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, "w3"))
    assert not verify_chain(model, [first, second], shapes, threads=1, served=False).ok


def test_fp16_build_states_its_tolerances_in_the_report(tmp_path: Path) -> None:
    result = _partition(fp16_model(fp32_io=False), tmp_path, ["4,64"], machines=3)
    assert result.verification is not None and result.verification.ok
    report = (tmp_path / "build" / "report.md").read_text()
    assert "| tolerance |" in report
    assert "float16: rtol 0.00977, atol 0.000977 x max|expected|" in report


def test_value_switched_model_needs_sample_values_and_then_verifies(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = value_switched_lstm_model()
    # Random int64 inputs give sr 0 or 1, which the model refuses: say what to give instead.
    assert _cli_partition(model, tmp_path, "--input-size", "input:2,1,8") == EXIT_BAD_INPUT
    assert "--input-value NAME=VALUE" in capsys.readouterr().err
    for sr in (16000, 8000):
        result = _partition(model, tmp_path, ["input:2,1,8"], build=f"b{sr}",
                            input_values=[f"sr={sr}"])
        assert result.verification is not None and result.verification.ok
        assert verify_build(tmp_path / f"b{sr}", threads=1).ok  # with the kept samples
        kept = np.load(tmp_path / f"b{sr}" / SAMPLES_FILE)
        assert int(kept["sr"]) == sr


def test_every_cut_of_a_value_switched_model_verifies_on_sample_inputs(tmp_path: Path) -> None:
    model = value_switched_lstm_model()
    shapes = {"input": (2, 1, 8), "sr": ()}
    samples = {"sr": np.array(16000, np.int64)}
    analysis = analyse(ModelSource("vad", "test", "-", model), shapes, threads=1,
                       samples=samples)
    extractor = StageExtractor(analysis.prepared, analysis.graph)
    n = analysis.graph.node_count
    for cut in range(1, n):
        stages = [extractor.extract(0, cut, name="s0"), extractor.extract(cut, n, name="s1")]
        holding_if = next(s for s in stages if any(x.op_type == "If" for x in s.graph.node))
        # The stage that runs the If is typed as loosely as the exporter typed it.
        assert all(not d.HasField("dim_value") for i in holding_if.graph.input
                   for d in i.type.tensor_type.shape.dim)
        report = verify_chain(model, stages, shapes, threads=1, samples=samples)
        assert report.ok, f"cut {cut}: {report.summary()}"


def test_sample_inputs_file_gives_sizes_and_values(tmp_path: Path) -> None:
    samples = tmp_path / "samples.npz"
    rng = np.random.default_rng(5)
    np.savez(samples, input=rng.standard_normal((3, 1, 8)).astype(np.float32),
             sr=np.array(16000))
    assert _cli_partition(value_switched_lstm_model(), tmp_path, "--sample-inputs",
                          str(samples)) == 0
    plan = read_plan(tmp_path / "build")
    assert plan.model.input_shapes == {"input": [3, 1, 8], "sr": []}
    kept = np.load(tmp_path / "build" / SAMPLES_FILE)
    np.testing.assert_array_equal(kept["input"], np.load(samples)["input"])


def test_qdq_model_partitions_and_verifies(tmp_path: Path) -> None:
    result = _partition(qdq_cnn_model(tmp_path), tmp_path, machines=3)
    assert result.verification is not None and result.verification.ok
    weights = {t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    for stage in result.plan.stages[1:]:
        model = onnx.load(str(tmp_path / "build" / stage.file_name))
        crossing = {i.name for i in model.graph.input}
        produced_by_dq = {n.output[0] for n in model.graph.node
                          if n.op_type == "DequantizeLinear" and n.input[0] in weights}
        assert not crossing & produced_by_dq


def _two_stages_at_every_cut(analysis):
    """(cut, [stage 0, stage 1]) for every cut position inside the analysed model."""
    extractor = StageExtractor(analysis.prepared, analysis.graph)
    n = analysis.graph.node_count
    for cut in range(1, n):
        yield cut, [extractor.extract(0, cut, name="s0"), extractor.extract(cut, n, name="s1")]


def test_data_dependent_shapes_cross_cuts_without_fixed_sizes() -> None:
    model = nonzero_model()
    shapes = {"x": (4, 8)}
    analysis = analyse(ModelSource("nz", "test", "-", model), shapes, threads=1)
    graph = analysis.graph
    assert {"where", "indices", "picked", "detections"} == set(graph.data_dependent)
    for cut, stages in _two_stages_at_every_cut(analysis):
        for value in [*stages[1].graph.input, *stages[1].graph.output]:
            dims = value.type.tensor_type.shape.dim
            fixed = all(d.HasField("dim_value") for d in dims)
            assert fixed == (value.name not in graph.data_dependent), (cut, value.name)
        # Seeds give different numbers of positive entries: no shape may be frozen.
        report = verify_chain(model, stages, shapes, threads=1, seeds=(0, 1, 2, 3))
        assert report.ok, f"cut {cut}: {report.summary()}"


def _attention_shapes(batch: int, sequence: int = 5) -> dict[str, tuple[int, ...]]:
    return {"hidden": (batch, sequence, 16), "attention_mask": (batch, sequence)}


def test_dynamic_batch_stays_symbolic_and_every_cut_runs_at_batch_1_and_4() -> None:
    model = dynamic_attention_model()
    analysis = analyse(ModelSource("attn", "test", "-", model), _attention_shapes(1),
                       threads=1)
    graph = analysis.graph
    # The batch-dependent shape chain is computed at run time, not folded to [1, 5, 2, 8].
    assert {"Shape", "Concat", "Reshape", "Expand"} <= {n.op_type for n in graph.nodes}
    for cut, stages in _two_stages_at_every_cut(analysis):
        for value in [*stages[1].graph.input, *stages[1].graph.output]:
            dims = value.type.tensor_type.shape.dim
            if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                assert dims[0].dim_param == "batch", (cut, value.name)
                assert all(d.HasField("dim_value") for d in dims[1:]), (cut, value.name)
        for batch in (1, 4):
            report = verify_chain(model, stages, _attention_shapes(batch), threads=1,
                                  seeds=(0, 1))
            assert report.ok, f"cut {cut}, batch {batch}: {report.summary()}"
        assert batching_problem(stages, random_inputs(model, _attention_shapes(1))) is None


def test_dynamic_batch_transformer_partitions_and_seals_with_batching(tmp_path: Path) -> None:
    result = _partition(dynamic_attention_model(), tmp_path,
                        ["hidden:1,5,16", "attention_mask:1,5"], machines=3)
    assert result.verification is not None and result.verification.ok
    assert len(result.plan.stages) > 1
    build = tmp_path / "build"
    stages = [onnx.load(str(build / s.file_name)) for s in result.plan.stages]
    whole = onnx.load(str(tmp_path / "model.onnx"))
    for batch in (1, 4):
        report = verify_chain(whole, stages, _attention_shapes(batch), threads=1)
        assert report.ok, f"batch {batch}: {report.summary()}"
    assert batching_problem(stages, random_inputs(whole, _attention_shapes(1))) is None
    seal_build(build, tmp_path / "owner-keys.json")
    note = ServingNote.of(read_plan(build / "sealed"))
    assert note.max_batch_size == 8, note.batching
    assert read_plan(build).model.dynamic_axes == {"hidden": [0], "attention_mask": [0]}
    assert "symbolic in the stages: hidden axis 0" in (build / "report.md").read_text()


def test_dynamic_sequence_axis_stays_symbolic_when_asked(tmp_path: Path) -> None:
    model = dynamic_attention_model()
    analysis = analyse(ModelSource("attn", "test", "-", model), _attention_shapes(1),
                       threads=1, dynamic_axes={"hidden": (1,), "attention_mask": (1,)})
    extractor = StageExtractor(analysis.prepared, analysis.graph)
    n = analysis.graph.node_count
    cut = next(p for p in range(1, n) if "probs" in analysis.graph.cut_tensors(p))
    stages = [extractor.extract(0, cut, name="s0"), extractor.extract(cut, n, name="s1")]
    probs = next(v for v in stages[1].graph.input if v.name == "probs")
    assert [d.dim_param or d.dim_value for d in probs.type.tensor_type.shape.dim] == \
        ["batch", 2, "sequence_length", "sequence_length"]
    for batch, sequence in ((1, 5), (4, 5), (3, 9)):
        report = verify_chain(model, stages, _attention_shapes(batch, sequence), threads=1)
        assert report.ok, f"batch {batch}, sequence {sequence}: {report.summary()}"
    assert analysis.model_ref().dynamic_axes == {"hidden": [0, 1], "attention_mask": [0, 1]}
