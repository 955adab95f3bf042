"""The partition job with operator splitting, on small models under a tiny custom EPC (a
cost-model TOML, as ``--cost-model`` reads it), so that a 1 MiB weight is "oversize"."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from smlaas.cli.main import main
from smlaas.errors import InfeasiblePlanError
from smlaas.export import read_plan, verify_chain
from smlaas.graph import SPLIT_NOTE, SplitAxis
from smlaas.partition import PlanOptions, partition, verify_build
from smlaas.plan import CostModel, Planner
from smlaas.profile import ProfileCache, ProfileSettings
from smlaas.zoo.gpt2 import GPT2Config, build_gpt2
from tests.models import huge_matmul_model

FAST = ProfileSettings(threads=1, warmup_runs=1, measured_runs=2)
MIB = 2**20


@pytest.fixture
def tiny_epc(tmp_path: Path) -> Path:
    """A 0.5 MiB enclave without runtime or LibOS pages: a node may hold 0.475 MiB. No process fits
    it (the runtime alone touches a few MiB), so these builds skip the measured working sets,
    which --fit-epc would otherwise hold against it (tests/component/test_working_set.py)."""
    path = tmp_path / "tiny-epc.toml"
    path.write_text('[cost_model]\npreset = "sgx1"\nusable_epc_mib = 0.5\n'
                    'runtime_overhead_mib = 0.0\nlibos_overhead_mib = 0.0\n')
    return path


def _partition(model: onnx.ModelProto, tmp_path: Path, cost_file: Path, sizes: list[str], *,
               planner: Planner = Planner.DP_LATENCY, **options):
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return partition(str(path), tmp_path / "build", input_size_specs=sizes,
                     cost_model=CostModel.from_toml(cost_file),
                     options=PlanOptions(planner, fit_epc=True, **options), settings=FAST,
                     cache=ProfileCache(tmp_path / "cache"), measure_memory=False)


def test_oversize_matmul_is_split_and_every_stage_fits(tmp_path: Path, tiny_epc: Path) -> None:
    result = _partition(huge_matmul_model(1024, 256), tmp_path, tiny_epc, ["1,1024"])
    plan = result.plan
    (split,) = result.splits
    assert (split.node, split.axis, split.pieces) == ("huge_matmul", SplitAxis.REDUCTION, 3)
    assert plan.all_fit_epc and plan.max_working_set_bytes <= 0.5 * MIB
    assert len(split.stages(plan.cuts)) == 3  # one piece per enclave
    assert result.verification is not None and result.verification.ok
    assert verify_build(tmp_path / "build", threads=1).ok
    # The accumulator travels with the activations, and the cost model charges for it.
    later = [s for s in plan.stages if s.index in split.stages(plan.cuts)][1:]
    for stage in later:
        assert any("__huge_matmul_sum" in t or t.endswith("_part0") for t in stage.inputs)
        # The accumulator (1 KiB) and x's remaining slices (at least a third of 4 KiB).
        assert stage.input_bytes > 1024 + 4096 / 3
        assert stage.transfer_in_ms == pytest.approx(
            plan.cost_model.transfer_ms(stage.input_bytes))
    # The model's batch axis stays symbolic through the split: every stage serves batch 4.
    stages = [tmp_path / "build" / s.file_name for s in plan.stages]
    for path in stages:
        for value in [*onnx.load(str(path)).graph.input, *onnx.load(str(path)).graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert verify_chain(tmp_path / "model.onnx", stages, {"x": (4, 1024)}, threads=1).ok
    # Recorded in the plan, its JSON and the report.
    saved = read_plan(tmp_path / "build")
    assert saved.notes[SPLIT_NOTE][0]["pieces"] == 3
    report = (tmp_path / "build" / "report.md").read_text()
    assert "## Split operators" in report and "| `huge_matmul` | MatMul | K (accumulator) | 3 |" \
        in report


def test_gpt2_like_tied_head_is_split_by_output(tmp_path: Path, tiny_epc: Path) -> None:
    """A small GPT-2 whose tied LM head (a MatMul by the transposed embedding) is the one
    operator over the tiny EPC: short rows, long output, so the Concat split wins."""
    config = GPT2Config(layers=1, d_model=32, heads=2, vocab_size=5000, max_positions=64)
    model = build_gpt2("gpt2_tiny", 8, config)
    result = _partition(model, tmp_path, tiny_epc, ["1,8"], planner=Planner.DP_THROUGHPUT,
                        machines=6)
    (split,) = result.splits
    assert (split.node, split.axis) == ("logits", SplitAxis.OUTPUT)
    assert result.plan.all_fit_epc
    assert result.verification is not None and result.verification.ok


def test_no_split_oversize_keeps_the_refusal(tmp_path: Path, tiny_epc: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InfeasiblePlanError, match="'huge_matmul' alone needs 1.0 MiB"):
        _partition(huge_matmul_model(512), tmp_path, tiny_epc, ["1,512"],
                   split_oversize=False)
    assert not (tmp_path / "build").exists()
    onnx.save(huge_matmul_model(512), str(tmp_path / "huge.onnx"))
    args = ["partition", "--model", str(tmp_path / "huge.onnx"), "--input-size", "1,512",
            "--cost-model", str(tiny_epc), "--fit-epc", "--build-dir", str(tmp_path / "b"),
            "--threads", "1", "--runs", "1", "--no-measure-memory"]
    assert main([*args, "--no-split-oversize"]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "node 'huge_matmul' alone needs 1.0 MiB" in message
    assert "drop --fit-epc to accept paging" in message
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verified"] is True and data["split_operators"][0]["pieces"] == 3


def test_planners_benchmark_adds_split_rows_beside_the_paging_ones(tmp_path: Path) -> None:
    from smlaas.bench.planners import planner_rows

    model = huge_matmul_model(5000)  # a 95 MiB weight: over sgx1's EPC, inside sgx2's
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    name = str(tmp_path / "huge.onnx")
    onnx.save(model, name)
    rows = planner_rows(name, FAST, cache=None)
    by = {(r["model"], r["preset"], r["planner"]): r for r in rows}
    paging = by[(name, "sgx1", "dp-latency")]
    split = by[(f"{name} (split)", "sgx1", "dp-latency")]
    assert not paging["all_fit_epc"] and split["all_fit_epc"]
    assert split["stages"] > 1 and split["split"] and "huge_matmul" in split["split"][0]
    assert split["latency_ms"] < paging["latency_ms"]
    assert not any(model == f"{name} (split)" and preset == "sgx2"
                   for model, preset, _ in by)
