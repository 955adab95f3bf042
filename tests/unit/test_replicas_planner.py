"""dp-replicas against exhaustive search over cut sets and replica counts (hypothesis).

The objective the tests spell out themselves (NOTE_REPLICA_PERIOD in smlaas.plan.replicas):
a stage [i, j) with r replicas has period max(enclave, transfer in, transfer out) / r, the
pipeline's period is the largest stage period or gateway link, and latency is the sum of
enclave and input-transfer times plus the result's transfer, whatever the replicas.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smlaas import zoo
from smlaas.errors import InfeasiblePlanError, PlanError
from smlaas.partition import Analysis, PlanOptions, analyse, make_plan, open_model
from smlaas.plan import Planner, build_plan, choose_cuts, choose_layout, preset, segment_costs
from smlaas.plan.costs import SegmentCosts
from smlaas.plan.replicas import replicas_needed
from tests.unit.test_planners import all_plans, cost_tables, make_costs


def compositions(stages: int, budget: int) -> Iterator[tuple[int, ...]]:
    """Every replica assignment (each >= 1) of ``stages`` stages using at most ``budget``."""
    if stages == 0:
        yield ()
        return
    for first in range(1, budget - stages + 2):
        for rest in compositions(stages - 1, budget - first):
            yield (first, *rest)


def stage_period(costs: SegmentCosts, i: int, j: int, replicas: int) -> float:
    busiest = max(costs.enclave_ms[i, j], costs.transfer_ms[i], costs.transfer_ms[j])
    return float(busiest) / replicas


def period(costs: SegmentCosts, cuts, replicas) -> float:
    return max([stage_period(costs, a, b, r) for a, b, r in zip(cuts, cuts[1:], replicas)]
               + [costs.transfer_ms[0], costs.output_transfer_ms])


def latency(costs: SegmentCosts, cuts) -> float:
    return sum(costs.enclave_ms[a, b] + costs.transfer_ms[a] for a, b in zip(cuts, cuts[1:])) \
        + costs.output_transfer_ms


def all_layouts(costs: SegmentCosts, machines: int, fit_epc: bool):
    for cuts in all_plans(costs, max_stages=machines, fit_epc=fit_epc):
        for replicas in compositions(len(cuts) - 1, machines):
            yield cuts, replicas


def check_optimal(costs: SegmentCosts, machines: int, fit_epc: bool) -> None:
    layouts = list(all_layouts(costs, machines, fit_epc))
    if not layouts:
        with pytest.raises(InfeasiblePlanError):
            choose_layout(Planner.DP_REPLICAS, costs, machines=machines, fit_epc=fit_epc)
        return
    layout = choose_layout(Planner.DP_REPLICAS, costs, machines=machines, fit_epc=fit_epc)
    cuts, replicas = list(layout.cuts), layout.replicas
    assert (cuts, replicas) in layouts  # contiguous, within the budget, fitting if asked
    assert layout.machine_count <= machines and layout.classes == (None,) * len(replicas)
    best_period = min(period(costs, c, r) for c, r in layouts)
    assert period(costs, cuts, replicas) == pytest.approx(best_period, rel=1e-12)
    tied = [c for c, r in layouts if period(costs, c, r) <= best_period * (1 + 1e-12)]
    assert latency(costs, cuts) == pytest.approx(min(latency(costs, c) for c in tied),
                                                 rel=1e-9, abs=1e-12)


@st.composite
def paging_tables(draw, max_nodes: int = 7) -> SegmentCosts:
    """sgx1 tables where any three nodes page and cuts are cheap: without the EPC a single
    stage replicated K times is nearly always best (a max of p_s / r_s is at least the sum of
    p_s over the sum of r_s), so these are the tables where cuts and uneven replicas pay."""
    n = draw(st.integers(2, max_nodes))
    node_ms = draw(st.lists(st.floats(0.5, 50.0), min_size=n, max_size=n))
    weights = draw(st.lists(st.floats(10.0, 60.0), min_size=n, max_size=n))
    live = draw(st.lists(st.floats(0.0, 5.0), min_size=n, max_size=n))
    cuts = draw(st.lists(st.floats(0.0, 0.5), min_size=n + 1, max_size=n + 1))
    return make_costs(node_ms, weights, live, cuts, "sgx1")


@settings(max_examples=200, deadline=None)
@given(cost_tables(max_nodes=7), st.integers(1, 6), st.booleans())
def test_dp_replicas_is_optimal(costs: SegmentCosts, machines: int, fit_epc: bool) -> None:
    check_optimal(costs, machines, fit_epc)


@settings(max_examples=200, deadline=None)
@given(paging_tables(), st.integers(1, 6), st.booleans())
def test_dp_replicas_is_optimal_where_the_epc_makes_cuts_pay(costs: SegmentCosts,
                                                             machines: int,
                                                             fit_epc: bool) -> None:
    check_optimal(costs, machines, fit_epc)


def test_dp_replicas_is_optimal_on_a_table_where_replicas_pay() -> None:
    # One heavy node between light ones: the heavy stage should get the spare machines.
    costs = make_costs([1.0, 40.0, 1.0, 2.0], [1.0] * 4, [0.5] * 4, [0.01] * 5)
    for machines in range(1, 7):
        check_optimal(costs, machines, fit_epc=False)
    layout = choose_layout(Planner.DP_REPLICAS, costs, machines=6)
    heavy = next(k for k, (a, b) in enumerate(zip(layout.cuts, layout.cuts[1:])) if a <= 1 < b)
    assert layout.replicas[heavy] == max(layout.replicas) > 1


@settings(max_examples=150, deadline=None)
@given(cost_tables(max_nodes=10), st.integers(1, 8), st.booleans())
def test_dp_replicas_never_loses_to_dp_throughput_or_a_replicated_single_stage(
        costs: SegmentCosts, machines: int, fit_epc: bool) -> None:
    try:
        throughput_cuts = choose_cuts(Planner.DP_THROUGHPUT, costs, machines=machines,
                                      fit_epc=fit_epc)
    except InfeasiblePlanError:
        with pytest.raises(InfeasiblePlanError):
            choose_layout(Planner.DP_REPLICAS, costs, machines=machines, fit_epc=fit_epc)
        return
    layout = choose_layout(Planner.DP_REPLICAS, costs, machines=machines, fit_epc=fit_epc)
    best = period(costs, layout.cuts, layout.replicas)
    ones = (1,) * (len(throughput_cuts) - 1)
    assert best <= period(costs, throughput_cuts, ones) * (1 + 1e-12)
    n = costs.node_count
    if not fit_epc or costs.fits_epc[0, n]:
        assert best <= period(costs, [0, n], (machines,)) * (1 + 1e-12)
    if fit_epc:
        assert all(costs.fits_epc[a, b] for a, b in zip(layout.cuts, layout.cuts[1:]))


def test_fit_epc_is_honoured_and_infeasibility_says_how_many_machines() -> None:
    # Four 50 MiB nodes: two cannot share a 93.5 MiB enclave, so four stages are needed.
    costs = make_costs([1.0, 5.0, 1.0, 1.0], [50.0] * 4, [0.0] * 4, [0.1] * 5)
    with pytest.raises(InfeasiblePlanError, match="at least 4 stages"):
        choose_layout(Planner.DP_REPLICAS, costs, machines=3, fit_epc=True)
    layout = choose_layout(Planner.DP_REPLICAS, costs, machines=6, fit_epc=True)
    assert layout.cuts == (0, 1, 2, 3, 4) and layout.replicas == (1, 3, 1, 1)
    assert all(costs.fits_epc[a, b] for a, b in zip(layout.cuts, layout.cuts[1:]))


def test_dp_replicas_needs_a_machine_budget() -> None:
    costs = make_costs([1.0, 2.0], [1.0, 1.0], [0.0, 0.0], [0.1] * 3)
    with pytest.raises(PlanError, match="--machines K"):
        choose_layout(Planner.DP_REPLICAS, costs)
    assert not issubclass(PlanError, InfeasiblePlanError)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.0, 1e6), st.floats(1e-6, 1e6), st.integers(1, 64))
def test_replicas_needed_is_the_fewest_that_reach_the_target(period_ms: float,
                                                             target_ms: float,
                                                             limit: int) -> None:
    needed = float(replicas_needed(np.array([period_ms]), target_ms, replicate=True,
                                   limit=limit)[0])
    fewest = next((r for r in range(1, limit + 1) if period_ms / r <= target_ms), None)
    assert needed == (math.inf if fewest is None else fewest)


# -- on the zoo, and at scale ----------------------------------------------------------------
def synthetic_costs(model: str, name: str = "sgx1") -> tuple[Analysis, SegmentCosts]:
    """The zoo model's real graph and memory tables with node times from a fixed guess
    (0.05 ms plus 1 ms per 10 MiB of weights first read and outputs written), so that no
    profile is needed: the property under test holds for any node times."""
    source, shapes = open_model(model)
    analysis = analyse(source, shapes, threads=1)
    memory = analysis.memory
    touched = np.diff(memory.touched_weight_bytes[0, :])
    node_ms = 0.05 + (np.maximum(touched, 0) + memory.cut_bytes[1:]) / (10 * 2**20)
    return analysis, segment_costs(memory, node_ms, preset(name),
                                   valid_cut=analysis.graph.valid_cut_positions(),
                                   node_names=tuple(n.name for n in analysis.graph.nodes))


def check_zoo_model(model: str) -> None:
    """The acceptance criterion, on the Plans the partition job would write."""
    analysis, costs = synthetic_costs(model)
    for machines in (2, 4, 8):
        for fit_epc in (False, True):
            try:
                pipeline = make_plan(analysis, costs,
                                     PlanOptions(Planner.DP_THROUGHPUT, machines, fit_epc))
            except InfeasiblePlanError:
                continue
            replicated = make_plan(analysis, costs,
                                   PlanOptions(Planner.DP_REPLICAS, machines, fit_epc))
            assert replicated.machine_count <= machines
            assert replicated.throughput_per_s >= pipeline.throughput_per_s * (1 - 1e-12)
            assert replicated.period_ms == pytest.approx(
                period(costs, replicated.cuts, [s.replicas for s in replicated.stages]),
                rel=1e-12)


@pytest.mark.parametrize("model", ["mobilenet_v2", "resnet18"])
def test_dp_replicas_beats_dp_throughput_on_small_zoo_models(model: str) -> None:
    check_zoo_model(model)


@pytest.mark.slow
@pytest.mark.parametrize("model", [m.name for m in zoo.list_models()])
def test_dp_replicas_beats_dp_throughput_on_every_zoo_model(model: str) -> None:
    check_zoo_model(model)


def test_predicted_throughput_of_the_plan_counts_replicas() -> None:
    """Through build_plan: the Plan's own period is the one the planner optimised."""
    from smlaas.graph import ModelGraph, prepare_model, segment_memory
    from smlaas.plan import ModelRef
    from tests.models import chain_model

    graph = ModelGraph(prepare_model(chain_model(width=8, depth=4), {"x": (1, 8)}))
    costs = segment_costs(segment_memory(graph), np.linspace(1.0, 12.0, graph.node_count),
                          preset("sgx2"))
    ref = ModelRef(name="chain", source="chain.onnx", sha256="0" * 64,
                   input_shapes={"x": [1, 8]}, inputs=["x"], outputs=["y"],
                   node_count=graph.node_count)
    plans = {}
    for planner in (Planner.DP_THROUGHPUT, Planner.DP_REPLICAS):
        layout = choose_layout(planner, costs, machines=6)
        plans[planner] = build_plan(layout.cuts, costs=costs, graph=graph, model=ref,
                                    planner=planner.value, machines=6, fit_epc=False,
                                    replicas=layout.replicas)
        assert plans[planner].period_ms == period(costs, layout.cuts, layout.replicas)
    replicated = plans[Planner.DP_REPLICAS]
    assert replicated.machine_count > len(replicated.stages)
    assert replicated.throughput_per_s > plans[Planner.DP_THROUGHPUT].throughput_per_s
    assert replicated.latency_ms == pytest.approx(latency(costs, replicated.cuts))


def test_dp_replicas_plans_a_resnet152_sized_table_with_64_machines() -> None:
    """Its planning time is a benchmark row (smlaas bench accuracy), not a timed test."""
    rng = np.random.default_rng(1)
    n = 515
    costs = make_costs(rng.uniform(0.01, 2, n), rng.uniform(0, 2, n), rng.uniform(0, 5, n),
                       rng.uniform(0, 0.05, n + 1))
    layout = choose_layout(Planner.DP_REPLICAS, costs, machines=64, fit_epc=True)
    assert layout.machine_count <= 64
    assert layout.machine_count > len(layout.cuts) - 1  # cheap links: replicas pay off


def test_every_layout_of_a_small_table_is_enumerated() -> None:
    """The exhaustive search above covers what it should (a check of the test itself)."""
    costs = make_costs([1.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 4)
    layouts = list(all_layouts(costs, 3, False))
    # cut sets of 3 nodes: [0,3] (r = 1..3), [0,1,3] and [0,2,3] (3 pairs each), [0,1,2,3]
    assert len(layouts) == 3 + 3 + 3 + 1
    assert len(set(itertools.chain.from_iterable(r for _, r in layouts))) == 3
