"""The Plan: which nodes go to which stage, and what that is predicted to cost (pure data).

A Plan round-trips through JSON (``to_json`` / ``from_json``), reports every problem at once
(``validate``), and renders as a text table (``to_table``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from smlaas.errors import PlanError
from smlaas.graph.analysis import ModelGraph
from smlaas.plan.cost_model import MIB, CostModel
from smlaas.plan.costs import SegmentCosts

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelRef:
    """What was partitioned: where it came from and at which input shapes."""

    name: str
    source: str
    """A file path, or ``zoo:NAME`` for a zoo model."""
    sha256: str
    """SHA-256 of the source model's serialised bytes."""
    input_shapes: dict[str, list[int]]
    inputs: list[str]
    outputs: list[str]
    node_count: int


@dataclass(frozen=True)
class StagePlan:
    """One stage: nodes ``[start, end)`` of the topological order, and its predictions."""

    index: int
    start: int
    end: int
    first_node: str
    last_node: str
    inputs: list[str]
    outputs: list[str]
    input_bytes: int
    output_bytes: int
    native_ms: float
    enclave_ms: float
    transfer_in_ms: float
    weight_bytes: int
    touched_weight_bytes: int
    peak_activation_bytes: int
    working_set_bytes: int
    measured_native_ms: float | None = None

    @property
    def node_count(self) -> int:
        return self.end - self.start

    @property
    def working_set_mib(self) -> float:
        return self.working_set_bytes / MIB

    @property
    def file_name(self) -> str:
        return f"stage_{self.index}.onnx"


@dataclass(frozen=True)
class Plan:
    """A partition of one model into stages, with predicted latency and throughput."""

    model: ModelRef
    planner: str
    cost_model: CostModel
    stages: tuple[StagePlan, ...]
    machines: int | None
    fit_epc: bool
    output_transfer_ms: float
    format_version: int = FORMAT_VERSION
    notes: dict[str, Any] = field(default_factory=dict)

    # -- predictions ---------------------------------------------------------------------
    @property
    def latency_ms(self) -> float:
        """End to end: every stage's enclave time, every transfer including client links."""
        return sum(s.enclave_ms + s.transfer_in_ms for s in self.stages) + \
            self.output_transfer_ms

    @property
    def period_ms(self) -> float:
        """Time between two results of the full pipeline: its slowest stage or link."""
        return max([max(s.enclave_ms, s.transfer_in_ms) for s in self.stages]
                   + [self.output_transfer_ms])

    @property
    def throughput_per_s(self) -> float:
        return 1000.0 / self.period_ms if self.period_ms > 0 else float("inf")

    @property
    def max_working_set_bytes(self) -> int:
        return max(s.working_set_bytes for s in self.stages)

    @property
    def all_fit_epc(self) -> bool:
        return self.max_working_set_bytes <= self.cost_model.usable_epc_bytes

    @property
    def cuts(self) -> list[int]:
        return [s.start for s in self.stages] + [self.stages[-1].end]

    # -- validation ----------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Every problem with this plan, as messages; an empty list means valid."""
        problems: list[str] = []
        if self.format_version != FORMAT_VERSION:
            problems.append(f"format_version is {self.format_version}, this smlaas reads "
                            f"{FORMAT_VERSION}")
        if not self.stages:
            return problems + ["the plan has no stages"]
        n = self.model.node_count
        if self.stages[0].start != 0:
            problems.append(f"stage 0 starts at node {self.stages[0].start}, expected 0")
        if self.stages[-1].end != n:
            problems.append(f"the last stage ends at node {self.stages[-1].end}, expected {n}")
        for k, stage in enumerate(self.stages):
            if stage.index != k:
                problems.append(f"stage at position {k} has index {stage.index}")
            if stage.end <= stage.start:
                problems.append(f"stage {k} is empty or reversed: [{stage.start}, {stage.end})")
            if k and stage.start != self.stages[k - 1].end:
                problems.append(f"stage {k} starts at {stage.start} but stage {k - 1} ends at "
                                f"{self.stages[k - 1].end}")
            if k and stage.inputs != self.stages[k - 1].outputs:
                problems.append(f"stage {k} inputs {stage.inputs} differ from stage {k - 1} "
                                f"outputs {self.stages[k - 1].outputs}")
            if not stage.outputs:
                problems.append(f"stage {k} has no outputs")
        if not set(self.stages[0].inputs) <= set(self.model.inputs):
            problems.append(f"stage 0 inputs {self.stages[0].inputs} are not all model inputs "
                            f"{self.model.inputs}")
        if sorted(self.stages[-1].outputs) != sorted(self.model.outputs):
            problems.append(f"the last stage's outputs {self.stages[-1].outputs} are not the "
                            f"model outputs {self.model.outputs}")
        if self.machines is not None and len(self.stages) > self.machines:
            problems.append(f"{len(self.stages)} stages for {self.machines} machines")
        if self.fit_epc:
            for stage in self.stages:
                if stage.working_set_bytes > self.cost_model.usable_epc_bytes:
                    problems.append(f"stage {stage.index} working set "
                                    f"{stage.working_set_mib:.1f} MiB exceeds the usable EPC "
                                    f"{self.cost_model.usable_epc_mib:g} MiB")
        problems.extend(f"cost model: {p}" for p in self.cost_model.validate())
        return problems

    def check(self) -> None:
        """Raises PlanError listing every problem, if there is any."""
        problems = self.validate()
        if problems:
            raise PlanError("invalid plan:\n  - " + "\n  - ".join(problems))

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [asdict(s) for s in self.stages]
        data["predicted"] = {
            "latency_ms": self.latency_ms,
            "period_ms": self.period_ms,
            "throughput_per_s": self.throughput_per_s,
            "max_working_set_bytes": self.max_working_set_bytes,
            "all_fit_epc": self.all_fit_epc,
        }
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        try:
            data = dict(data)
            data.pop("predicted", None)
            return cls(
                model=ModelRef(**data.pop("model")),
                cost_model=CostModel(**data.pop("cost_model")),
                stages=tuple(StagePlan(**s) for s in data.pop("stages")),
                **data,
            )
        except (TypeError, KeyError, ValueError) as err:
            raise PlanError(f"not a valid smlaas plan: {err}") from err

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise PlanError("plan JSON must be an object")
        return cls.from_dict(data)

    def with_measured(self, measured_ms: list[float]) -> Plan:
        stages = tuple(replace(s, measured_native_ms=m) for s, m in zip(self.stages, measured_ms))
        return replace(self, stages=stages)

    # -- text ----------------------------------------------------------------------------
    def to_table(self) -> str:
        cm = self.cost_model
        label = "predicted" if cm.enclave else "predicted, no enclave"
        lines = [
            f"plan for {self.model.name} by {self.planner} ({cm.preset} cost model, usable EPC "
            f"{cm.usable_epc_mib:g} MiB)",
            f"{'stage':>5} {'nodes':>11} {'native ms':>10} {'enclave ms':>10} "
            f"{'in MiB':>7} {'xfer ms':>8} {'weights MiB':>11} {'ws MiB':>8}  fits",
        ]
        for s in self.stages:
            lines.append(
                f"{s.index:>5} {f'{s.start}-{s.end - 1}':>11} {s.native_ms:>10.2f} "
                f"{s.enclave_ms:>10.2f} {s.input_bytes / MIB:>7.2f} {s.transfer_in_ms:>8.2f} "
                f"{s.weight_bytes / MIB:>11.1f} {s.working_set_mib:>8.1f}  "
                f"{'yes' if s.working_set_bytes <= cm.usable_epc_bytes else 'NO'}"
            )
        lines.append(
            f"{label}: latency {self.latency_ms:.2f} ms, throughput "
            f"{self.throughput_per_s:.2f}/s (period {self.period_ms:.2f} ms), "
            f"{len(self.stages)} stage(s), largest working set "
            f"{self.max_working_set_bytes / MIB:.1f} MiB"
        )
        return "\n".join(lines)


def build_plan(cuts: list[int], *, costs: SegmentCosts, graph: ModelGraph, model: ModelRef,
               planner: str, machines: int | None, fit_epc: bool) -> Plan:
    """The Plan for stage boundaries ``cuts`` with figures read from ``costs``."""
    memory = costs.memory
    stages = []
    for index, (start, end) in enumerate(zip(cuts, cuts[1:])):
        inputs, outputs = graph.cut_tensors(start), graph.cut_tensors(end)
        stages.append(StagePlan(
            index=index, start=start, end=end,
            first_node=graph.nodes[start].name, last_node=graph.nodes[end - 1].name,
            inputs=inputs, outputs=outputs,
            input_bytes=int(memory.cut_bytes[start]), output_bytes=int(memory.cut_bytes[end]),
            native_ms=float(costs.native_ms[start, end]),
            enclave_ms=float(costs.enclave_ms[start, end]),
            transfer_in_ms=float(costs.transfer_ms[start]),
            weight_bytes=int(memory.weight_bytes[start, end]),
            touched_weight_bytes=int(memory.touched_weight_bytes[start, end]),
            peak_activation_bytes=int(memory.peak_activation_bytes[start, end]),
            working_set_bytes=int(costs.working_set_bytes[start, end]),
        ))
    plan = Plan(model=model, planner=planner, cost_model=costs.cost_model,
                stages=tuple(stages), machines=machines, fit_epc=fit_epc,
                output_transfer_ms=costs.output_transfer_ms)
    plan.check()
    return plan
