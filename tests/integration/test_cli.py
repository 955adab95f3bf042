"""The CLI end to end, as a user runs it: real processes, exit codes, files on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.conftest import cli_env
from tests.models import chain_model

TIMEOUT_S = 600


def smlaas(*args: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "smlaas", *args], cwd=cwd,
                            env=cli_env(cwd / "cache"), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"smlaas {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def test_resnet50_partition_fits_the_epc_and_verifies(tmp_path: Path) -> None:
    """The acceptance command of the partition issue."""
    smlaas("partition", "--model", "resnet50", "--input-size", "1,3,224,224", "--build-dir",
           "B", "--preset", "sgx1", "--fit-epc", "--runs", "3", cwd=tmp_path, check=True)
    plan = json.loads((tmp_path / "B" / "plan.json").read_text())
    epc_bytes = plan["cost_model"]["usable_epc_mib"] * 2**20
    assert len(plan["stages"]) >= 2
    assert all(stage["working_set_bytes"] <= epc_bytes for stage in plan["stages"])
    # Measured natively beside the prediction (issue 19), and within the EPC too.
    assert all(0 < stage["measured"]["working_set_bytes"] <= epc_bytes
               for stage in plan["stages"])
    report = (tmp_path / "B" / "report.md").read_text()
    assert "## Working set: predicted and measured" in report
    verified = smlaas("verify", "B", "--json", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True


def test_seed_flag_spellings_and_json_output(tmp_path: Path) -> None:
    onnx.save(chain_model(), str(tmp_path / "chain.onnx"))
    result = smlaas("partition", "--model", "chain.onnx", "--input_size", "2,8", "--build_dir",
                    "B", "--planner", "dp-throughput", "--machines", "2", "--json", "--runs",
                    "2", cwd=tmp_path, check=True)
    data = json.loads(result.stdout)
    assert data["verified"] is True and data["plan"]["planner"] == "dp-throughput"
    assert len(data["plan"]["stages"]) <= 2
    shown = smlaas("plan", "show", "B", cwd=tmp_path, check=True)
    assert "predicted" in shown.stdout


BAD_INPUTS = {
    "not onnx": (["--model", "notes.onnx", "--input-size", "1,8"], "not a valid ONNX model"),
    "truncated": (["--model", "truncated.onnx", "--input-size", "1,8"], "truncated.onnx"),
    "wrong rank": (["--model", "chain.onnx", "--input-size", "1,3,224,224"], "rank 2"),
    "unknown zoo": (["--model", "resnet51"], "unknown zoo model 'resnet51'"),
    "unwritable": (["--model", "chain.onnx", "--input-size", "1,8", "--build-dir",
                    "/proc/smlaas-build"], "cannot create build dir"),
    "parent is a file": (["--model", "chain.onnx", "--input-size", "1,8", "--build-dir",
                          "notes.onnx/build"], "does not exist"),
    "bad planner": (["--model", "chain.onnx", "--planner", "magic"], "magic"),
}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    onnx.save(chain_model(), str(tmp_path / "chain.onnx"))
    (tmp_path / "notes.onnx").write_text("these are not the weights you are looking for\n")
    data = (tmp_path / "chain.onnx").read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return tmp_path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(workdir: Path, case: str) -> None:
    args, message = BAD_INPUTS[case]
    if "--build-dir" not in args:
        args = [*args, "--build-dir", "B"]
    before = sorted(p.name for p in workdir.iterdir())
    result = smlaas("partition", *args, cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.strip()
                   and "━" not in line]
    assert len(error_lines) == 1, result.stderr
    assert message in error_lines[0]
    assert "Traceback" not in result.stderr
    after = sorted(p.name for p in workdir.iterdir() if p.name != "cache")
    assert after == before


def test_verify_fails_on_a_tampered_stage(workdir: Path) -> None:
    smlaas("partition", "--model", "chain.onnx", "--input-size", "2,8", "--build-dir", "B",
           "--planner", "dp-throughput", "--machines", "3", "--runs", "2", cwd=workdir,
           check=True)
    plan = json.loads((workdir / "B" / "plan.json").read_text())
    assert len(plan["stages"]) >= 2
    stage = onnx.load(str(workdir / "B" / "stage_1.onnx"))
    tensor = stage.graph.initializer[0]
    array = onnx.numpy_helper.to_array(tensor).copy()
    array.flat[0] += 1.0
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    onnx.save(stage, str(workdir / "B" / "stage_1.onnx"))
    result = smlaas("verify", "B", cwd=workdir)
    assert result.returncode == 1
    assert "MISMATCH" in result.stderr


def test_verify_on_a_missing_build_is_exit_2(tmp_path: Path) -> None:
    result = smlaas("verify", "nowhere", cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_zoo_export_is_byte_identical(tmp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx"):
        smlaas("zoo", "export", "mobilenet_v2", "-o", name, cwd=tmp_path, check=True)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    smlaas("zoo", "export", "mobilenet_v2", "-o", "fixed.onnx", "--input-size", "4,3,96,96",
           cwd=tmp_path, check=True)
    fixed = onnx.load(str(tmp_path / "fixed.onnx"))
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 96,
                                                                                      96]
    listing = smlaas("zoo", "list", "--json", cwd=tmp_path, check=True)
    # gpt2_small4 joined the twelve, then the two KV decoders
    assert len(json.loads(listing.stdout)) == 15


def test_plan_compare_dp_planners_are_never_beaten(tmp_path: Path) -> None:
    result = smlaas("plan", "compare", "--model", "resnet18", "--preset", "sgx1", "--json",
                    "--runs", "2", cwd=tmp_path, check=True)
    rows = {r["planner"]: r for r in json.loads(result.stdout)["planners"]}
    feasible = [r for r in rows.values() if not r.get("error")]
    assert {"dp-latency", "dp-throughput", "seed-bruteforce", "greedy-epc"} <= set(rows)
    assert all(rows["dp-latency"]["latency_ms"] <= r["latency_ms"] + 1e-9 for r in feasible)
    assert all(rows["dp-throughput"]["throughput_per_s"] >= r["throughput_per_s"] - 1e-9
               for r in feasible)
    table = smlaas("plan", "compare", "--model", "resnet18", "--runs", "2", cwd=tmp_path,
                   check=True)
    assert "dp-latency" in table.stdout and "predicted" in table.stdout


def test_calibrate_writes_a_cost_model_partition_accepts(workdir: Path) -> None:
    smlaas("calibrate", "-o", "cm.toml", "--preset", "sgx2", "--network", "loopback",
           "--no-memory", cwd=workdir, check=True)
    text = (workdir / "cm.toml").read_text()
    assert "[cost_model]" in text and "[measured]" in text and "network_mib_per_s" in text
    assert "[CALIBRATED]" not in text and "weight_factor = 1.0" in text
    result = smlaas("partition", "--model", "chain.onnx", "--input-size", "1,8", "--build-dir",
                    "B", "--cost-model", "cm.toml", "--json", "--runs", "2", cwd=workdir,
                    check=True)
    assert json.loads(result.stdout)["plan"]["cost_model"]["preset"] == "sgx2"


def test_calibrate_fits_the_working_set_constants_to_measured_stages(workdir: Path) -> None:
    """Issue 19: weight_factor and runtime_overhead_mib fitted to stages measured natively,
    written as [CALIBRATED] instead of the preset's [ASSUMED], and read back by partition."""
    result = smlaas("calibrate", "-o", "cm.toml", "--memory-model", "resnet18",
                    "--memory-model", "mobilenet_v1", "--json", cwd=workdir, check=True)
    fitted = json.loads(result.stdout)["working_set"]
    assert fitted["stages"] >= 2 and fitted["models"] == ["resnet18", "mobilenet_v1"]
    # Sane, not exact: a least-squares line through a few stages of two models trades slope
    # for intercept with the page counts' noise (0.70 was seen once, in a full run).
    assert 0.5 < fitted["weight_factor"] < 1.5 and 0 <= fitted["runtime_overhead_mib"] < 16
    # The preset's R is itself fitted to 93 stages (BENCHMARKS.md), so a fit to a handful may
    # not beat it at the median; it stays close.
    assert fitted["median_error_calibrated"] <= max(fitted["median_error_assumed"], 0.15)
    text = (workdir / "cm.toml").read_text()
    assert "# weight_factor: " in text and "[CALIBRATED] least squares over" in text
    assert "# libos_overhead_mib: 4 [ASSUMED]" in text  # kept: no native measurement sees it
    partitioned = smlaas("partition", "--model", "chain.onnx", "--input-size", "1,8",
                         "--build-dir", "B", "--cost-model", "cm.toml", "--json", "--runs", "2",
                         cwd=workdir, check=True)
    cost_model = json.loads(partitioned.stdout)["plan"]["cost_model"]
    assert cost_model["weight_factor"] == round(fitted["weight_factor"], 4)
    assert cost_model["runtime_overhead_mib"] == round(fitted["runtime_overhead_mib"], 3)
    assert cost_model["libos_overhead_mib"] == 4.0
