"""The partition job and the CLI on models with real exporters' constructs (see
tests/exporter_models.py): each partitions and verifies, or is refused with exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from smlaas.cli.main import EXIT_BAD_INPUT, main
from smlaas.export import StageExtractor, verify_chain
from smlaas.partition import ModelSource, PlanOptions, analyse, partition, verify_build
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings
from tests.exporter_models import fp16_model, paddle_style_model, zipmap_classifier_model

FAST = ProfileSettings(threads=1, warmup_runs=1, measured_runs=1)


def _partition(model: onnx.ModelProto, tmp_path: Path, sizes=(), *, build: str = "build",
               **options):
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    plan_options = PlanOptions(**{"planner": Planner.DP_THROUGHPUT, "machines": 2, **options})
    return partition(str(path), tmp_path / build, input_size_specs=list(sizes),
                     cost_model=preset("sgx1"), options=plan_options, settings=FAST,
                     cache=ProfileCache(tmp_path / "cache"))


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
