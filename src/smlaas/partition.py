"""The partition job: model -> analyse -> profile -> costs -> plan -> export -> verify.

This module is the only one that knows the whole sequence; each step lives in its layer.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from smlaas import zoo
from smlaas.errors import (
    ConfigError,
    InfeasiblePlanError,
    PlanError,
    VerificationError,
)
from smlaas.export import (
    BuildWriter,
    Chain,
    StageExtractor,
    VerificationReport,
    prediction_errors,
    read_plan,
    render_markdown,
    render_plot,
    stage_paths,
    verify_chain,
)
from smlaas.export.build_dir import PLAN_FILE, TOKENIZER_FILE
from smlaas.export.decoder_timing import decoder_generation_plan, with_prefill
from smlaas.export.stage_memory import apply_stage_memory, measure_stage_memory
from smlaas.export.stage_timing import measure_stages, stage_inputs
from smlaas.graph import (
    SPLIT_NOTE,
    InputSizes,
    ModelGraph,
    SegmentMemory,
    SplitBudget,
    SplitOperator,
    UnknownShapesError,
    prepare_model,
    segment_memory,
    split_oversize_operators,
)
from smlaas.graph.dynamic_axes import parse_dynamic_axes, prepare_symbolic, symbolic_axes
from smlaas.graph.kv_cache import find_kv_pairs
from smlaas.model_source import ModelSource, open_model, reopen_model
from smlaas.plan import (
    MACHINE_FILE_PLANNERS,
    CostModel,
    MachinePool,
    ModelRef,
    Plan,
    Planner,
    SegmentCosts,
    build_plan,
    check_feasible,
    choose_layout,
    segment_costs,
)
from smlaas.plan.generation import (
    GenerationSizes,
    decoder_axes,
)
from smlaas.profile import (
    NodeProfile,
    ProfileCache,
    ProfileSettings,
    ProgressCallback,
    machine_id,
    model_digest,
    observe_tensors,
    profile_key,
    profile_nodes,
    random_inputs,
)
from smlaas.profile.samples import (
    SAMPLES_FILE,
    load_sample_file,
    parse_input_values,
    sample_feeds,
    samples_digest,
    save_sample_file,
)

logger = logging.getLogger(__name__)


def default_threads() -> int:
    return os.cpu_count() or 1


# -- analysis --------------------------------------------------------------------------------
@dataclass
class Analysis:
    source: ModelSource
    input_shapes: InputSizes
    prepared: onnx.ModelProto
    graph: ModelGraph
    memory: SegmentMemory
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    """Inputs the user gave values for (used instead of random ones wherever it runs)."""
    splits: tuple[SplitOperator, ...] = ()
    """Operators rewritten into pieces before planning (``graph`` holds the pieces)."""
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    """Input axes kept symbolic in the prepared model and the stages."""

    def feeds(self, *, seed: int = 0) -> dict[str, np.ndarray]:
        return random_inputs(self.prepared, self.input_shapes, seed=seed, samples=self.samples)

    def model_ref(self) -> ModelRef:
        return ModelRef(name=self.source.name, source=self.source.source,
                        sha256=self.source.sha256,
                        input_shapes={k: list(v) for k, v in self.input_shapes.items()},
                        inputs=list(self.graph.input_names),
                        outputs=[name for name in self.graph.output_names
                                 if name not in self.graph.stage_local],
                        node_count=self.graph.node_count,
                        dynamic_axes={k: list(v) for k, v in self.dynamic_axes.items()})


def analyse(source: ModelSource, input_shapes: InputSizes, *, threads: int,
            samples: Mapping[str, np.ndarray] | None = None,
            dynamic_axes: Mapping[str, Sequence[int]] | None = None,
            split: SplitBudget | None = None) -> Analysis:
    """Prepares and analyses the model; shapes static inference misses are measured (on the
    ``samples`` the user gave, random values for the other inputs). With ``split``,
    operators whose weights exceed it are split into pieces first.

    The batch axis (axis 0 of inputs the model declares symbolic there) and the
    ``dynamic_axes`` (input name -> axes, ``--dynamic-axis``) stay symbolic in the prepared
    model and so in the stages (see :mod:`smlaas.graph.dynamic_axes`)."""
    axes = symbolic_axes(source.model, dynamic_axes)
    concrete = None
    if axes:
        prepared, concrete = prepare_symbolic(source.model, input_shapes, axes)
    else:
        prepared = prepare_model(source.model, input_shapes)
    given = dict(samples or {})
    try:
        graph = ModelGraph(prepared, concrete=concrete)
    except UnknownShapesError as err:
        logger.info("measuring %d tensor shape(s) that shape inference left open",
                    len(err.names))
        observed = observe_tensors(prepared, input_shapes, err.names, threads=threads,
                                   feeds=random_inputs(prepared, input_shapes, samples=given))
        graph = ModelGraph(prepared, observed, concrete=concrete)
    splits: tuple[SplitOperator, ...] = ()
    if split is not None:
        graph, splits = split_oversize_operators(graph, split)
        for record in splits:
            logger.info("split %s", record.describe())
    return Analysis(source, input_shapes, graph.model, graph, segment_memory(graph),
                    samples=given, splits=splits,
                    dynamic_axes={name: sorted(by_axis) for name, by_axis in axes.items()})


def split_budget(cost_model: CostModel, pool: MachinePool | None = None) -> SplitBudget:
    """What one node may hold in an enclave of ``cost_model`` (of the largest class of
    ``pool``, if given), for :func:`smlaas.graph.split_oversize_operators`."""
    epc_bytes = max(c.usable_epc_bytes for c in pool.classes) if pool is not None \
        else cost_model.usable_epc_bytes
    return SplitBudget.for_enclave(usable_epc_bytes=epc_bytes,
                                   runtime_overhead_bytes=cost_model.overhead_bytes,
                                   weight_factor=cost_model.weight_factor)


def measure_nodes(analysis: Analysis, settings: ProfileSettings, *,
                  cache: ProfileCache | None = None,
                  progress: ProgressCallback | None = None) -> NodeProfile:
    """The node profile of the prepared model, from the cache when it has one."""
    key = profile_key(model_digest(analysis.prepared) + (
        f"|samples {samples_digest(analysis.samples)}" if analysis.samples else ""),
        analysis.input_shapes, settings)
    if cache is not None:
        cached = cache.get(key)
        if cached is not None:
            logger.info("node profile taken from the cache (%s)", key)
            return cached
    profile = profile_nodes(analysis.prepared, analysis.input_shapes, settings=settings,
                            progress=progress, feeds=analysis.feeds())
    if cache is not None:
        cache.put(key, profile)
    return profile


def cost_table(analysis: Analysis, profile: NodeProfile, cost_model: CostModel
               ) -> SegmentCosts:
    return graph_cost_table(analysis.graph, analysis.memory, profile, cost_model)


def graph_cost_table(graph: ModelGraph, memory: SegmentMemory, profile: NodeProfile,
                     cost_model: CostModel) -> SegmentCosts:
    """Every segment's predicted cost from the graph's memory tables and a node profile."""
    names = [n.name for n in graph.nodes]
    return segment_costs(memory, profile.node_times_ms(names), cost_model,
                         fusion_factor=profile.fusion_factor,
                         run_overhead_ms=profile.session_overhead_ms,
                         valid_cut=graph.valid_cut_positions(), node_names=tuple(names))


# -- planning --------------------------------------------------------------------------------
def read_machines_file(path: str | Path, *, cost_model: CostModel) -> MachinePool:
    """The machine classes of a ``--machines-file`` (TOML ``[[class]]`` tables: ``name``,
    ``count``, and optionally ``usable_epc_mib`` and ``network_mib_per_s``, which default to
    ``cost_model``'s, and ``speed``, which defaults to 1.0).

    Raises:
        ConfigError: the file is missing, not TOML, or describes no usable classes.
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"machines file {file} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"machines file {file} is not valid TOML: {err}") from err
    return MachinePool.from_dict(data, defaults=cost_model, source=f"machines file {file}")


@dataclass(frozen=True)
class PlanOptions:
    planner: Planner = Planner.DP_LATENCY
    machines: int | None = None
    fit_epc: bool = False
    pool: MachinePool | None = None
    """Machine classes from ``--machines-file`` (instead of ``machines``)."""
    split_oversize: bool | None = None
    """Split operators too large for an enclave before planning; None: with ``fit_epc``."""

    @property
    def splits_oversize(self) -> bool:
        return self.fit_epc if self.split_oversize is None else self.split_oversize


def make_plan(analysis: Analysis, costs: SegmentCosts, options: PlanOptions) -> Plan:
    layout = choose_layout(options.planner, costs, machines=options.machines,
                           pool=options.pool, fit_epc=options.fit_epc)
    machines = options.pool.total_count if options.pool is not None else options.machines
    plan = build_plan(layout.cuts, costs=costs, graph=analysis.graph, model=analysis.model_ref(),
                      planner=options.planner.value, machines=machines,
                      fit_epc=options.fit_epc, replicas=layout.replicas,
                      stage_classes=layout.classes, pool=options.pool)
    if not analysis.splits:
        return plan
    return replace(plan, notes={**plan.notes,
                                SPLIT_NOTE: [s.to_dict() for s in analysis.splits]})


def compare_planners(analysis: Analysis, costs: SegmentCosts, *, machines: int | None,
                     fit_epc: bool, pool: MachinePool | None = None) -> list[dict]:
    """Every planner on the same costs: one row each (an ``error`` for infeasible ones).

    The ``single`` baseline is always the whole model in one enclave, paging included, so
    that the cost of not partitioning is visible. With a machines file, the planners that
    do not assign machine classes run on the cost model's machine, at most as many stages as
    the file has machines (``on_machine_classes`` is false in their rows).
    """
    rows: list[dict[str, Any]] = []
    for planner in Planner:
        start = time.perf_counter()
        baseline = planner is Planner.SINGLE
        on_classes = pool is not None and planner in MACHINE_FILE_PLANNERS
        budget = pool.total_count if pool is not None and not on_classes else machines
        try:
            plan = make_plan(analysis, costs, PlanOptions(
                planner, None if baseline or on_classes else budget,
                False if baseline else fit_epc, pool if on_classes else None))
        except PlanError as err:
            rows.append({"planner": planner.value, "error": str(err)})
            continue
        rows.append({
            "planner": planner.value,
            "stages": len(plan.stages),
            "machine_count": plan.machine_count,
            "replicas": [s.replicas for s in plan.stages],
            "machine_classes": [s.machine_class for s in plan.stages] if on_classes else None,
            "on_machine_classes": on_classes,
            "layout": plan.layout_text,
            "latency_ms": plan.latency_ms,
            "throughput_per_s": plan.throughput_per_s,
            "period_ms": plan.period_ms,
            "max_working_set_mib": plan.max_working_set_bytes / 2**20,
            "all_fit_epc": plan.all_fit_epc,
            "cuts": plan.cuts,
            "planning_ms": (time.perf_counter() - start) * 1000.0,
        })
    return rows


# -- the whole job ---------------------------------------------------------------------------
@dataclass
class PartitionResult:
    plan: Plan
    build_dir: Path
    verification: VerificationReport | None
    comparison: list[dict]
    planning_ms: float
    timings_s: dict[str, float] = field(default_factory=dict)
    splits: tuple[SplitOperator, ...] = ()
    """Operators split into pieces before planning (also in ``plan.notes``)."""

    @property
    def median_prediction_error(self) -> float | None:
        errors = prediction_errors(self.plan)
        return statistics.median(errors) if errors else None


def partition(spec: str, build_dir: Path, *, input_size_specs: Sequence[str] = (),
              cost_model: CostModel, options: PlanOptions, settings: ProfileSettings,
              cache: ProfileCache | None = None, verify: bool = True,
              progress: ProgressCallback | None = None,
              sample_arrays: Mapping[str, np.ndarray] | None = None,
              input_values: Sequence[str] = (),
              dynamic_axes: Sequence[str] = (),
              measure_memory: bool = True,
              generation: GenerationSizes | None = None) -> PartitionResult:
    """Runs the partition job and writes the build directory (all of it, or nothing).

    ``sample_arrays`` (``--sample-inputs``) and ``input_values`` (``--input-value``) are
    used instead of random values wherever the model runs; the build keeps them.
    ``dynamic_axes`` (``--dynamic-axis NAME:AXIS``) stay symbolic in the stages, as the
    batch axis does. With ``measure_memory``, each exported stage's working set is measured
    natively (:mod:`smlaas.runtime.working_set`) into ``stages[k].measured``; with
    ``options.fit_epc``, a stage measured above its usable EPC refuses the plan. A decoder
    (KV cache inputs) is planned for its decode step at ``generation``'s sizes (defaults
    when None), with each layer's cache kept in the stage holding the layer.

    Raises:
        InfeasiblePlanError: ``--fit-epc`` cannot be met, by the prediction or (with
            ``measure_memory``) by a stage's measured working set.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    steps = ["analysed graph", "profiled nodes", "planned", "exported stages",
             "measured stages"] + (["measured working sets"] if measure_memory else []) \
        + (["verified chain"] if verify else [])

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now
        if progress:
            progress("partition", steps.index(name) + 1, len(steps))

    writer = BuildWriter(build_dir)  # fail on an unusable build dir before any work
    with writer:
        source, shapes = open_model(spec, input_size_specs, sample_shapes={
            k: tuple(v.shape) for k, v in (sample_arrays or {}).items()},
            generation=generation)
        decoder = bool(find_kv_pairs(source.model))
        if decoder and options.planner is Planner.DP_REPLICAS:
            raise ConfigError("a decoder's stages keep their sequences' caches and are not "
                              "replicated: use dp-latency or dp-throughput")
        samples = sample_feeds(source.model, shapes, arrays=sample_arrays,
                               values=parse_input_values(input_values))
        axes = parse_dynamic_axes(dynamic_axes)
        if decoder:
            axes = {**decoder_axes(source.model), **axes}
        analysis = analyse(source, shapes, threads=settings.threads, samples=samples,
                           dynamic_axes=axes,
                           split=split_budget(cost_model, options.pool)
                           if options.splits_oversize else None)
        if decoder:  # a stage must hold a prompt's prefill too, not only the decode step
            analysis = replace(analysis, memory=with_prefill(
                analysis.memory, analysis.graph, source.model, generation or GenerationSizes(),
                {name: tuple(axes) for name, axes in analysis.dynamic_axes.items()},
                threads=settings.threads))
        # Memory alone decides --fit-epc feasibility: say so before minutes of profiling.
        check_feasible(segment_costs(analysis.memory, np.zeros(analysis.graph.node_count),
                                     cost_model,
                                     node_names=tuple(n.name for n in analysis.graph.nodes)),
                       machines=options.machines, fit_epc=options.fit_epc,
                       pool=options.pool)
        phase("analysed graph")
        profile = measure_nodes(analysis, settings, cache=cache, progress=progress)
        phase("profiled nodes")
        plan_start = time.perf_counter()
        costs = cost_table(analysis, profile, cost_model)
        plan = make_plan(analysis, costs, options)
        planning_ms = (time.perf_counter() - plan_start) * 1000.0
        if decoder:
            plan = replace(plan, generation=decoder_generation_plan(
                source.model, analysis.graph, analysis.input_shapes,
                generation or GenerationSizes(), settings))
            plan.check()
        comparison = compare_planners(analysis, costs, machines=options.machines,
                                      fit_epc=options.fit_epc, pool=options.pool)
        phase("planned")
        extractor = StageExtractor(analysis.prepared, analysis.graph)
        stage_models = [extractor.extract(s.start, s.end, name=f"{source.name}_stage_{s.index}")
                        for s in plan.stages]
        for stage, model in zip(plan.stages, stage_models):
            writer.save_model(model, stage.file_name)
            if progress:
                progress("exporting stages", stage.index + 1, len(plan.stages))
        phase("exported stages")
        chain = Chain(stage_models, threads=settings.threads,
                      optimization=settings.optimization)
        inputs = stage_inputs(chain, analysis.feeds())
        plan = plan.with_measured(measure_stages(chain, inputs, settings, progress))
        del chain
        phase("measured stages")
        if measure_memory:
            plan = apply_stage_memory(plan, measure_stage_memory(
                [writer.directory / s.file_name for s in plan.stages], inputs,
                threads=settings.threads, progress=progress))
            phase("measured working sets")
            refusal = measured_refusal(plan) if options.fit_epc else None
            if refusal is not None:
                raise InfeasiblePlanError(refusal)
        verification = None
        if verify:
            verification = verify_chain(source.model, stage_models, shapes,
                                        threads=settings.threads, samples=samples)
            phase("verified chain")
        if samples:
            save_sample_file(writer.directory / SAMPLES_FILE, samples)
        if decoder and source.source.startswith(zoo.ZOO_PREFIX):
            entry = zoo.get(source.name)
            if entry.tokenizer_json is not None:  # `smlaas seal` seals it with the model
                writer.write_text(TOKENIZER_FILE, entry.tokenizer_json())
        writer.write_text(PLAN_FILE, plan.to_json())
        writer.write_text("report.md", render_markdown(plan, verification=verification,
                                                       comparison=comparison,
                                                       machine=machine_id()))
        render_plot(plan, profile.node_times_ms([n.name for n in analysis.graph.nodes]),
                    analysis.graph.live_bytes_by_step(), writer.directory / "report.png")
        if verification is not None and not verification.ok:
            # The build stays on disk for inspection; the caller reports the mismatch.
            logger.warning("verification failed: %s", verification.summary())
    return PartitionResult(plan=plan, build_dir=Path(build_dir), verification=verification,
                           comparison=comparison, planning_ms=planning_ms, timings_s=timings,
                           splits=analysis.splits)


def measured_refusal(plan: Plan) -> str | None:
    """The one-line refusal of a ``--fit-epc`` plan with a stage *measured* above its usable
    EPC (None if every measured stage fits)."""
    problems = plan.measured_epc_problems()
    if not problems:
        return None
    where = "its class's usable_epc_mib in the machines file" if plan.machine_classes \
        else "usable_epc_mib in a --cost-model file"
    return (f"--fit-epc: {problems[0]}"
            + (f" ({len(problems) - 1} more stage(s) too)" if len(problems) > 1 else "")
            + f"; the cost model under-predicts it, so this stage would page: drop --fit-epc "
              f"to accept paging, or plan for less room (a lower {where})")


def verify_build(build_dir: Path, *, threads: int, seeds: Sequence[int] = (0, 1, 2),
                 rtol: float = 1e-4, atol: float = 1e-5,
                 check: bool = True) -> VerificationReport:
    """Re-runs the whole model and the build's chain; VerificationError if they differ
    (unless not ``check``: then the report says so)."""
    plan = read_plan(build_dir)
    paths = stage_paths(build_dir, plan)
    whole = reopen_model(plan.model)
    shapes = {k: tuple(v) for k, v in plan.model.input_shapes.items()}
    samples_path = Path(build_dir) / SAMPLES_FILE
    samples = load_sample_file(samples_path) if samples_path.is_file() else None
    report = verify_chain(whole, paths, shapes, threads=threads, seeds=seeds, rtol=rtol,
                          atol=atol, samples=samples)
    if check and not report.ok:
        raise VerificationError(report.summary())
    return report


def measured_plan(spec: str, *, machines: int, settings: ProfileSettings,
                  cost_model: CostModel, input_size_specs: Sequence[str] = (),
                  input_values: Sequence[str] = (), cache: ProfileCache | None = None,
                  progress: ProgressCallback | None = None) -> Plan:
    """``spec`` cut by ``dp-throughput`` for at most ``machines`` stages (no ``--fit-epc``),
    with every stage's working set measured natively; the build is written to a temporary
    directory and removed (for ``smlaas calibrate`` and ``smlaas bench working-set``).

    Raises:
        SmlaasError: as :func:`partition`.
    """
    with tempfile.TemporaryDirectory(prefix="smlaas-measured-") as tmp:
        result = partition(spec, Path(tmp) / "build", input_size_specs=input_size_specs,
                           cost_model=cost_model,
                           options=PlanOptions(Planner.DP_THROUGHPUT, machines, False),
                           settings=settings, cache=cache, verify=False, progress=progress,
                           input_values=input_values, measure_memory=True)
    return result.plan
