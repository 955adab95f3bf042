"""Predicted cost of every candidate stage, the table all planners share (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smlaas.graph.memory import SegmentMemory
from smlaas.plan.cost_model import MIB, CostModel


@dataclass(frozen=True)
class SegmentCosts:
    """Costs of all segments ``[i, j)`` (matrices indexed ``[i, j]``, meaningful for i < j)
    and of all cut positions ``p`` (vectors of length n + 1).

    A stage's *latency* is its enclave time plus the transfer of its input cut; its *period*
    (what bounds pipeline throughput) is the larger of the two, since a stage receives the
    next request while it computes the current one.
    """

    native_ms: np.ndarray
    working_set_bytes: np.ndarray
    enclave_ms: np.ndarray
    transfer_ms: np.ndarray
    valid_cut: np.ndarray
    cost_model: CostModel
    memory: SegmentMemory
    node_names: tuple[str, ...] = ()

    @property
    def node_count(self) -> int:
        return len(self.transfer_ms) - 1

    @property
    def fits_epc(self) -> np.ndarray:
        return self.working_set_bytes <= self.cost_model.usable_epc_bytes

    @property
    def stage_latency_ms(self) -> np.ndarray:
        return self.enclave_ms + self.transfer_ms[:, None]

    @property
    def stage_period_ms(self) -> np.ndarray:
        return np.maximum(self.enclave_ms, self.transfer_ms[:, None])

    @property
    def output_transfer_ms(self) -> float:
        """Moving the model's outputs back to the client (the same for every plan)."""
        return float(self.transfer_ms[-1])


def segment_costs(memory: SegmentMemory, node_ms: np.ndarray, cost_model: CostModel, *,
                  fusion_factor: float = 1.0, run_overhead_ms: float = 0.0,
                  valid_cut: np.ndarray | None = None,
                  node_names: tuple[str, ...] = ()) -> SegmentCosts:
    """Builds the cost table.

    Args:
        memory: per-segment memory of the model.
        node_ms: native time of each node in topological order.
        cost_model: parameters of the enclave and the network.
        fusion_factor: measured whole-model time over the sum of node times.
        run_overhead_ms: fixed cost of one session run, paid once per stage.
        valid_cut: positions that may be cut (all, if omitted).
        node_names: names of the nodes, for error messages.
    """
    n = memory.node_count
    if len(node_ms) != n:
        raise ValueError(f"node_ms has {len(node_ms)} entries for a graph of {n} nodes")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(node_ms, dtype=float))])
    upper = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    native = np.where(upper, fusion_factor * (prefix[None, :] - prefix[:, None])
                      + run_overhead_ms, 0.0)
    working_set = np.where(upper, cost_model.working_set_bytes(
        memory.touched_weight_bytes, memory.peak_activation_bytes), 0.0)
    if memory.kv_cache_bytes is not None:  # the cache stays resident between steps
        working_set = working_set + memory.kv_cache_bytes
    if memory.kv_step_bytes is not None:  # a step's pasts and presents, the whole run
        working_set = working_set + memory.kv_step_bytes
    enclave = np.where(upper, cost_model.enclave_time_ms(native, working_set), 0.0)
    transfer = np.asarray(cost_model.transfer_ms(memory.cut_bytes), dtype=float)
    cuts = np.ones(n + 1, dtype=bool) if valid_cut is None else np.asarray(valid_cut, bool)
    return SegmentCosts(native_ms=native, working_set_bytes=working_set, enclave_ms=enclave,
                        transfer_ms=transfer, valid_cut=cuts, cost_model=cost_model,
                        memory=memory, node_names=tuple(node_names))


def synthetic_costs(node_ms: np.ndarray, node_weight_mib: np.ndarray, live_mib: np.ndarray,
                    cut_mib: np.ndarray, cost_model: CostModel) -> SegmentCosts:
    """A cost table for a chain of nodes described directly (per node: time, weight MiB and
    live activation MiB; per cut position: MiB crossing it), for planner tests and
    benchmarks that need tables of any size without a model."""
    n = len(node_ms)
    weight_prefix = np.concatenate([[0], np.cumsum(node_weight_mib)]) * MIB
    weights = np.triu(weight_prefix[None, :] - weight_prefix[:, None], 1).astype(np.int64)
    live = np.asarray(live_mib, dtype=float) * MIB
    peak = np.zeros((n + 1, n + 1), dtype=np.int64)
    for i in range(n):
        peak[i, i + 1:] = np.maximum.accumulate(live[i:])
    memory = SegmentMemory(weight_bytes=weights, touched_weight_bytes=weights,
                           peak_activation_bytes=peak,
                           cut_bytes=(np.asarray(cut_mib) * MIB).astype(np.int64),
                           cut_tensor_count=np.ones(n + 1, dtype=np.int64))
    return segment_costs(memory, np.asarray(node_ms, float), cost_model)
