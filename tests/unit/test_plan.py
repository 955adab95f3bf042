from __future__ import annotations

from dataclasses import replace

import pytest

from smlaas.errors import PlanError
from smlaas.graph import ModelGraph, prepare_model, segment_memory
from smlaas.plan import (
    MeasuredMemory,
    ModelRef,
    Plan,
    Planner,
    build_plan,
    choose_cuts,
    preset,
    segment_costs,
)
from tests.models import skip_model


@pytest.fixture
def plan() -> Plan:
    graph = ModelGraph(prepare_model(skip_model(), {}))
    costs = segment_costs(segment_memory(graph), [1.0, 2.0, 3.0, 4.0], preset("sgx1"))
    ref = ModelRef(name="skip", source="skip.onnx", sha256="0" * 64,
                   input_shapes={"x": [2, 3]}, inputs=["x"], outputs=["y", "early"],
                   node_count=graph.node_count)
    return build_plan([0, 2, 4], costs=costs, graph=graph, model=ref, planner="dp-latency",
                      machines=None, fit_epc=True)


def test_plan_round_trips_through_json(plan: Plan) -> None:
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.latency_ms == plan.latency_ms and again.validate() == []


def test_plan_stage_io_chains(plan: Plan) -> None:
    assert plan.stages[0].inputs == ["x"]
    assert sorted(plan.stages[0].outputs) == ["doubled", "early", "x"]
    assert plan.stages[1].inputs == plan.stages[0].outputs


def test_validate_reports_every_problem_at_once(plan: Plan) -> None:
    broken = replace(plan, machines=1, stages=(
        replace(plan.stages[0], start=1),
        replace(plan.stages[1], index=5, inputs=["bogus"]),
    ))
    problems = broken.validate()
    assert any("starts at node 1" in p for p in problems)
    assert any("has index 5" in p for p in problems)
    assert any("inputs ['bogus']" in p for p in problems)
    assert any("2 stages for 1 machines" in p for p in problems)
    with pytest.raises(PlanError, match="invalid plan"):
        broken.check()


def test_from_json_rejects_garbage() -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(PlanError, match="not a valid smlaas plan"):
        Plan.from_json('{"model": {}}')


def test_table_labels_enclave_figures_as_predicted(plan: Plan) -> None:
    text = plan.to_table()
    assert "predicted" in text and "stage" in text
    assert len(text.splitlines()) == 2 + len(plan.stages) + 1


def test_choose_cuts_single_is_whole_model(plan: Plan) -> None:
    graph = ModelGraph(prepare_model(skip_model(), {}))
    costs = segment_costs(segment_memory(graph), [1.0] * 4, preset("native"))
    assert choose_cuts(Planner.SINGLE, costs) == [0, 4]


def test_a_plan_without_replica_fields_loads_as_one_replica_per_stage(plan: Plan) -> None:
    data = plan.to_dict()
    for key in ("input_transfer_ms", "machine_classes"):
        del data[key]
    for stage in data["stages"]:
        for key in ("replicas", "machine_class", "transfer_out_ms"):
            del stage[key]
    old = Plan.from_dict(data)
    assert [s.replicas for s in old.stages] == [1, 1] and old.machine_count == 2
    assert old.period_ms == max([max(s.enclave_ms, s.transfer_in_ms) for s in old.stages]
                                + [old.output_transfer_ms])
    assert old.validate() == []


def test_replicas_divide_the_stage_period_but_not_latency_or_the_gateway_links(plan: Plan
                                                                               ) -> None:
    slow = max(plan.stages, key=lambda s: s.period_ms)
    replicated = replace(plan, machines=5, stages=tuple(
        replace(s, replicas=4) if s is slow else s for s in plan.stages))
    assert replicated.validate() == []
    assert replicated.latency_ms == plan.latency_ms
    assert replicated.machine_count == 5
    busiest = max(slow.enclave_ms, slow.transfer_in_ms, slow.transfer_out_ms or 0.0)
    assert replicated.stages[slow.index].period_ms == busiest / 4
    assert replicated.period_ms == max([s.period_ms for s in replicated.stages]
                                       + [plan.output_transfer_ms,
                                          plan.input_transfer_ms or 0.0])
    assert replicated.period_ms < plan.period_ms
    again = Plan.from_json(replicated.to_json())
    assert again == replicated and again.to_dict()["predicted"]["machine_count"] == 5


def test_table_shows_replicas_and_the_machine_count(plan: Plan) -> None:
    replicated = replace(plan, stages=(replace(plan.stages[0], replicas=3), plan.stages[1]))
    lines = replicated.to_table().splitlines()
    assert lines[1].split()[-1] == "replicas"
    assert [line.split()[-1] for line in lines[2:4]] == ["3", "1"]
    assert "2 stage(s) on 4 machine(s)" in lines[-1]
    assert replicated.layout_text == "3, 1"


def test_validate_counts_replicas_against_the_machines(plan: Plan) -> None:
    over = replace(plan, machines=3, stages=(replace(plan.stages[0], replicas=3),
                                             replace(plan.stages[1], replicas=0)))
    problems = over.validate()
    assert any("stage 1 has 0 replicas" in p for p in problems)
    over = replace(plan, machines=3, stages=(replace(plan.stages[0], replicas=3),
                                             plan.stages[1]))
    assert any("4 enclaves (2 stages with their replicas) for 3 machines" in p
               for p in over.validate())


def test_report_shows_replicas_and_the_machine_count(plan: Plan) -> None:
    from smlaas.export.report import render_markdown

    replicated = replace(plan, machines=4, stages=(replace(plan.stages[0], replicas=3),
                                                   plan.stages[1]))
    comparison = [{"planner": "dp-replicas", "stages": 2, "machine_count": 4,
                   "layout": replicated.layout_text, "latency_ms": 1.0,
                   "throughput_per_s": 2.0, "max_working_set_mib": 3.0},
                  {"planner": "dp-latency", "error": "no"}]
    text = render_markdown(replicated, verification=None, comparison=comparison)
    stage_rows = [line for line in text.splitlines() if line.startswith("| 0 |")
                  or line.startswith("| 1 |")]
    assert [row.rstrip(" |").split("| ")[-1] for row in stage_rows] == ["3", "1"]
    assert "enclaves (stages times replicas): 4" in text
    assert "on 4 enclave machine(s)" in text
    assert "| dp-replicas | 2 | 4 | 3, 1 | 1.00 | 2.00 | 3.0 |" in text
    assert "| dp-latency | - | - | - | - | - | infeasible: no |" in text


def _measured(working_set_bytes: int) -> MeasuredMemory:
    return MeasuredMemory(working_set_bytes=working_set_bytes, rss_bytes=3 * working_set_bytes,
                          peak_rss_bytes=4 * working_set_bytes, inferences=3, threads=2,
                          method="smaps_rollup Referenced")


def test_measured_working_sets_round_trip_and_older_plans_load_without(plan: Plan) -> None:
    measured = plan.with_measured_memory([_measured(5 * 2**20), None])
    data = measured.to_dict()
    assert data["stages"][0]["measured"]["working_set_bytes"] == 5 * 2**20
    assert data["stages"][1]["measured"] is None
    assert Plan.from_json(measured.to_json()) == measured
    for stage in data["stages"]:
        del stage["measured"]
    old = Plan.from_dict(data)
    assert all(s.measured is None for s in old.stages) and old.validate() == []
    with pytest.raises(PlanError, match="2 stages but 1 memory measurements"):
        plan.with_measured_memory([None])


def test_validate_refuses_a_stage_measured_above_the_epc_under_fit_epc(plan: Plan) -> None:
    epc = int(plan.cost_model.usable_epc_bytes)
    over = plan.with_measured_memory([_measured(epc + 4096), _measured(epc)])
    assert over.measured_fits_epc(over.stages[0]) is False
    assert over.measured_fits_epc(over.stages[1]) is True
    assert over.measured_epc_problems() == [
        "stage 0's measured working set 93.5 MiB exceeds the usable EPC 93.5 MiB (predicted "
        f"{plan.stages[0].working_set_mib:.1f} MiB)"]
    assert over.validate() == over.measured_epc_problems()
    assert replace(over, fit_epc=False).validate() == []
    bad = plan.with_measured_memory([replace(_measured(1), threads=0), None])
    assert bad.validate() == ["stage 0 measured: threads is 0, expected an integer >= 1"]


def test_table_and_report_show_measured_beside_predicted(plan: Plan) -> None:
    from smlaas.export.report import render_markdown

    measured = plan.with_measured_memory([_measured(2**20), _measured(2 * 2**20)])
    lines = measured.to_table().splitlines()
    assert lines[1].split()[-4:] == ["MiB", "measured", "fits", "replicas"]
    # stage, nodes, native, enclave, in, xfer, weights, ws (predicted), measured
    assert [line.split()[8] for line in lines[2:4]] == ["1.0", "2.0"]
    text = render_markdown(measured, verification=None)
    assert "| stage | touched weights MiB (W) |" in text
    assert "| 1 | " in text.split("## Working set: predicted and measured")[1]
    unmeasured = render_markdown(plan, verification=None)
    assert "Measured: not measured" in unmeasured and "the prediction stands" in unmeasured
