"""Machine classes (--machines-file): parsing, and the dp planners on them against exhaustive
search over cut sets, classes and replicas (hypothesis)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smlaas.errors import ConfigError, InfeasiblePlanError, PlanError
from smlaas.graph import ModelGraph, prepare_model, segment_memory
from smlaas.partition import read_machines_file
from smlaas.plan import (
    MachineClass,
    MachinePool,
    ModelRef,
    Plan,
    Planner,
    build_plan,
    check_feasible,
    choose_cuts,
    choose_layout,
    preset,
    segment_costs,
)
from smlaas.plan.costs import SegmentCosts
from tests.models import chain_model
from tests.unit.test_planners import all_plans, cost_tables, make_costs
from tests.unit.test_replicas_planner import paging_tables

EXAMPLE = """
[[class]]
name = "sgx1-large"
count = 2
usable_epc_mib = 93.5
speed = 1.0
network_mib_per_s = 1000

[[class]]
name = "small"
count = 4
usable_epc_mib = 64
speed = 0.5
network_mib_per_s = 500
"""


# -- the objective, spelled out independently of smlaas.plan.machines -------------------------
def stage_figures(costs: SegmentCosts, machine_class: MachineClass, a: int, b: int
                  ) -> tuple[float, float, float]:
    """(enclave ms, transfer in ms, transfer out ms) of stage [a, b) on ``machine_class``."""
    model = replace(costs.cost_model, usable_epc_mib=machine_class.usable_epc_mib,
                    network_mib_per_s=machine_class.network_mib_per_s)
    enclave = model.enclave_time_ms(costs.native_ms[a, b] / machine_class.speed,
                                    costs.working_set_bytes[a, b])
    cut = costs.memory.cut_bytes
    return float(enclave), float(model.transfer_ms(cut[a])), float(model.transfer_ms(cut[b]))


def layout_period(costs, pool, cuts, assignment) -> float:
    periods = [max(stage_figures(costs, pool.classes[c], a, b)) / r
               for a, b, (c, r) in zip(cuts, cuts[1:], assignment)]
    return max(periods + [float(costs.transfer_ms[0]), costs.output_transfer_ms])


def layout_latency(costs, pool, cuts, assignment) -> float:
    total = 0.0
    for a, b, (c, _) in zip(cuts, cuts[1:], assignment):
        enclave, transfer_in, _ = stage_figures(costs, pool.classes[c], a, b)
        total += enclave + transfer_in
    return total + costs.output_transfer_ms


def assignments(costs, pool, cuts, *, replicate: bool, fit_epc: bool, left=None):
    """Every (class, replicas) per stage within each class's count."""
    left = [c.count for c in pool.classes] if left is None else left
    if len(cuts) < 2:
        yield ()
        return
    a, b = cuts[0], cuts[1]
    for c, machine_class in enumerate(pool.classes):
        if fit_epc and costs.working_set_bytes[a, b] > machine_class.usable_epc_bytes:
            continue
        for r in range(1, (left[c] if replicate else min(left[c], 1)) + 1):
            rest = list(left)
            rest[c] -= r
            for tail in assignments(costs, pool, cuts[1:], replicate=replicate,
                                    fit_epc=fit_epc, left=rest):
                yield ((c, r), *tail)


def all_layouts(costs, pool, *, replicate, fit_epc):
    for cuts in all_plans(costs):
        for assignment in assignments(costs, pool, cuts, replicate=replicate, fit_epc=fit_epc):
            yield cuts, assignment


@st.composite
def pools(draw, max_classes: int = 3, max_count: int = 3):
    count = draw(st.integers(1, max_classes))
    return MachinePool(tuple(
        MachineClass(name=f"c{k}", count=draw(st.integers(1, max_count)),
                     usable_epc_mib=draw(st.sampled_from([40.0, 64.0, 93.5, 256.0])),
                     speed=draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0])),
                     network_mib_per_s=draw(st.sampled_from([20.0, 66.7, 500.0, 2000.0])))
        for k in range(count)))


PLANNERS = [Planner.DP_LATENCY, Planner.DP_THROUGHPUT, Planner.DP_REPLICAS]


@settings(max_examples=300, deadline=None)
@given(st.one_of(cost_tables(max_nodes=5), paging_tables(max_nodes=5)), pools(),
       st.sampled_from(PLANNERS), st.booleans())
def test_dp_planners_on_machine_classes_are_optimal(costs: SegmentCosts, pool: MachinePool,
                                                    planner: Planner, fit_epc: bool) -> None:
    replicate = planner is Planner.DP_REPLICAS
    layouts = list(all_layouts(costs, pool, replicate=replicate, fit_epc=fit_epc))
    if not layouts:
        with pytest.raises(InfeasiblePlanError):
            choose_layout(planner, costs, pool=pool, fit_epc=fit_epc)
        return
    layout = choose_layout(planner, costs, pool=pool, fit_epc=fit_epc)
    index = {c.name: k for k, c in enumerate(pool.classes)}
    found = (list(layout.cuts),
             tuple((index[name], r) for name, r in zip(layout.classes, layout.replicas)))
    assert found in layouts  # contiguous, within every class's count, fitting if asked
    period = layout_period(costs, pool, *found)
    latency = layout_latency(costs, pool, *found)
    if planner is Planner.DP_LATENCY:
        assert latency == pytest.approx(min(layout_latency(costs, pool, *x) for x in layouts),
                                        rel=1e-9, abs=1e-12)
        return
    best = min(layout_period(costs, pool, *x) for x in layouts)
    assert period == pytest.approx(best, rel=1e-12)
    tied = [x for x in layouts if layout_period(costs, pool, *x) <= best * (1 + 1e-12)]
    assert latency == pytest.approx(min(layout_latency(costs, pool, *x) for x in tied),
                                    rel=1e-9, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(cost_tables(max_nodes=8), st.integers(1, 5), st.booleans())
def test_one_class_like_the_cost_model_is_the_plain_machine_budget(costs: SegmentCosts,
                                                                   count: int,
                                                                   fit_epc: bool) -> None:
    model = costs.cost_model
    pool = MachinePool((MachineClass("same", count, model.usable_epc_mib, 1.0,
                                     model.network_mib_per_s),))
    for planner in PLANNERS:
        try:
            plain = choose_layout(planner, costs, machines=count, fit_epc=fit_epc)
        except InfeasiblePlanError:
            with pytest.raises(InfeasiblePlanError):
                choose_layout(planner, costs, pool=pool, fit_epc=fit_epc)
            continue
        classed = choose_layout(planner, costs, pool=pool, fit_epc=fit_epc)
        assert set(classed.classes) == {"same"}
        for figure in (layout_period, layout_latency):
            assert figure(costs, pool, list(classed.cuts), [(0, r) for r in classed.replicas]) \
                == pytest.approx(figure(costs, pool, list(plain.cuts),
                                        [(0, r) for r in plain.replicas]), rel=1e-9)


def test_the_heavy_stage_goes_to_the_fast_class() -> None:
    costs = make_costs([1.0, 60.0, 1.0], [1.0] * 3, [0.5] * 3, [0.01] * 4, "sgx2")
    pool = MachinePool((MachineClass("slow", 3, 93.5, 0.5, 1000.0),
                        MachineClass("fast", 1, 93.5, 4.0, 1000.0)))
    for planner in PLANNERS:
        layout = choose_layout(planner, costs, pool=pool)
        heavy = next(k for k, (a, b) in enumerate(zip(layout.cuts, layout.cuts[1:]))
                     if a <= 1 < b)
        assert layout.classes[heavy] == "fast"


def test_fit_epc_uses_each_class_epc() -> None:
    # A 70 MiB node fits only the large class; two small nodes fit the small one.
    costs = make_costs([1.0, 1.0, 1.0], [20.0, 70.0, 20.0], [0.0] * 3, [0.1] * 4)
    pool = MachinePool((MachineClass("large", 1, 93.5, 1.0, 66.7),
                        MachineClass("small", 2, 32.0, 1.0, 66.7)))
    layout = choose_layout(Planner.DP_LATENCY, costs, pool=pool, fit_epc=True)
    assert layout.cuts == (0, 1, 2, 3) and layout.classes == ("small", "large", "small")
    too_small = MachinePool((MachineClass("small", 9, 32.0, 1.0, 66.7),))
    with pytest.raises(InfeasiblePlanError, match=r"node #1 alone needs 78\.0 MiB"):
        check_feasible(costs, machines=None, fit_epc=True, pool=too_small)
    too_few = MachinePool((MachineClass("large", 1, 93.5, 1.0, 66.7),))
    with pytest.raises(InfeasiblePlanError, match="at least 3 stages are needed"):
        choose_layout(Planner.DP_REPLICAS, costs, pool=too_few, fit_epc=True)


def test_planner_options_that_do_not_go_together_are_refused() -> None:
    costs = make_costs([1.0, 2.0], [1.0, 1.0], [0.0, 0.0], [0.1] * 3)
    pool = MachinePool((MachineClass("a", 2, 93.5, 1.0, 66.7),))
    with pytest.raises(PlanError, match="alternatives"):
        choose_layout(Planner.DP_REPLICAS, costs, machines=2, pool=pool)
    with pytest.raises(PlanError, match="greedy-epc does not assign machine classes"):
        choose_layout(Planner.GREEDY_EPC, costs, pool=pool)
    big = MachinePool(tuple(MachineClass(f"c{k}", 40, 93.5, 1.0, 66.7) for k in range(3)))
    with pytest.raises(PlanError, match="68921 combinations"):
        choose_layout(Planner.DP_REPLICAS, costs, pool=big)
    # Without replicas a class never holds more stages than there are nodes: 3^3 states.
    assert choose_layout(Planner.DP_THROUGHPUT, costs, pool=big).machine_count <= 2


# -- the file ----------------------------------------------------------------------------------
def test_the_example_machines_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "machines.toml"
    path.write_text(EXAMPLE)
    pool = read_machines_file(path, cost_model=preset("sgx1"))
    assert pool.describe() == "2 x sgx1-large, 4 x small" and pool.total_count == 6
    assert pool.get("small") == MachineClass("small", 4, 64.0, 0.5, 500.0)


def test_omitted_fields_default_to_the_cost_model(tmp_path: Path) -> None:
    path = tmp_path / "machines.toml"
    path.write_text('[[class]]\nname = "plain"\ncount = 3\n')
    pool = read_machines_file(path, cost_model=preset("sgx2"))
    assert pool.classes == (MachineClass("plain", 3, preset("sgx2").usable_epc_mib, 1.0,
                                         preset("sgx2").network_mib_per_s),)


@pytest.mark.parametrize("text, message", [
    ("", "no machine class"),
    ("[[class]]\nname = 'a'\n", "class 'a': missing count"),
    ("[[class]]\nname = 'a'\ncount = 0\n", "count must be an integer >= 1"),
    ("[[class]]\nname = 'a'\ncount = 2.5\n", "count must be an integer >= 1"),
    ("[[class]]\nname = 'a'\ncount = 1\nspeed = -1\n", "speed must be a number > 0"),
    ("[[class]]\nname = 'a'\ncount = 1\nspeed = 'fast'\n", "speed must be a number"),
    ("[[class]]\nname = 'a'\ncount = 1\ncores = 8\n", "unknown key(s) cores"),
    ("[[class]]\nname = 'a'\ncount = 1\n[[class]]\nname = 'a'\ncount = 1\n",
     "'a' appear more than once"),
    ("".join(f"[[class]]\nname = 'c{k}'\ncount = 1\n" for k in range(5)),
     "5 machine classes, at most 4"),
    ("machines = 3\n", "unknown top-level key(s) machines"),
    ("class = 3\n", "must be an array of tables"),
    ("[[class]\n", "not valid TOML"),
])
def test_bad_machines_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "machines.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_machines_file(path, cost_model=preset("sgx1"))


def test_a_missing_machines_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_machines_file(tmp_path / "nope.toml", cost_model=preset("sgx1"))


# -- plans on classes ------------------------------------------------------------------------
@pytest.fixture
def chain() -> tuple[ModelGraph, SegmentCosts, ModelRef]:
    graph = ModelGraph(prepare_model(chain_model(width=64, depth=4), {"x": (1, 64)}))
    costs = segment_costs(segment_memory(graph), np.linspace(1.0, 12.0, graph.node_count),
                          preset("sgx1"))
    ref = ModelRef(name="chain", source="chain.onnx", sha256="0" * 64,
                   input_shapes={"x": [1, 64]}, inputs=["x"], outputs=["y"],
                   node_count=graph.node_count)
    return graph, costs, ref


def test_a_plan_on_classes_records_and_prices_them(chain) -> None:
    graph, costs, ref = chain
    pool = MachinePool.from_dict({"class": [
        {"name": "sgx1-large", "count": 2, "usable_epc_mib": 93.5, "speed": 1.0,
         "network_mib_per_s": 1000},
        {"name": "small", "count": 4, "usable_epc_mib": 64, "speed": 0.5,
         "network_mib_per_s": 500}]}, defaults=costs.cost_model)
    layout = choose_layout(Planner.DP_REPLICAS, costs, pool=pool, fit_epc=True)
    plan = build_plan(layout.cuts, costs=costs, graph=graph, model=ref, planner="dp-replicas",
                      machines=pool.total_count, fit_epc=True, replicas=layout.replicas,
                      stage_classes=layout.classes, pool=pool)
    index = {c.name: k for k, c in enumerate(pool.classes)}
    assignment = [(index[s.machine_class], s.replicas) for s in plan.stages]
    assert plan.period_ms == layout_period(costs, pool, plan.cuts, assignment)
    assert plan.latency_ms == pytest.approx(layout_latency(costs, pool, plan.cuts, assignment))
    assert plan.machine_count == sum(layout.replicas) <= 6
    assert Plan.from_json(plan.to_json()) == plan
    older = json.loads(plan.to_json())  # written before R and L were split: R held both
    del older["cost_model"]["libos_overhead_mib"]
    assert Plan.from_dict(older).cost_model.libos_overhead_mib == 0.0
    table = plan.to_table()
    assert "machines 2 x sgx1-large, 4 x small" in table and "class" in table.splitlines()[1]
    assert all(s.machine_class in table.splitlines()[2 + s.index] for s in plan.stages)
    crowded = replace(plan, stages=tuple(replace(s, machine_class="sgx1-large", replicas=2)
                                         for s in plan.stages))
    assert any("on machine class 'sgx1-large', which has 2" in p for p in crowded.validate())
    unknown = replace(plan, stages=(replace(plan.stages[0], machine_class="gpu"),
                                    *plan.stages[1:]))
    assert any("machine class 'gpu', not one of" in p for p in unknown.validate())


def test_choose_cuts_still_returns_plain_cuts() -> None:
    costs = make_costs([1.0, 2.0, 3.0], [1.0] * 3, [0.0] * 3, [0.1] * 4)
    assert choose_cuts(Planner.DP_REPLICAS, costs, machines=3)[0] == 0
