"""A stage's working set measured natively: its own process, /proc's touched pages, the plan
and the report carrying it, and --fit-epc refusing a stage measured above the usable EPC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from smlaas.cli.main import main
from smlaas.errors import ProfileError
from smlaas.export import read_plan
from smlaas.export.stage_memory import MEMORY_NOTE, measure_stage_memory
from smlaas.runtime import working_set
from smlaas.runtime.working_set import measure_working_set, unavailable_reason
from smlaas.zoo import build_model
from tests.models import chain_model

MIB = 2**20


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ws") / "resnet18.onnx"
    onnx.save(build_model("resnet18", (1, 3, 64, 64)), str(path))
    return path


def test_this_machine_can_count_touched_pages() -> None:
    assert unavailable_reason() is None


def test_the_weights_a_stage_computes_with_are_its_working_set(resnet_file: Path) -> None:
    """ResNet-18 holds 44.6 MiB of weights; at 64x64 its activations are about a MiB. Every
    weight is read per inference, so the pages touched are the weights and a few MiB of
    runtime, well below what the process holds resident (ORT keeps the loaded copy too).
    (At 32x32 the last 3x3 convolutions see 1x1 maps, read only their centre taps, and the
    stage touches 37 MiB: fewer than its weights.)"""
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    result = measure_working_set(resnet_file, {"input": x}, threads=1)
    measured = result.measured
    assert result.unavailable_reason is None and measured is not None
    assert 44.6 * MIB < measured.working_set_bytes < 60 * MIB
    assert measured.working_set_bytes < measured.rss_bytes <= measured.peak_rss_bytes
    assert (measured.inferences, measured.threads, measured.rounds) == (3, 1, 3)
    assert measured.method == "smaps_rollup Referenced"


def test_a_small_stage_touches_only_the_runtime(tmp_path: Path) -> None:
    onnx.save(chain_model(), str(tmp_path / "chain.onnx"))
    result = measure_working_set(tmp_path / "chain.onnx", {"x": np.ones((1, 8), np.float32)},
                                 threads=2, inferences=5)
    assert result.measured is not None
    assert 0 < result.measured.working_set_bytes < 16 * MIB
    assert result.measured.inferences == 5


def test_without_proc_the_result_says_so_and_holds_no_figure(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    assert "not available on this OS" in (unavailable_reason(tmp_path) or "")
    monkeypatch.setattr(working_set, "unavailable_reason",
                        lambda: "not available on this OS: no /proc")
    result = measure_working_set(tmp_path / "never-opened.onnx", {}, threads=1)
    assert result.measured is None and result.unavailable_reason == \
        "not available on this OS: no /proc"
    import smlaas.export.stage_memory as stage_memory

    monkeypatch.setattr(stage_memory, "unavailable_reason",
                        lambda: "not available on this OS: no /proc")
    memory = measure_stage_memory([tmp_path / "a.onnx", tmp_path / "b.onnx"], [{}, {}],
                                  threads=1)
    assert memory.measured == (None, None) and "no /proc" in (memory.unavailable_reason or "")


def test_a_stage_that_fails_or_hangs_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ProfileError, match="working set of stage 3: the child process failed"):
        measure_working_set(tmp_path / "bad.onnx", {}, threads=1, label="stage 3")
    onnx.save(chain_model(), str(tmp_path / "chain.onnx"))
    with pytest.raises(ProfileError, match="missed its deadline; skip it with "
                                           "--no-measure-memory"):
        measure_working_set(tmp_path / "chain.onnx", {"x": np.ones((1, 8), np.float32)},
                            threads=1, timeout_s=0.05)


def _partition(tmp_path: Path, *extra: str) -> int:
    onnx.save(chain_model(width=64, depth=6), str(tmp_path / "chain.onnx"))
    return main(["partition", "--model", str(tmp_path / "chain.onnx"), "--input-size", "1,64",
                 "--build-dir", str(tmp_path / "B"), "--planner", "dp-throughput",
                 "--machines", "2", "--threads", "1", "--runs", "2", "--no-verify", *extra])


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMLAAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")


@pytest.mark.usefixtures("cache_env")
def test_partition_writes_measured_beside_predicted(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert _partition(tmp_path) == 0
    assert "working sets measured natively" in capsys.readouterr().out
    data = json.loads((tmp_path / "B" / "plan.json").read_text())
    for stage in data["stages"]:
        assert stage["measured"]["working_set_bytes"] > 0
        assert stage["measured"]["threads"] == 1
        assert stage["working_set_bytes"] > 0  # the prediction stays
    plan = read_plan(tmp_path / "B")
    assert all(s.measured is not None for s in plan.stages) and plan.validate() == []
    report = (tmp_path / "B" / "report.md").read_text()
    assert "## Working set: predicted and measured" in report
    assert "working set MiB (measured)" in report and "Median |predicted - measured|" in report


@pytest.mark.usefixtures("cache_env")
def test_no_measure_memory_keeps_the_prediction_and_says_why(tmp_path: Path) -> None:
    assert _partition(tmp_path, "--no-measure-memory") == 0
    plan = read_plan(tmp_path / "B")
    assert all(s.measured is None for s in plan.stages)
    assert MEMORY_NOTE not in plan.notes
    assert "Measured: not measured (--no-measure-memory" in \
        (tmp_path / "B" / "report.md").read_text()


@pytest.mark.usefixtures("cache_env")
def test_fit_epc_refuses_a_stage_measured_above_the_usable_epc(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A cost model that predicts almost nothing (tiny weight factor, no runtime overhead)
    on a 1 MiB EPC: the prediction fits, the measured set (the runtime's own pages alone are
    a few MiB) does not, and --fit-epc refuses in one line naming the stage and both
    figures, leaving no build behind."""
    model_file = tmp_path / "cost_model.toml"
    model_file.write_text("[cost_model]\npreset = 'sgx1'\nusable_epc_mib = 1.0\n"
                          "weight_factor = 0.001\nruntime_overhead_mib = 0.0\n"
                          "libos_overhead_mib = 0.0\n")
    assert _partition(tmp_path, "--cost-model", str(model_file), "--fit-epc") == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "--fit-epc: stage 0's measured working set" in error
    assert "exceeds the usable EPC 1 MiB (predicted 0.0 MiB)" in error
    assert not (tmp_path / "B").exists()
    assert _partition(tmp_path, "--cost-model", str(model_file), "--fit-epc",
                      "--no-measure-memory") == 0
