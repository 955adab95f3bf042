"""Planners: where to cut, given the shared cost table (pure).

Every planner returns the stage boundaries ``[0, c_1, ..., n]`` (with ``dp-replicas`` or a
machines file, a :class:`~smlaas.plan.replicas.StageLayout` that adds each stage's replicas
and machine class); :func:`smlaas.plan.plan.build_plan` turns them into a :class:`Plan`, so
plans from different planners are compared on identical costs.

- ``dp-latency``: minimum end-to-end latency, ``f(j) = min_i f(i) + T_enc(i, j) + transfer(i)``,
  optionally with at most K stages (a layered DP) and every stage inside the EPC.
- ``dp-throughput``: minimum pipeline period (the slowest stage or link) with at most K
  stages, ties broken by minimum latency among the plans that reach that period.
- ``dp-replicas``: stages and a replica count per stage, at most K enclaves in all, for the
  minimum period (a stage's period over its replicas), ties broken by latency; the exact
  algorithm is in :mod:`smlaas.plan.replicas`.
- ``seed-bruteforce``: the research prototype's rule; grow a stage block by block and cut only
  when ``L(s..e+1) > L(s..e) + transfer(e) + L(e..e+1)``.
- ``greedy-epc``: fill each stage with nodes while its working set fits the EPC.
- ``single``: no cut; the whole model in one enclave (the baseline every plan is compared to).

With a machines file (:class:`~smlaas.plan.machines.MachinePool`) the three ``dp-*``
planners also give each stage a machine class, at most ``count`` machines of each; they are
solved by the exact DPs of :mod:`smlaas.plan.replicas` over machines used per class.
"""

from __future__ import annotations

import enum
from dataclasses import replace

import numpy as np

from smlaas.errors import InfeasiblePlanError, PlanError
from smlaas.plan.costs import SegmentCosts
from smlaas.plan.machines import MachinePool
from smlaas.plan.replicas import (
    MAX_STATES,
    Objective,
    StageLayout,
    fits_machines,
    plan_on_machines,
    plan_replicas,
    state_count,
)

MIB = 1024 * 1024


class Planner(enum.Enum):
    DP_LATENCY = "dp-latency"
    DP_THROUGHPUT = "dp-throughput"
    DP_REPLICAS = "dp-replicas"
    SEED_BRUTEFORCE = "seed-bruteforce"
    GREEDY_EPC = "greedy-epc"
    SINGLE = "single"


MACHINE_FILE_PLANNERS = (Planner.DP_LATENCY, Planner.DP_THROUGHPUT, Planner.DP_REPLICAS)
"""The planners that assign machine classes from a machines file."""


def choose_cuts(planner: Planner, costs: SegmentCosts, *, machines: int | None = None,
                fit_epc: bool = False) -> list[int]:
    """Stage boundaries chosen by ``planner`` (see :func:`choose_layout`)."""
    return list(choose_layout(planner, costs, machines=machines, fit_epc=fit_epc).cuts)


def choose_layout(planner: Planner, costs: SegmentCosts, *, machines: int | None = None,
                  pool: MachinePool | None = None, fit_epc: bool = False) -> StageLayout:
    """Stages chosen by ``planner``, with their replicas and machine classes.

    ``machines`` (a count of machines like the cost model's) and ``pool`` (a machines file)
    are alternatives; ``dp-replicas`` needs one of them.

    Raises:
        InfeasiblePlanError: no plan meets ``fit_epc`` / ``machines`` / ``pool``; the message
            gives the best that can be achieved.
        PlanError: the options do not go together (both budgets, ``dp-replicas`` without a
            budget, a machines file for a planner that does not assign machines).
    """
    if machines is not None and machines < 1:
        raise InfeasiblePlanError(f"--machines must be >= 1, got {machines}")
    if pool is not None:
        return _layout_on_pool(planner, costs, pool, machines=machines, fit_epc=fit_epc)
    if planner is Planner.DP_REPLICAS:
        if machines is None:
            raise PlanError("dp-replicas needs a machine budget: pass --machines K (at most K "
                            "enclaves in all) or --machines-file FILE")
        layout = plan_replicas(costs, machines=machines, fit_epc=fit_epc)
        if layout is None:
            raise _infeasible(costs, max_stages=machines, fit_epc=fit_epc)
        return layout
    if planner is Planner.DP_LATENCY:
        cuts = plan_min_latency(costs, max_stages=machines, fit_epc=fit_epc)
    elif planner is Planner.DP_THROUGHPUT:
        cuts = plan_max_throughput(costs, max_stages=machines, fit_epc=fit_epc)
    elif planner is Planner.SEED_BRUTEFORCE:
        cuts = plan_seed_rule(costs, fit_epc=fit_epc)
    elif planner is Planner.GREEDY_EPC:
        cuts = plan_greedy_epc(costs)
    else:
        cuts = [0, costs.node_count]
    _check_constraints(planner, costs, cuts, machines=machines, fit_epc=fit_epc)
    return StageLayout.unreplicated(cuts)


def _layout_on_pool(planner: Planner, costs: SegmentCosts, pool: MachinePool, *,
                    machines: int | None, fit_epc: bool) -> StageLayout:
    if machines is not None:
        raise PlanError("--machines and --machines-file are alternatives; give one")
    if planner not in MACHINE_FILE_PLANNERS:
        raise PlanError(f"{planner.value} does not assign machine classes; with "
                        f"--machines-file use one of "
                        f"{', '.join(p.value for p in MACHINE_FILE_PLANNERS)}")
    replicate = planner is Planner.DP_REPLICAS
    _check_state_count(costs, pool, replicate=replicate)
    objective = Objective.LATENCY if planner is Planner.DP_LATENCY else Objective.THROUGHPUT
    layout = plan_on_machines(costs, pool, objective=objective, replicate=replicate,
                              fit_epc=fit_epc)
    if layout is None:
        raise _pool_infeasible(costs, pool)
    return layout


def _check_state_count(costs: SegmentCosts, pool: MachinePool, *, replicate: bool) -> None:
    states = state_count(pool, node_count=costs.node_count, replicate=replicate)
    if states > MAX_STATES:
        raise PlanError(
            f"the machines file ({pool.describe()}) gives {states} combinations of machines "
            f"used per class; the exact planners handle at most {MAX_STATES} (their work grows "
            f"with the product of (count + 1) over classes): merge classes or lower counts")


# -- dynamic programmes ----------------------------------------------------------------------
def _allowed(costs: SegmentCosts, *, fit_epc: bool) -> np.ndarray:
    """allowed[i, j]: segment [i, j) may be a stage (i < j, both ends valid cuts, fits)."""
    n = costs.node_count
    allowed = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    allowed &= costs.valid_cut[:, None]
    allowed &= costs.valid_cut[None, :]
    if fit_epc:
        allowed &= costs.fits_epc
    return allowed


def _min_sum_path(weights: np.ndarray, max_stages: int | None) -> tuple[float, list[int]]:
    """Minimum-sum path 0 -> n through the DAG of segments (inf = forbidden), with at most
    ``max_stages`` segments; ties go to fewer stages."""
    n = weights.shape[0] - 1
    if max_stages is None or max_stages >= n:
        best = np.full(n + 1, np.inf)
        best[0] = 0.0
        parent = np.zeros(n + 1, dtype=np.int64)
        for j in range(1, n + 1):
            candidates = best[:j] + weights[:j, j]
            i = int(np.argmin(candidates))
            best[j], parent[j] = candidates[i], i
        return float(best[n]), _walk_back(parent, n) if np.isfinite(best[n]) else []
    layers = [np.full(n + 1, np.inf)]
    layers[0][0] = 0.0
    parents = []
    for _ in range(max_stages):
        totals = layers[-1][:, None] + weights
        parent = np.argmin(totals, axis=0)
        layers.append(totals[parent, np.arange(n + 1)])
        parents.append(parent)
    finals = [layer[n] for layer in layers[1:]]
    k = int(np.argmin(finals)) + 1
    if not np.isfinite(finals[k - 1]):
        return float("inf"), []
    return float(finals[k - 1]), _walk_back_layered(parents[:k], n)


def _min_max_path(weights: np.ndarray, max_stages: int | None) -> float:
    """Smallest achievable maximum segment weight on a path 0 -> n (at most K segments)."""
    n = weights.shape[0] - 1
    if max_stages is None or max_stages >= n:
        best = np.full(n + 1, np.inf)
        best[0] = -np.inf
        for j in range(1, n + 1):
            best[j] = np.min(np.maximum(best[:j], weights[:j, j]))
        return float(best[n])
    layer = np.full(n + 1, np.inf)
    layer[0] = -np.inf
    result = np.inf
    for _ in range(max_stages):
        layer = np.min(np.maximum(layer[:, None], weights), axis=0)
        result = min(result, float(layer[n]))
    return result


def _walk_back(parent: np.ndarray, n: int) -> list[int]:
    cuts = [n]
    while cuts[-1] != 0:
        cuts.append(int(parent[cuts[-1]]))
    return cuts[::-1]


def _walk_back_layered(parents: list[np.ndarray], n: int) -> list[int]:
    cuts = [n]
    for parent in reversed(parents):
        cuts.append(int(parent[cuts[-1]]))
    return cuts[::-1]


def plan_min_latency(costs: SegmentCosts, *, max_stages: int | None = None,
                     fit_epc: bool = False) -> list[int]:
    """Optimal minimum-latency boundaries (``dp-latency``)."""
    weights = np.where(_allowed(costs, fit_epc=fit_epc), costs.stage_latency_ms, np.inf)
    total, cuts = _min_sum_path(weights, max_stages)
    if not cuts:
        raise _infeasible(costs, max_stages=max_stages, fit_epc=fit_epc)
    return cuts


def plan_max_throughput(costs: SegmentCosts, *, max_stages: int | None = None,
                        fit_epc: bool = False) -> list[int]:
    """Optimal pipeline (``dp-throughput``): minimum period, then minimum latency."""
    allowed = _allowed(costs, fit_epc=fit_epc)
    period = np.where(allowed, costs.stage_period_ms, np.inf)
    best_period = _min_max_path(period, max_stages)
    if not np.isfinite(best_period):
        raise _infeasible(costs, max_stages=max_stages, fit_epc=fit_epc)
    # The client links are the same for every plan; a plan is as good as any other whose
    # stages are all at most as slow as the overall bottleneck.
    bound = max(best_period, costs.output_transfer_ms, float(costs.transfer_ms[0]))
    weights = np.where(allowed & (costs.stage_period_ms <= bound), costs.stage_latency_ms,
                       np.inf)
    _, cuts = _min_sum_path(weights, max_stages)
    return cuts


# -- baselines -------------------------------------------------------------------------------
def block_boundaries(costs: SegmentCosts) -> list[int]:
    """The seed's blocks: the cuts crossed by the fewest tensors, plus both ends.

    "Fewest" is the smallest count c such that at least 5% of the positions (and two) carry
    at most c tensors: one tensor between the blocks of a ResNet or a VGG, two in BERT (the
    hidden state and the attention mask), without a few early single-tensor positions
    turning the whole model into one block.
    """
    n = costs.node_count
    counts = costs.memory.cut_tensor_count
    interior = [p for p in range(1, n) if costs.valid_cut[p]]
    if not interior:
        return [0, n]
    needed = max(2, int(0.05 * len(interior)))
    ordered = sorted(int(counts[p]) for p in interior)
    threshold = ordered[min(needed, len(ordered)) - 1]
    return [0] + [p for p in interior if counts[p] <= threshold] + [n]


def plan_seed_rule(costs: SegmentCosts, *, fit_epc: bool = False) -> list[int]:
    """The research prototype's greedy merge rule over blocks (``seed-bruteforce``)."""
    blocks = block_boundaries(costs)
    enclave, transfer = costs.enclave_ms, costs.transfer_ms
    fits = costs.fits_epc
    cuts = [0]
    start = 0
    for k in range(1, len(blocks) - 1):
        end, following = blocks[k], blocks[k + 1]
        merged = enclave[start, following]
        separate = enclave[start, end] + transfer[end] + enclave[end, following]
        if merged > separate or (fit_epc and not fits[start, following]):
            cuts.append(end)
            start = end
    cuts.append(costs.node_count)
    return cuts


def plan_greedy_epc(costs: SegmentCosts) -> list[int]:
    """Fill each stage up to the EPC, node by node (``greedy-epc``)."""
    n = costs.node_count
    fits = costs.fits_epc
    valid = [p for p in range(1, n + 1) if costs.valid_cut[p] or p == n]
    cuts = [0]
    while cuts[-1] < n:
        start = cuts[-1]
        ends = [p for p in valid if p > start]
        fitting = [p for p in ends if fits[start, p]]
        # Working sets grow with the segment, so the last fitting end is the greedy choice;
        # a first node that alone exceeds the EPC becomes a stage of its own.
        cuts.append(fitting[-1] if fitting else ends[0])
    return cuts


# -- constraints -----------------------------------------------------------------------------
def check_feasible(costs: SegmentCosts, *, machines: int | None, fit_epc: bool,
                   pool: MachinePool | None = None) -> None:
    """Raises InfeasiblePlanError when no plan can meet ``fit_epc`` within ``machines`` (or
    on ``pool``).

    Only memory decides this, so it can run before any profiling: greedy filling gives the
    fewest stages that all fit, because a segment's working set only grows as it grows.
    """
    if not fit_epc:
        return
    if pool is not None:
        _check_state_count(costs, pool, replicate=False)
        if not fits_machines(costs, pool, fit_epc=True):
            raise _pool_infeasible(costs, pool)
        return
    single = [costs.fits_epc[k, k + 1] for k in range(costs.node_count)]
    if not all(single) or (machines is not None
                           and len(plan_greedy_epc(costs)) - 1 > machines):
        raise _infeasible(costs, max_stages=machines, fit_epc=True)


def _check_constraints(planner: Planner, costs: SegmentCosts, cuts: list[int], *,
                       machines: int | None, fit_epc: bool) -> None:
    stages = len(cuts) - 1
    if machines is not None and stages > machines:
        raise InfeasiblePlanError(
            f"{planner.value} makes {stages} stages but only {machines} machines are "
            f"available (--machines); use dp-latency, dp-throughput or dp-replicas, which "
            f"respect it"
        )
    if fit_epc:
        worst = max(range(stages), key=lambda k: costs.working_set_bytes[cuts[k], cuts[k + 1]])
        ws = costs.working_set_bytes[cuts[worst], cuts[worst + 1]]
        if ws > costs.cost_model.usable_epc_bytes:
            raise _infeasible(costs, max_stages=machines, fit_epc=True, planner=planner)


def _infeasible(costs: SegmentCosts, *, max_stages: int | None, fit_epc: bool,
                planner: Planner | None = None) -> InfeasiblePlanError:
    epc_mib = costs.cost_model.usable_epc_mib
    limit = f" with at most {max_stages} stage(s)" if max_stages else ""
    if not fit_epc:
        return InfeasiblePlanError(f"no valid plan exists{limit}")
    weights = np.where(_allowed(costs, fit_epc=False), costs.working_set_bytes, np.inf)
    smallest = _min_max_path(weights, max_stages) / MIB
    if planner is not None and smallest <= epc_mib:
        return InfeasiblePlanError(
            f"{planner.value} makes a stage larger than the usable EPC ({epc_mib:g} MiB), "
            f"although plans{limit} with every stage within {smallest:.1f} MiB exist; "
            f"dp-latency, dp-throughput and dp-replicas find them"
        )
    n = costs.node_count
    single = [costs.working_set_bytes[k, k + 1] for k in range(n)]
    worst = int(np.argmax(single))
    worst_node = f"{costs.node_names[worst]!r}" if costs.node_names else f"#{worst}"
    if single[worst] <= costs.cost_model.usable_epc_bytes:
        needed = len(plan_greedy_epc(costs)) - 1  # greedy filling minimises the stage count
        return InfeasiblePlanError(
            f"no plan{limit} keeps every stage within the usable EPC ({epc_mib:g} MiB): "
            f"at least {needed} stages are needed; raise --machines to {needed} or drop "
            f"--fit-epc to accept paging"
        )
    return InfeasiblePlanError(
        f"no plan{limit} keeps every stage within the usable EPC ({epc_mib:g} MiB): the "
        f"smallest achievable largest working set is {smallest:.1f} MiB (node {worst_node} "
        f"alone needs {single[worst] / MIB:.1f} MiB); drop --fit-epc to accept paging, or "
        f"use a preset with a larger EPC"
    )


def _pool_infeasible(costs: SegmentCosts, pool: MachinePool) -> InfeasiblePlanError:
    """Without --fit-epc every pool has a plan (one stage on any class), so this is about
    the EPC: either a node is too big for every class, or the machines are too few."""
    largest = max(pool.classes, key=lambda c: c.usable_epc_mib)
    single = [costs.working_set_bytes[k, k + 1] for k in range(costs.node_count)]
    worst = int(np.argmax(single))
    if single[worst] > largest.usable_epc_bytes:
        worst_node = f"{costs.node_names[worst]!r}" if costs.node_names else f"#{worst}"
        return InfeasiblePlanError(
            f"no plan on the machines file's classes ({pool.describe()}) keeps every stage "
            f"within its class's usable EPC: node {worst_node} alone needs "
            f"{single[worst] / MIB:.1f} MiB, more than the largest class {largest.name!r} "
            f"has ({largest.usable_epc_mib:g} MiB); drop --fit-epc to accept paging")
    on_largest = replace(costs, cost_model=largest.cost_model(costs.cost_model))
    needed = len(plan_greedy_epc(on_largest)) - 1
    return InfeasiblePlanError(
        f"no plan on the machines file's classes ({pool.describe()}) keeps every stage "
        f"within its class's usable EPC: at least {needed} stages are needed even on "
        f"{largest.name!r} ({largest.usable_epc_mib:g} MiB); add machines to the file or "
        f"drop --fit-epc to accept paging")
