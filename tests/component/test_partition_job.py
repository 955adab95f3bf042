"""The partition job on models from files: external data, exporter-style, multi-input."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from smlaas.errors import BuildDirError, InfeasiblePlanError, ModelError
from smlaas.export import read_plan
from smlaas.partition import PlanOptions, partition, verify_build
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings
from smlaas.zoo import build_model
from tests.models import exporter_style_model, huge_matmul_model, multi_input_model

FAST = ProfileSettings(threads=1, warmup_runs=1, measured_runs=2)


def _partition(model_path: Path, build: Path, sizes=(), **plan_kwargs):
    options = PlanOptions(**{"planner": Planner.DP_LATENCY, **plan_kwargs})
    return partition(str(model_path), build, input_size_specs=sizes,
                     cost_model=preset("sgx1"), options=options, settings=FAST,
                     cache=ProfileCache(build.parent / "cache"))


def test_external_data_model(tmp_path: Path) -> None:
    model = build_model("resnet18", (1, 3, 64, 64))
    path = tmp_path / "resnet18.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="resnet18.data",
              size_threshold=1024)
    assert (tmp_path / "resnet18.data").stat().st_size > 40_000_000
    result = _partition(path, tmp_path / "build", ["1,3,64,64"], planner=Planner.GREEDY_EPC,
                        machines=3)
    assert result.verification is not None and result.verification.ok
    assert len(result.plan.stages) >= 1
    assert verify_build(tmp_path / "build", threads=1).ok


def test_exporter_style_and_multi_input_models(tmp_path: Path) -> None:
    onnx.save(exporter_style_model(), str(tmp_path / "exp.onnx"))
    onnx.save(multi_input_model(), str(tmp_path / "multi.onnx"))
    first = _partition(tmp_path / "exp.onnx", tmp_path / "b1", ["1,3,8,8"],
                       planner=Planner.DP_THROUGHPUT, machines=2)
    assert first.verification.ok
    second = _partition(tmp_path / "multi.onnx", tmp_path / "b2", ["ids:3,7", "feat:3,6"])
    assert second.verification.ok
    plan = json.loads((tmp_path / "b2" / "plan.json").read_text())
    assert plan["model"]["input_shapes"] == {"ids": [3, 7], "feat": [3, 6]}


def test_build_dir_has_everything_and_a_plan_that_validates(tmp_path: Path) -> None:
    onnx.save(build_model("mobilenet_v2", (1, 3, 32, 32)), str(tmp_path / "m.onnx"))
    result = _partition(tmp_path / "m.onnx", tmp_path / "b", ["1,3,32,32"],
                        planner=Planner.DP_THROUGHPUT, machines=3)
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    stages = [f"stage_{k}.onnx" for k in range(len(result.plan.stages))]
    assert files == sorted(["plan.json", "report.md", "report.png", *stages])
    plan = read_plan(tmp_path / "b")
    assert plan.validate() == []
    assert all(s.measured_native_ms and s.measured_native_ms > 0 for s in plan.stages)
    report = (tmp_path / "b" / "report.md").read_text()
    assert "predicted" in report and "Prediction accuracy" in report and "MATCH" in report


def test_failures_leave_no_build_behind(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ModelError):
        _partition(bad, tmp_path / "b")
    onnx.save(huge_matmul_model(), str(tmp_path / "huge.onnx"))
    with pytest.raises(InfeasiblePlanError, match="'huge_matmul' alone needs 145.4 MiB"):
        _partition(tmp_path / "huge.onnx", tmp_path / "b", ["1,6000"], fit_epc=True,
                   split_oversize=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [
        "bad.onnx", "huge.onnx"]


def test_a_foreign_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "precious.txt").write_text("keep me")
    onnx.save(multi_input_model(), str(tmp_path / "multi.onnx"))
    with pytest.raises(BuildDirError, match="not an smlaas build"):
        _partition(tmp_path / "multi.onnx", tmp_path / "b", ["1,3"])
    assert (tmp_path / "b" / "precious.txt").read_text() == "keep me"
