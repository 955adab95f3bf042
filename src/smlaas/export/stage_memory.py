"""The working set of exported stages measured natively, as the partition job reports it beside
the prediction (the method: :mod:`smlaas.runtime.working_set`)."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from smlaas.plan.plan import MeasuredMemory, Plan, StagePlan
from smlaas.profile import ProgressCallback
from smlaas.runtime.working_set import (
    MEASURED_INFERENCES,
    ROUNDS,
    TIMEOUT_S,
    WARMUP_RUNS,
    measure_working_set,
    unavailable_reason,
)

logger = logging.getLogger(__name__)

MEMORY_NOTE = "working_set_measurement"
"""``plan.notes`` key: why the stages' working sets were not measured, when they were not."""


@dataclass(frozen=True)
class StageMemory:
    """Every stage's measurement, or (all None) the reason this machine cannot measure."""

    measured: tuple[MeasuredMemory | None, ...]
    unavailable_reason: str | None = None


def measure_stage_memory(stage_files: Sequence[Path],
                         stage_feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int,
                         warmup_runs: int = WARMUP_RUNS, inferences: int = MEASURED_INFERENCES,
                         rounds: int = ROUNDS, timeout_s: float = TIMEOUT_S,
                         progress: ProgressCallback | None = None) -> StageMemory:
    """Each exported stage (``stage_files[k]``, run on ``stage_feeds[k]``) measured in its own
    process, one after the other.

    Raises:
        ProfileError: a stage failed to run in its process, or missed ``timeout_s``.
    """
    reason = unavailable_reason()
    if reason is not None:
        logger.warning("stage working sets not measured: %s", reason)
        return StageMemory((None,) * len(stage_files), reason)
    measured: list[MeasuredMemory | None] = []
    for index, (path, feeds) in enumerate(zip(stage_files, stage_feeds, strict=True)):
        result = measure_working_set(path, feeds, threads=threads, warmup_runs=warmup_runs,
                                     inferences=inferences, rounds=rounds,
                                     timeout_s=timeout_s,
                                     label=f"stage {index}")
        if result.measured is None:
            logger.warning("stage working sets not measured: %s", result.unavailable_reason)
            return StageMemory((None,) * len(stage_files), result.unavailable_reason)
        measured.append(result.measured)
        if progress:
            progress("measuring working sets", index + 1, len(stage_files))
    return StageMemory(tuple(measured))


def apply_stage_memory(plan: Plan, memory: StageMemory) -> Plan:
    """``plan`` with the measurements, or with the reason there are none in its notes. A
    decoder stage's measurement gains its KV cache store: the worker keeps every sequence's
    cache beside the session (the measured process is fed one step's pasts only)."""
    plan = plan.with_measured_memory([
        None if m is None else m if not stage.kv_cache_bytes else replace(
            m, working_set_bytes=m.working_set_bytes + stage.kv_cache_bytes,
            method=f"{m.method}, plus the KV cache store it keeps (counted)")
        for stage, m in zip(plan.stages, memory.measured)])
    if memory.unavailable_reason is None:
        return plan
    return replace(plan, notes={**plan.notes, MEMORY_NOTE: {
        "measured": False, "reason": memory.unavailable_reason}})


def native_prediction_bytes(plan: Plan, stage: StagePlan) -> float:
    """The stage's predicted working set less the LibOS's pages (the cost model's L): what a
    native measurement is compared with."""
    return stage.working_set_bytes - plan.cost_model.libos_overhead_mib * 2**20


def working_set_errors(plan: Plan) -> list[float]:
    """|predicted natively - measured| / measured working set, for stages that were
    measured."""
    return [abs(native_prediction_bytes(plan, s) - s.measured.working_set_bytes)
            / s.measured.working_set_bytes
            for s in plan.stages if s.measured is not None and s.measured.working_set_bytes]


def median_working_set_error(plan: Plan) -> float | None:
    errors = working_set_errors(plan)
    return statistics.median(errors) if errors else None


def unmeasured_reason(plan: Plan) -> str:
    """Why ``plan``'s stages carry no measured working set."""
    note = plan.notes.get(MEMORY_NOTE)
    if isinstance(note, dict) and note.get("reason"):
        return str(note["reason"])
    return "not measured (--no-measure-memory, or a plan from before smlaas measured them)"


def working_set_summary(plan: Plan) -> str:
    """One line: measured against predicted working set per stage, and the median error."""
    measured = [s for s in plan.stages if s.measured is not None]
    first = next((m for s in measured if (m := s.measured) is not None), None)
    if first is None:
        return f"working sets: {unmeasured_reason(plan)}; the prediction stands"
    method = (f"{first.method}, least of {first.rounds} rounds of {first.inferences} "
              f"inferences, {first.threads} thread(s)")
    stages = ", ".join(f"stage {s.index} {s.measured.working_set_mib:.1f}"
                       f" (predicted {s.working_set_mib:.1f})"
                       for s in measured if s.measured is not None)
    median = median_working_set_error(plan)
    return (f"working sets measured natively ({method}): {stages} MiB; median |predicted - "
            f"measured| / measured {100 * (median or 0):.1f}%")
