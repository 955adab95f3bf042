"""An ONNX backend (``onnx.backend.base``) that runs every model as a chain of stages.

``prepare`` keeps the model; ``run`` knows the input shapes, so it prepares the graph for them
exactly as ``smlaas partition`` does (Constant folding, node naming, topological order, shape
inference and shape-computation folding, observation of shapes inference leaves open), cuts
it, extracts the stages with :class:`~smlaas.export.extract.StageExtractor` and runs them as a
:class:`~smlaas.export.chain.Chain`. Cut modes:

- ``every``: a cut at every valid position, so every node is a stage of its own (the hardest
  case for cut tensors, pass-throughs and outer-scope reads);
- ``middle``: one cut at the valid position nearest the middle (two stages);
- ``planner``: the cuts ``smlaas partition`` would choose (the model profiled with ONNX Runtime,
  ``dp-throughput`` for 2 machines under the ``sgx1`` cost model): slower, one profile per test.

A model with a single node cannot be cut; it runs as one stage, and :attr:`ChainRep.stages`
says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from smlaas.errors import InputSizeError, ModelError, ProfileError, UnknownShapesError
from smlaas.export.chain import Chain
from smlaas.export.extract import StageExtractor
from smlaas.graph.analysis import ModelGraph
from smlaas.graph.input_size import model_inputs
from smlaas.graph.memory import segment_memory
from smlaas.graph.prepare import prepare_model
from smlaas.partition import graph_cost_table
from smlaas.plan import Planner, preset
from smlaas.plan.planners import choose_cuts
from smlaas.profile import ProfileSettings
from smlaas.profile.profiler import profile_nodes
from smlaas.profile.shapes import observe_tensors

CUT_MODES = ("every", "middle", "planner")
RANDOM_INPUT_LIMIT = ("the profiler runs the model on seeded random inputs, which this model "
                      "cannot run on")


class ChainRep(BackendRep):
    def __init__(self, model: onnx.ModelProto, cut_mode: str) -> None:
        self.model = model
        self.cut_mode = cut_mode
        self.stages = 0

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        names = [i.name for i in model_inputs(self.model)]
        values = list(inputs.values()) if isinstance(inputs, dict) else list(
            inputs if isinstance(inputs, list | tuple) else [inputs])
        if any(isinstance(v, list | tuple | dict) or v is None for v in values):
            raise InputSizeError("sequence, map and optional inputs are not supported by "
                                 "smlaas (tensors only)")
        feeds = dict(zip(names, (np.asarray(v) for v in values)))
        shapes = {name: tuple(value.shape) for name, value in feeds.items()}
        prepared = prepare_model(self.model, shapes)
        try:
            graph = ModelGraph(prepared)
        except UnknownShapesError as err:
            graph = ModelGraph(prepared, observe_tensors(prepared, shapes, err.names,
                                                         threads=1, feeds=feeds))
        cuts = planner_cuts(prepared, graph, shapes) if self.cut_mode == "planner" else \
            cut_positions(graph, self.cut_mode)
        bounds = [0, *cuts, graph.node_count]
        extractor = StageExtractor(prepared, graph)
        stages = [extractor.extract(start, end, name=f"stage_{k}")
                  for k, (start, end) in enumerate(zip(bounds, bounds[1:]))]
        self.stages = len(stages)
        outputs = Chain(stages, threads=1).run(feeds)
        return tuple(outputs[name] for name in graph.output_names)


def cut_positions(graph: ModelGraph, mode: str) -> list[int]:
    valid = [int(p) for p in np.flatnonzero(graph.valid_cut_positions())
             if 0 < p < graph.node_count]
    if mode == "every" or not valid:
        return valid
    middle = graph.node_count / 2
    return [min(valid, key=lambda p: abs(p - middle))]


def planner_cuts(prepared: onnx.ModelProto, graph: ModelGraph,
                 shapes: dict[str, tuple[int, ...]]) -> list[int]:
    """The cuts the partition job's planner chooses for this model (2 machines, sgx1)."""
    if graph.node_count < 2:
        return []
    settings = ProfileSettings(threads=1, warmup_runs=1, measured_runs=1)
    try:
        profile = profile_nodes(prepared, shapes, settings=settings)
    except (ProfileError, ModelError) as err:
        raise ProfileError(f"{RANDOM_INPUT_LIMIT}: {err}") from err
    costs = graph_cost_table(graph, segment_memory(graph), profile, preset("sgx1"))
    return choose_cuts(Planner.DP_THROUGHPUT, costs, machines=2)[1:-1]


def chain_backend(cut_mode: str = "every") -> type[Backend]:
    """A Backend class whose models run as chains cut in ``cut_mode``."""
    if cut_mode not in CUT_MODES:
        raise ValueError(f"cut mode must be one of {CUT_MODES}, got {cut_mode!r}")

    class ChainBackend(Backend):
        @classmethod
        def prepare(cls, model: onnx.ModelProto, device: str = "CPU",
                    **kwargs: Any) -> ChainRep:
            super().prepare(model, device, **kwargs)
            return ChainRep(model, cut_mode)

        @classmethod
        def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU",
                      **kwargs: Any) -> tuple[Any, ...]:
            return cls.prepare(model, device, **kwargs).run(inputs)

        @classmethod
        def supports_device(cls, device: str) -> bool:
            return device == "CPU"

    ChainBackend.__name__ = f"ChainBackend_{cut_mode}"
    return ChainBackend
