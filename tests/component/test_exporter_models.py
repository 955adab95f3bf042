"""The partition job and the CLI on models with real exporters' constructs (see
tests/exporter_models.py): each partitions and verifies, or is refused with exit code 2."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from smlaas.cli.main import EXIT_BAD_INPUT, main
from smlaas.partition import PlanOptions, partition, verify_build
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings
from tests.exporter_models import paddle_style_model, zipmap_classifier_model

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

