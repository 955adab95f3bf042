from __future__ import annotations

from dataclasses import replace

import pytest

from smlaas.errors import PlanError
from smlaas.graph import ModelGraph, prepare_model, segment_memory
from smlaas.plan import ModelRef, Plan, Planner, build_plan, choose_cuts, preset, segment_costs
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
