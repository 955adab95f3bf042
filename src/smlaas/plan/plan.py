"""The Plan: which nodes go to which stage, and what that is predicted to cost (pure data).

A Plan round-trips through JSON (``to_json`` / ``from_json``), reports every problem at once
(``validate``), and renders as a text table (``to_table``). A stage may have several replicas
(``dp-replicas``) and a machine class (``--machines-file``); plans written before either
existed load unchanged, with one replica per stage on the cost model's machine. A stage may
carry its working set as measured natively after export (``measured``); plans written before
that load with ``measured`` None, as do plans from machines where it cannot be measured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from smlaas.errors import PlanError
from smlaas.graph.analysis import ModelGraph
from smlaas.plan.cost_model import MIB, CostModel
from smlaas.plan.costs import SegmentCosts
from smlaas.plan.generation import GenerationPlan
from smlaas.plan.machines import MachineClass, MachinePool

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
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    """Input axes that stay symbolic in the stages (the batch axis, ``--dynamic-axis``): the
    stages take any size there; ``input_shapes`` is the size they were planned at."""


@dataclass(frozen=True)
class MeasuredMemory:
    """A stage's memory measured natively, its sub-model run as a worker runs it (see
    :mod:`smlaas.runtime.working_set`); ``stages[k].measured`` in plan.json."""

    working_set_bytes: int
    """Bytes of the pages the process touched over ``inferences`` inferences after warm-up
    (the least of ``rounds`` such counts): what an enclave must keep in the EPC to run them
    without paging."""
    rss_bytes: int
    """The process's resident set after those inferences (untouched copies included)."""
    peak_rss_bytes: int
    """The largest resident set the process had (session creation included)."""
    inferences: int
    threads: int
    """ONNX Runtime intra-op threads of the measured session."""
    method: str
    """How the pages were counted, e.g. ``smaps_rollup Referenced``."""
    rounds: int = 1
    """Counts taken; ``working_set_bytes`` is the least (shared pages other processes mark
    referenced only ever add to a count)."""

    @property
    def working_set_mib(self) -> float:
        return self.working_set_bytes / MIB

    def validate(self) -> list[str]:
        problems = [f"{name} is {getattr(self, name)!r}, expected an integer >= 0"
                    for name in ("working_set_bytes", "rss_bytes", "peak_rss_bytes")
                    if isinstance(getattr(self, name), bool)
                    or not isinstance(getattr(self, name), int) or getattr(self, name) < 0]
        problems += [f"{name} is {getattr(self, name)!r}, expected an integer >= 1"
                     for name in ("inferences", "threads", "rounds")
                     if isinstance(getattr(self, name), bool)
                     or not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        return problems

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeasuredMemory:
        return cls(**data)


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
    replicas: int = 1
    """Identical enclaves that share this stage's requests (``dp-replicas``)."""
    machine_class: str | None = None
    """The machines file's class all replicas run on; None for the cost model's machine."""
    transfer_out_ms: float | None = None
    """The output's transfer on this stage's outgoing link (None in older plans, where it
    is the next stage's ``transfer_in_ms`` and does not bound the period on its own)."""
    measured: MeasuredMemory | None = None
    """The working set measured natively after export (None: not measured, or older plans;
    ``working_set_bytes`` above stays the cost model's prediction)."""
    kv_cache: list[str] = field(default_factory=list)
    """A decoder's KV pasts this stage keeps (their presents are its own outputs too)."""
    kv_cache_bytes: int = 0
    """Bytes of those caches for the plan's ``generation`` sizes (in ``working_set_bytes``)."""

    @property
    def node_count(self) -> int:
        return self.end - self.start

    @property
    def period_ms(self) -> float:
        """Time between two results of this stage: the busiest of a replica's CPU and links,
        over the replicas (NOTE_REPLICA_PERIOD in :mod:`smlaas.plan.replicas`)."""
        busiest = max(self.enclave_ms, self.transfer_in_ms, self.transfer_out_ms or 0.0)
        return busiest / self.replicas

    @property
    def working_set_mib(self) -> float:
        return self.working_set_bytes / MIB

    @property
    def file_name(self) -> str:
        return f"stage_{self.index}.onnx"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagePlan:
        data = dict(data)
        measured = data.pop("measured", None)
        return cls(**data, measured=MeasuredMemory.from_dict(measured)
                   if measured is not None else None)


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
    input_transfer_ms: float | None = None
    """The request's transfer out of the gateway, at the cost model's network rate; replicas
    of stage 0 do not share it (None in older plans, where stage 0's input link covers it)."""
    machine_classes: tuple[MachineClass, ...] = ()
    """The machines file's classes (empty: every stage is on the cost model's machine and
    ``machines`` bounds their number)."""
    generation: GenerationPlan | None = None
    """A decoder's generation sizes (None: not a decoder, or an older plan)."""

    # -- predictions ---------------------------------------------------------------------
    @property
    def latency_ms(self) -> float:
        """End to end: every stage's enclave time, every transfer including client links.
        Replicas do not change it."""
        return sum(s.enclave_ms + s.transfer_in_ms for s in self.stages) + \
            self.output_transfer_ms

    @property
    def period_ms(self) -> float:
        """Time between two results of the full pipeline: its slowest stage (over its
        replicas) or the gateway's links."""
        return max([s.period_ms for s in self.stages]
                   + [self.output_transfer_ms, self.input_transfer_ms or 0.0])

    @property
    def machine_count(self) -> int:
        """Enclaves the plan runs on: every replica of every stage."""
        return sum(s.replicas for s in self.stages)

    def usable_epc_bytes(self, stage: StagePlan) -> float:
        """The usable EPC of the machines ``stage`` runs on."""
        for machine_class in self.machine_classes:
            if machine_class.name == stage.machine_class:
                return machine_class.usable_epc_bytes
        return self.cost_model.usable_epc_bytes

    def fits_epc(self, stage: StagePlan) -> bool:
        """Whether the stage's *predicted* working set fits its machines' usable EPC."""
        return stage.working_set_bytes <= self.usable_epc_bytes(stage)

    def measured_fits_epc(self, stage: StagePlan) -> bool | None:
        """Whether the stage's *measured* working set fits (None: not measured)."""
        if stage.measured is None:
            return None
        return stage.measured.working_set_bytes <= self.usable_epc_bytes(stage)

    def measured_epc_problems(self) -> list[str]:
        """One line per stage whose measured working set exceeds its usable EPC."""
        return [f"stage {s.index}'s measured working set {s.measured.working_set_mib:.1f} MiB "
                f"exceeds the usable EPC {self.usable_epc_bytes(s) / MIB:g} MiB (predicted "
                f"{s.working_set_mib:.1f} MiB)"
                for s in self.stages if s.measured is not None
                and self.measured_fits_epc(s) is False]

    @property
    def layout_text(self) -> str:
        """Replicas (and class) per stage: ``1, 2, 4``, or ``1 large, 2 small``."""
        return ", ".join(f"{s.replicas}" + (f" {s.machine_class}" if s.machine_class else "")
                          for s in self.stages)

    @property
    def throughput_per_s(self) -> float:
        return 1000.0 / self.period_ms if self.period_ms > 0 else float("inf")

    @property
    def max_working_set_bytes(self) -> int:
        return max(s.working_set_bytes for s in self.stages)

    @property
    def all_fit_epc(self) -> bool:
        return all(self.fits_epc(s) for s in self.stages)

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
        for stage in self.stages:
            if isinstance(stage.replicas, bool) or not isinstance(stage.replicas, int) \
                    or stage.replicas < 1:
                problems.append(f"stage {stage.index} has {stage.replicas!r} replicas, "
                                f"expected an integer >= 1")
            elif self.generation is not None and stage.replicas > 1:
                problems.append(f"stage {stage.index} of a decoder has {stage.replicas} "
                                f"replicas; a stage keeps its sequences' caches, so it has one")
        problems.extend(self._machine_problems())
        if self.fit_epc:
            for stage in self.stages:
                if not self.fits_epc(stage):
                    problems.append(f"stage {stage.index} working set "
                                    f"{stage.working_set_mib:.1f} MiB exceeds the usable EPC "
                                    f"{self.usable_epc_bytes(stage) / MIB:g} MiB")
            problems.extend(self.measured_epc_problems())
        for stage in self.stages:
            if stage.measured is not None:
                problems.extend(f"stage {stage.index} measured: {p}"
                                for p in stage.measured.validate())
        problems.extend(f"cost model: {p}" for p in self.cost_model.validate())
        return problems

    def _machine_problems(self) -> list[str]:
        """Stages and replicas against the machine budget: ``machines``, or the classes."""
        if not self.machine_classes:
            problems = [f"stage {s.index} names machine class {s.machine_class!r} but the "
                        f"plan has no machine classes" for s in self.stages if s.machine_class]
            used = self.machine_count
            if self.machines is not None and used > self.machines:
                problems.append(f"{len(self.stages)} stages for {self.machines} machines"
                                if used == len(self.stages) else
                                f"{used} enclaves ({len(self.stages)} stages with their "
                                f"replicas) for {self.machines} machines")
            return problems
        problems = MachinePool(self.machine_classes).validate()
        names = {c.name for c in self.machine_classes}
        for stage in self.stages:
            if stage.machine_class not in names:
                problems.append(f"stage {stage.index} is on machine class "
                                f"{stage.machine_class!r}, not one of {sorted(names)}")
        for machine_class in self.machine_classes:
            used = sum(s.replicas for s in self.stages if s.machine_class == machine_class.name)
            if used > machine_class.count:
                problems.append(f"{used} enclaves on machine class {machine_class.name!r}, "
                                f"which has {machine_class.count}")
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
            "machine_count": self.machine_count,
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
                # a plan written before R and L were split: its R held both
                cost_model=CostModel(**{"libos_overhead_mib": 0.0, **data.pop("cost_model")}),
                stages=tuple(StagePlan.from_dict(s) for s in data.pop("stages")),
                machine_classes=tuple(MachineClass(**c)
                                      for c in data.pop("machine_classes", None) or ()),
                generation=GenerationPlan.from_dict(generation)
                if (generation := data.pop("generation", None)) is not None else None,
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

    def with_measured_memory(self, measured: Sequence[MeasuredMemory | None]) -> Plan:
        """The plan with each stage's natively measured working set."""
        if len(measured) != len(self.stages):
            raise PlanError(f"{len(self.stages)} stages but {len(measured)} memory "
                            f"measurements")
        stages = tuple(replace(s, measured=m) for s, m in zip(self.stages, measured))
        return replace(self, stages=stages)

    # -- text ----------------------------------------------------------------------------
    def to_table(self) -> str:
        cm = self.cost_model
        label = "predicted" if cm.enclave else "predicted, no enclave"
        classes = bool(self.machine_classes)
        machines = (f"machines {MachinePool(self.machine_classes).describe()}" if classes
                    else f"usable EPC {cm.usable_epc_mib:g} MiB")
        measured = any(s.measured is not None for s in self.stages)
        lines = [
            f"plan for {self.model.name} by {self.planner} ({cm.preset} cost model, "
            f"{machines})",
            f"{'stage':>5} {'nodes':>11} {'native ms':>10} {'enclave ms':>10} "
            f"{'in MiB':>7} {'xfer ms':>8} {'weights MiB':>11} {'ws MiB':>8} "
            + (f"{'measured':>8} " if measured else "") + f" fits {'replicas':>8}"
            + ("  class" if classes else ""),
        ]
        for s in self.stages:
            fits = self.fits_epc(s) and self.measured_fits_epc(s) is not False
            lines.append(
                f"{s.index:>5} {f'{s.start}-{s.end - 1}':>11} {s.native_ms:>10.2f} "
                f"{s.enclave_ms:>10.2f} {s.input_bytes / MIB:>7.2f} {s.transfer_in_ms:>8.2f} "
                f"{s.weight_bytes / MIB:>11.1f} {s.working_set_mib:>8.1f} "
                + ((f"{s.measured.working_set_mib:>8.1f} " if s.measured is not None
                    else f"{'-':>8} ") if measured else "")
                + f" {'yes' if fits else 'NO ':<4} {s.replicas:>8}"
                + (f"  {s.machine_class}" if classes else "")
            )
        lines.append(
            f"{label}: latency {self.latency_ms:.2f} ms, throughput "
            f"{self.throughput_per_s:.2f}/s (period {self.period_ms:.2f} ms), "
            f"{len(self.stages)} stage(s) on {self.machine_count} machine(s), largest working "
            f"set {self.max_working_set_bytes / MIB:.1f} MiB"
        )
        return "\n".join(lines)


def build_plan(cuts: Sequence[int], *, costs: SegmentCosts, graph: ModelGraph,
               model: ModelRef, planner: str, machines: int | None, fit_epc: bool,
               replicas: Sequence[int] | None = None,
               stage_classes: Sequence[str | None] | None = None,
               pool: MachinePool | None = None) -> Plan:
    """The Plan for stage boundaries ``cuts`` with figures read from ``costs``.

    ``replicas`` and ``stage_classes`` (names of ``pool``'s classes) give each stage's
    replicas and machine class; a stage on a class is priced for that class
    (NOTE_MACHINE_CLASS in :mod:`smlaas.plan.machines`).
    """
    memory = costs.memory
    base = costs.cost_model
    stage_count = len(cuts) - 1
    replicas = list(replicas) if replicas is not None else [1] * stage_count
    names = list(stage_classes) if stage_classes is not None else [None] * stage_count
    if len(replicas) != stage_count or len(names) != stage_count:
        raise PlanError(f"{stage_count} stages but {len(replicas)} replica counts and "
                        f"{len(names)} machine classes")
    stages = []
    for index, (start, end) in enumerate(zip(cuts, cuts[1:])):
        inputs, outputs = graph.cut_tensors(start), graph.cut_tensors(end)
        name = names[index]
        if name is None:
            enclave = float(costs.enclave_ms[start, end])
            transfer_in, transfer_out = float(costs.transfer_ms[start]), float(
                costs.transfer_ms[end])
        else:
            if pool is None:
                raise PlanError(f"stage {index} is on machine class {name!r} but no machines "
                                f"file was given")
            try:
                machine_class = pool.get(name)
            except KeyError:
                raise PlanError(f"stage {index} is on machine class {name!r}, which the "
                                f"machines file does not have") from None
            enclave = float(machine_class.enclave_time_ms(
                base, costs.native_ms[start, end], costs.working_set_bytes[start, end]))
            transfer_in = float(machine_class.transfer_ms(base, memory.cut_bytes[start]))
            transfer_out = float(machine_class.transfer_ms(base, memory.cut_bytes[end]))
        stages.append(StagePlan(
            index=index, start=start, end=end,
            first_node=graph.nodes[start].name, last_node=graph.nodes[end - 1].name,
            inputs=inputs, outputs=outputs,
            input_bytes=int(memory.cut_bytes[start]), output_bytes=int(memory.cut_bytes[end]),
            native_ms=float(costs.native_ms[start, end]),
            enclave_ms=enclave,
            transfer_in_ms=transfer_in,
            weight_bytes=int(memory.weight_bytes[start, end]),
            touched_weight_bytes=int(memory.touched_weight_bytes[start, end]),
            peak_activation_bytes=int(memory.peak_activation_bytes[start, end]),
            working_set_bytes=int(costs.working_set_bytes[start, end]),
            replicas=int(replicas[index]), machine_class=name, transfer_out_ms=transfer_out,
            kv_cache=[pair.past for pair in graph.stage_kv_pairs(start, end)],
            kv_cache_bytes=int(memory.kv_cache_bytes[start, end])
            if memory.kv_cache_bytes is not None else 0,
        ))
    plan = Plan(model=model, planner=planner, cost_model=base,
                stages=tuple(stages), machines=machines, fit_epc=fit_epc,
                output_transfer_ms=costs.output_transfer_ms,
                input_transfer_ms=float(costs.transfer_ms[0]),
                machine_classes=pool.classes if pool is not None else ())
    plan.check()
    return plan
