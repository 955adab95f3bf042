"""Planners against exhaustive search on random cost tables (hypothesis)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smlaas.errors import InfeasiblePlanError
from smlaas.plan import Planner, choose_cuts, preset
from smlaas.plan.costs import SegmentCosts, synthetic_costs

MIB = 1024 * 1024


def make_costs(node_ms, node_weight_mib, live_mib, cut_mib, model_name="sgx1"
               ) -> SegmentCosts:
    return synthetic_costs(node_ms, node_weight_mib, live_mib, cut_mib, preset(model_name))


@st.composite
def cost_tables(draw, max_nodes: int = 8):
    n = draw(st.integers(1, max_nodes))
    floats = st.floats(0.0, 60.0, allow_nan=False)
    node_ms = draw(st.lists(st.floats(0.01, 50.0), min_size=n, max_size=n))
    weights = draw(st.lists(floats, min_size=n, max_size=n))
    live = draw(st.lists(st.floats(0.0, 20.0), min_size=n, max_size=n))
    cuts = draw(st.lists(st.floats(0.0, 3.0), min_size=n + 1, max_size=n + 1))
    name = draw(st.sampled_from(["sgx1", "sgx2", "native"]))
    return make_costs(node_ms, weights, live, cuts, name)


def all_plans(costs: SegmentCosts, *, max_stages=None, fit_epc=False):
    """Every partition of 0..n into contiguous stages that meets the constraints."""
    n = costs.node_count
    for k in range(0, n):
        for interior in itertools.combinations(range(1, n), k):
            cuts = [0, *interior, n]
            if max_stages is not None and len(cuts) - 1 > max_stages:
                continue
            if fit_epc and not all(costs.fits_epc[a, b] for a, b in zip(cuts, cuts[1:])):
                continue
            yield cuts


def latency(costs: SegmentCosts, cuts) -> float:
    return sum(costs.stage_latency_ms[a, b] for a, b in zip(cuts, cuts[1:])) + \
        costs.output_transfer_ms


def period(costs: SegmentCosts, cuts) -> float:
    return max([costs.stage_period_ms[a, b] for a, b in zip(cuts, cuts[1:])]
               + [costs.output_transfer_ms])


constraints = st.tuples(st.one_of(st.none(), st.integers(1, 4)), st.booleans())


@settings(max_examples=150, deadline=None)
@given(cost_tables(), constraints)
def test_dp_latency_is_optimal(costs: SegmentCosts, constraint) -> None:
    machines, fit_epc = constraint
    plans = list(all_plans(costs, max_stages=machines, fit_epc=fit_epc))
    if not plans:
        with pytest.raises(InfeasiblePlanError):
            choose_cuts(Planner.DP_LATENCY, costs, machines=machines, fit_epc=fit_epc)
        return
    cuts = choose_cuts(Planner.DP_LATENCY, costs, machines=machines, fit_epc=fit_epc)
    assert cuts in plans
    best = min(latency(costs, p) for p in plans)
    assert latency(costs, cuts) == pytest.approx(best, rel=1e-9, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(cost_tables(), constraints)
def test_dp_throughput_is_optimal_with_latency_tie_break(costs: SegmentCosts,
                                                         constraint) -> None:
    machines, fit_epc = constraint
    plans = list(all_plans(costs, max_stages=machines, fit_epc=fit_epc))
    if not plans:
        with pytest.raises(InfeasiblePlanError):
            choose_cuts(Planner.DP_THROUGHPUT, costs, machines=machines, fit_epc=fit_epc)
        return
    cuts = choose_cuts(Planner.DP_THROUGHPUT, costs, machines=machines, fit_epc=fit_epc)
    assert cuts in plans
    best_period = min(period(costs, p) for p in plans)
    assert period(costs, cuts) == pytest.approx(best_period, rel=1e-9)
    tied = [p for p in plans if period(costs, p) <= best_period * (1 + 1e-12)]
    assert latency(costs, cuts) == pytest.approx(min(latency(costs, p) for p in tied),
                                                 rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(cost_tables(max_nodes=10), st.booleans())
def test_dp_planners_never_lose_to_baselines(costs: SegmentCosts, fit_epc: bool) -> None:
    results = {}
    for planner in Planner:
        if planner is Planner.DP_REPLICAS:
            continue  # needs a machine budget; tests/unit/test_replicas_planner.py
        try:
            results[planner] = choose_cuts(planner, costs, fit_epc=fit_epc)
        except InfeasiblePlanError:
            continue
    if Planner.DP_LATENCY not in results:
        assert not any(p in results for p in Planner)
        return
    best_latency = latency(costs, results[Planner.DP_LATENCY])
    best_period = period(costs, results[Planner.DP_THROUGHPUT])
    for cuts in results.values():
        assert best_latency <= latency(costs, cuts) + 1e-9
        assert best_period <= period(costs, cuts) + 1e-9


def test_greedy_fills_each_stage_up_to_the_epc() -> None:
    # 10 nodes of 30 MiB weights each: with 8 MiB of runtime and LibOS, 2 nodes (68 MiB) fit.
    costs = make_costs([1.0] * 10, [30.0] * 10, [0.0] * 10, [0.1] * 11)
    assert choose_cuts(Planner.GREEDY_EPC, costs) == [0, 2, 4, 6, 8, 10]


def test_fit_epc_infeasible_names_the_node_and_smallest_working_set() -> None:
    costs = make_costs([1.0, 1.0], [10.0, 120.0], [0.0, 0.0], [0.1] * 3)
    with pytest.raises(InfeasiblePlanError, match=r"smallest achievable largest working set "
                                                  r"is 128\.0 MiB \(node #1"):
        choose_cuts(Planner.DP_LATENCY, costs, fit_epc=True)


def test_machine_limit_infeasible_says_how_many_stages_are_needed() -> None:
    costs = make_costs([1.0] * 4, [50.0] * 4, [0.0] * 4, [0.1] * 5)
    with pytest.raises(InfeasiblePlanError, match="at least 4 stages"):
        choose_cuts(Planner.DP_LATENCY, costs, machines=2, fit_epc=True)


def test_paging_makes_dp_latency_cut_a_model_bigger_than_the_epc() -> None:
    # Two 60 MiB halves: together they page (sgx1), apart each fits.
    costs = make_costs([10.0, 10.0], [60.0, 60.0], [1.0, 1.0], [1.0, 1.0, 0.1])
    assert choose_cuts(Planner.DP_LATENCY, costs) == [0, 1, 2]
    assert choose_cuts(Planner.SINGLE, costs) == [0, 2]


def test_every_planner_plans_a_700_node_table() -> None:
    """Its planning time is a benchmark row (smlaas bench accuracy), not a timed test."""
    rng = np.random.default_rng(0)
    n = 700
    costs = make_costs(rng.uniform(0.01, 2, n), rng.uniform(0, 2, n), rng.uniform(0, 5, n),
                       rng.uniform(0, 2, n + 1))
    for planner in (Planner.DP_LATENCY, Planner.DP_THROUGHPUT, Planner.SEED_BRUTEFORCE,
                    Planner.GREEDY_EPC):
        cuts = choose_cuts(planner, costs, fit_epc=True)
        assert cuts[0] == 0 and cuts[-1] == n and cuts == sorted(set(cuts))
    assert len(choose_cuts(Planner.DP_THROUGHPUT, costs, machines=16, fit_epc=True)) <= 17


