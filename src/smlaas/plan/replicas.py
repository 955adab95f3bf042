"""Exact planners over cuts, replicas and machine classes (pure).

``dp-replicas`` gives each contiguous stage a number of replicas, at most K enclaves in all,
for the highest throughput, ties broken by latency. On a machines file (``--machines-file``)
``dp-latency``, ``dp-throughput`` and ``dp-replicas`` also give each stage a machine class
(all replicas of a stage are on one class), using at most ``count`` machines of each class.

NOTE_REPLICA_PERIOD: what a replica costs. Per request of its stage, a machine spends the
stage's enclave time on its CPU, the input's transfer on its incoming link and the output's
transfer on its outgoing link. The three overlap (a stage receives the next request while it
computes this one and sends the previous one), so a machine serves a request every
``max(enclave, in, out)`` ms, and r replicas sharing a stage's requests evenly give the stage
that period over r. The gateway is one machine: it sends every request and receives every
result, so the pipeline's period is::

    P = max( max over stages s of max(enclave_s, in_s, out_s) / r_s,  in_0, out_n )

with the gateway's two links ``in_0`` and ``out_n`` at the cost model's network rate. Without
replicas on one class of machine this is exactly ``dp-throughput``'s period (a stage's outgoing
transfer is the next stage's incoming one, and the last stage's is the result link a plan
already counts); with replicas the outgoing link matters: one stage feeding eight replicas
still sends every request itself. Latency does not depend on replicas: the enclave time and
input transfer of every stage, plus the result's transfer.

The algorithm is exact. Let ``p_c(i, j)`` be the period of segment ``[i, j)`` on one machine
of class c (``inf`` where it may not be a stage there), ``L_c(i, j)`` its latency, F the
gateway's floor.

1. *Replicas a target needs.* For a target period T, the segment needs
   ``r_c(i, j; T) = min {r >= 1 : p_c(i, j) / r <= T}`` machines of class c, found with the
   floating-point division the Plan itself uses, so that a plan found for T has period <= T
   exactly. Without replicas (``dp-latency``, ``dp-throughput``) r is 1 when ``p <= T``, and
   the segment is out otherwise.
2. *Is T feasible?* A cut set and a class per stage whose replicas fit every class's count:
   a DP over positions j and the machines u used of every class but the last, whose value is
   the fewest machines of the last class,
   ``f(j, u) = min over i < j and c of f(i, u - r_c(i, j; T) e_c)`` (c not the last) or
   ``f(i, u) + r_last(i, j; T)``; T is feasible iff ``min_u f(n, u) <= count_last``. With one
   class (``--machines K``) u is empty and this is a min-sum path, O(n^2).
3. *The optimal period.* An optimal plan's period is F or some ``p_c(i, j) / r`` with
   ``r <= count_c``, and feasibility is monotone in T. If F is feasible it is optimal;
   otherwise binary search over the candidates between F (infeasible) and the largest finite
   p (feasible iff any plan is). The candidates stay implicit, as one sorted array ``D_c / r``
   per (class, r) with D_c the distinct finite periods on class c; each step tests the
   weighted median of the arrays' middle elements (weighted by how many candidates each still
   has strictly inside the interval), which leaves at most 3/4 of them. So O(log(n^2 K))
   feasibility tests, and the n^2 K candidates are never materialised.
4. *The least latency at that period.* A DP over positions and the machines used of every
   class, ``g(j, u) = min over i, c of g(i, u - r_c(i, j; T*) e_c) + L_c(i, j)``: each stage
   takes the fewest replicas that reach T* (more never lower latency); exact ties go to fewer
   machines. ``dp-latency`` on a machines file is this step alone, with T = inf.

Steps 2 and 4 cost O(n^2 C S) with S the product of (count + 1) over the classes (one class
fewer in step 2): exponential in the number of classes, fine for two or three, and the reason
:class:`~smlaas.plan.machines.MachinePool` refuses more than four. Homogeneous ``dp-replicas``
costs O(n^2) per feasibility test and O(n^2 K) for the latency.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from smlaas.plan.costs import SegmentCosts
from smlaas.plan.machines import (
    ClassCosts,
    MachinePool,
    gateway_floor_ms,
    machine_class_costs,
    reference_class_costs,
)

MAX_STATES = 5_000
"""Largest product of (count + 1) over classes the exact DPs accept: their work is
proportional to it, and two classes of 64 machines (4,225 states) take a few seconds for a
500-node model on one core."""


@dataclass(frozen=True)
class StageLayout:
    """Stage boundaries ``[0, c_1, ..., n]``, and each stage's replicas and machine class."""

    cuts: tuple[int, ...]
    replicas: tuple[int, ...]
    classes: tuple[str | None, ...]
    """Class names from the machines file; ``None`` for the cost model's own machine."""

    @classmethod
    def unreplicated(cls, cuts: Sequence[int]) -> StageLayout:
        stages = len(cuts) - 1
        return cls(tuple(cuts), (1,) * stages, (None,) * stages)

    @property
    def machine_count(self) -> int:
        return sum(self.replicas)


TIE_RELATIVE = 1e-12
"""Periods closer than this (relative) are equal for the latency tie-break."""


class Objective(enum.Enum):
    LATENCY = "latency"
    THROUGHPUT = "throughput"


def plan_replicas(costs: SegmentCosts, *, machines: int, fit_epc: bool) -> StageLayout | None:
    """``dp-replicas`` on ``machines`` machines of the cost model's kind; None if no plan
    meets ``fit_epc`` within them."""
    classes = [reference_class_costs(costs, machines, fit_epc=fit_epc)]
    return _LayoutSearch(classes, replicate=True).best(Objective.THROUGHPUT,
                                                       gateway_floor_ms(costs))


def plan_on_machines(costs: SegmentCosts, pool: MachinePool, *, objective: Objective,
                     replicate: bool, fit_epc: bool) -> StageLayout | None:
    """The best layout on ``pool``: minimum latency, or maximum throughput then minimum
    latency, with (``dp-replicas``) or without (``dp-latency``, ``dp-throughput``)
    replicas; None if no plan meets ``fit_epc`` on these machines."""
    classes = [machine_class_costs(costs, c, fit_epc=fit_epc) for c in pool.classes]
    return _LayoutSearch(classes, replicate=replicate).best(objective, gateway_floor_ms(costs))


def fits_machines(costs: SegmentCosts, pool: MachinePool, *, fit_epc: bool) -> bool:
    """Whether some plan keeps every stage within its class's EPC on ``pool`` (memory alone
    decides this, so node times may be zero)."""
    classes = [machine_class_costs(costs, c, fit_epc=fit_epc) for c in pool.classes]
    return _LayoutSearch(classes, replicate=False).feasible(math.inf)


def state_count(pool: MachinePool, *, node_count: int, replicate: bool) -> int:
    """How many machine-usage states the exact DPs track for ``pool``."""
    limits = [c.count if replicate else min(c.count, node_count) for c in pool.classes]
    return math.prod(limit + 1 for limit in limits)


def replicas_needed(period_ms: np.ndarray, target_ms: float, *, replicate: bool,
                    limit: int) -> np.ndarray:
    """The fewest r >= 1 with ``period_ms / r <= target_ms`` (as floats), element-wise;
    ``inf`` where more than ``limit`` (or, without ``replicate``, more than 1) would be
    needed or the period is ``inf``."""
    period = np.asarray(period_ms, dtype=float)
    finite = np.isfinite(period)
    if not replicate or math.isinf(target_ms):
        return np.where(finite & (period <= target_ms), 1.0, np.inf)
    if target_ms <= 0:
        return np.where(finite & (period <= target_ms), 1.0, np.inf)
    safe = np.where(finite, period, 0.0)
    needed = np.maximum(1.0, np.ceil(safe / target_ms))
    # The ceiling of a rounded quotient can be one off either way; settle on the very test
    # the Plan's period makes, so that a plan built for the target never exceeds it.
    while True:
        low = finite & (safe / needed > target_ms)
        if not low.any():
            break
        needed[low] += 1.0
    while True:
        high = finite & (needed > 1.0) & (safe / np.maximum(needed - 1.0, 1.0) <= target_ms)
        if not high.any():
            break
        needed[high] -= 1.0
    return np.where(finite & (needed <= limit), needed, np.inf)


class _LayoutSearch:
    """Steps 1-4 of the module docstring over one list of machine classes.

    Machine usage is a mixed-radix number over the classes, the last class most significant,
    so that the usage of every class but the last is the state modulo ``strides[-2]``.
    """

    def __init__(self, classes: Sequence[ClassCosts], *, replicate: bool) -> None:
        self.classes = list(classes)
        self.replicate = replicate
        self.n = self.classes[0].period_ms.shape[0] - 1
        # Without replicas a class cannot host more stages than there are nodes.
        self.limits = [c.count if replicate else min(c.count, self.n) for c in self.classes]
        self.strides = [math.prod(limit + 1 for limit in self.limits[:k])
                        for k in range(len(self.limits) + 1)]
        self.states = self.strides[-1]
        if self.states > MAX_STATES:
            raise ValueError(f"{self.states} machine-usage states exceed {MAX_STATES}")
        positions = np.arange(self.states)
        self.digits = np.stack([(positions // self.strides[k]) % (limit + 1)
                                for k, limit in enumerate(self.limits)])

    # -- the public steps ----------------------------------------------------------------
    def best(self, objective: Objective, floor_ms: float) -> StageLayout | None:
        if objective is Objective.LATENCY:
            return self.min_latency(math.inf)
        target = self.min_period(floor_ms)
        # Periods equal but for rounding (the same stage times summed in another order) are
        # ties, which latency breaks.
        return None if target is None else self.min_latency(target * (1 + TIE_RELATIVE))

    def needed(self, target_ms: float) -> list[np.ndarray]:
        return [replicas_needed(c.period_ms, target_ms, replicate=self.replicate, limit=limit)
                for c, limit in zip(self.classes, self.limits)]

    def feasible(self, target_ms: float) -> bool:
        """Step 2: some layout reaches ``target_ms`` within every class's count."""
        needs = self.needed(target_ms)
        n, last = self.n, len(self.classes) - 1
        if last == 0:
            fewest_1d = np.full(n + 1, np.inf)
            fewest_1d[0] = 0.0
            need = needs[0]
            for j in range(1, n + 1):
                fewest_1d[j] = np.min(fewest_1d[:j] + need[:j, j])
            return bool(fewest_1d[n] <= self.limits[0])
        partial = self.strides[last]
        fewest = np.full((n + 1, partial), np.inf)
        fewest[0, 0] = 0.0
        for j in range(1, n + 1):
            row = np.full(partial, np.inf)
            for c, need in enumerate(needs):
                rows = np.flatnonzero(np.isfinite(need[:j, j]))
                if not rows.size:
                    continue
                if c == last:
                    values = fewest[rows] + need[rows, j][:, None]
                else:
                    values = self._shifted(fewest, rows, need[rows, j], c)
                row = np.minimum(row, values.min(axis=0))
            fewest[j] = row
        return bool(fewest[n].min() <= self.limits[last])

    def min_period(self, floor_ms: float) -> float | None:
        """Step 3: the smallest feasible period, or None when no layout exists at all."""
        if not self.feasible(math.inf):
            return None
        if self.feasible(floor_ms):
            return floor_ms
        arrays: list[tuple[list[float], int]] = []
        for machine_class, limit in zip(self.classes, self.limits):
            periods = machine_class.period_ms[np.isfinite(machine_class.period_ms)]
            distinct = np.unique(periods).tolist()
            if distinct:
                arrays += [(distinct, r) for r in range(1, (limit if self.replicate else 1) + 1)]
        low = floor_ms  # infeasible
        high = max(values[-1] for values, _ in arrays)  # feasible: every stage needs r = 1
        while True:
            probe = _median_candidate(arrays, low, high)
            if probe is None:
                return high
            if self.feasible(probe):
                high = probe
            else:
                low = probe

    def min_latency(self, target_ms: float) -> StageLayout | None:
        """Step 4: the least-latency layout whose period is at most ``target_ms``."""
        needs = self.needed(target_ms)
        n, states = self.n, self.states
        best = np.full((n + 1, states), np.inf)
        best[0, 0] = 0.0
        parent_row = np.zeros((n + 1, states), dtype=np.int64)
        parent_class = np.zeros((n + 1, states), dtype=np.int64)
        columns = np.arange(states)
        for j in range(1, n + 1):
            for c, (machine_class, need) in enumerate(zip(self.classes, needs)):
                rows = np.flatnonzero(np.isfinite(need[:j, j]))
                if not rows.size:
                    continue
                values = (self._shifted(best, rows, need[rows, j], c)
                          + machine_class.latency_ms[rows, j][:, None])
                choice = np.argmin(values, axis=0)
                value = values[choice, columns]
                better = value < best[j]
                best[j, better] = value[better]
                parent_row[j, better] = rows[choice[better]]
                parent_class[j, better] = c
        final = best[n]
        if not np.isfinite(final.min()):
            return None
        state = int(np.lexsort((self.digits.sum(axis=0), final))[0])
        stages: list[tuple[int, int, int]] = []
        j = n
        while j > 0:
            i, c = int(parent_row[j, state]), int(parent_class[j, state])
            r = int(needs[c][i, j])
            stages.append((i, c, r))
            state -= r * self.strides[c]
            j = i
        stages.reverse()
        return StageLayout(cuts=tuple(i for i, _, _ in stages) + (n,),
                           replicas=tuple(r for _, _, r in stages),
                           classes=tuple(self.classes[c].name for _, c, _ in stages))

    # -- helpers -------------------------------------------------------------------------
    def _shifted(self, table: np.ndarray, rows: np.ndarray, need: np.ndarray, c: int
                 ) -> np.ndarray:
        """``table[i, u - need_i * e_c]`` for each row i and state u (inf where class c's
        digit of u is below need_i)."""
        states = table.shape[1]
        need_int = need.astype(np.int64)[:, None]
        ok = self.digits[c, :states][None, :] >= need_int
        source = np.where(ok, np.arange(states)[None, :] - need_int * self.strides[c], 0)
        return np.where(ok, table[rows[:, None], source], np.inf)


def _median_candidate(arrays: Sequence[tuple[list[float], int]], low: float, high: float
                      ) -> float | None:
    """The weighted median of the middle candidates strictly between ``low`` and ``high``
    (None if there is none): at least a quarter of those candidates lie on either side of
    it, counting it."""
    middles: list[tuple[float, int]] = []
    for values, r in arrays:
        key = _divided_by(r)
        start = bisect.bisect_right(values, low, key=key)
        stop = bisect.bisect_left(values, high, key=key)
        if start < stop:
            middles.append((values[(start + stop - 1) // 2] / r, stop - start))
    if not middles:
        return None
    middles.sort()
    half = sum(weight for _, weight in middles) / 2
    seen = 0
    for value, weight in middles:
        seen += weight
        if seen >= half:
            return value
    return middles[-1][0]


def _divided_by(replicas: int) -> Callable[[float], float]:
    def key(period_ms: float) -> float:
        return period_ms / replicas
    return key
