"""A decoder's two kinds of step, the decode step it is planned for and the prefill of a
prompt: the memory of the larger one in every stage, and the whole model's native time for
each in its generation plan."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from smlaas.errors import GraphError, ModelError, UnknownShapesError
from smlaas.graph.analysis import ModelGraph, TensorInfo
from smlaas.graph.dynamic_axes import prepare_symbolic, symbolic_axes
from smlaas.graph.memory import SegmentMemory, larger_of, segment_memory
from smlaas.plan.generation import (
    PREFILL_FRACTION,
    GenerationPlan,
    GenerationSizes,
    decoder_input_sizes,
)
from smlaas.profile import ProfileSettings, random_inputs, run_times_ms
from smlaas.profile.session import create_session
from smlaas.profile.shapes import observe_tensors

logger = logging.getLogger(__name__)


OBSERVED_PER_RUN = 8
"""Tensors measured per prefill run: each one measured is an output of the run and stays
allocated to its end, so a long prompt's [heads, T, T] attention scores are held a few at a
time, as the model itself holds them, not all at once."""


def with_prefill(memory: SegmentMemory, graph: ModelGraph, model: onnx.ModelProto,
                 sizes: GenerationSizes, axes: Mapping[str, Sequence[int]], *,
                 threads: int = 1) -> SegmentMemory:
    """``memory`` (the decode step's) with each segment's activations the larger of the
    decode step's and those of the longest prompt's prefill (max_context - 1 tokens of one
    sequence); as it was, with a warning, if the prefill cannot be analysed alike. Shapes
    that shape inference cannot follow (real exporters' reshapes) are measured by running
    the prefill (``threads`` intra-op threads), a few tensors at a time."""
    tokens = sizes.max_context - 1
    shapes = decoder_input_sizes(model, GenerationSizes(tokens, 1), tokens=tokens)
    try:
        symbolic, concrete = prepare_symbolic(model, shapes, symbolic_axes(model, axes))
        try:
            prefill = ModelGraph(symbolic, concrete=concrete)
        except UnknownShapesError as err:  # measured, as the decode step's are
            prefill = ModelGraph(symbolic, _measured(symbolic, shapes, err.names,
                                                     threads=threads), concrete=concrete)
        return larger_of(memory, graph, segment_memory(prefill), prefill)
    except (GraphError, ModelError, ValueError) as err:
        logger.warning("the prefill's memory is not counted: %s", err)
        return memory


def _measured(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]],
              names: Sequence[str], *, threads: int) -> dict[str, TensorInfo]:
    """The shapes of ``names`` in a prefill of one sequence: the attention mask all ones and
    the positions 0, 1, 2, ... (a prompt, not random values), OBSERVED_PER_RUN at a time."""
    feeds = random_inputs(model, shapes)
    for name, value in feeds.items():
        if name == "attention_mask":
            feeds[name] = np.ones_like(value)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(value.shape[-1]),
                                          value.shape).astype(value.dtype)
    observed: dict[str, TensorInfo] = {}
    for start in range(0, len(names), OBSERVED_PER_RUN):
        observed |= observe_tensors(model, shapes, names[start:start + OBSERVED_PER_RUN],
                                    threads=threads, feeds=feeds)
    return observed


def decoder_generation_plan(model: onnx.ModelProto, graph: ModelGraph,
                            decode_shapes: Mapping[str, tuple[int, ...]],
                            sizes: GenerationSizes, settings: ProfileSettings
                            ) -> GenerationPlan:
    """The decoder's generation sizes, with the whole model's native time for the decode
    step (at ``decode_shapes``, what the plan was made for) and for a prefill of
    max_context / PREFILL_FRACTION tokens."""
    session = create_session(model, threads=settings.threads)
    tokens = sizes.max_context // PREFILL_FRACTION
    prefill = decoder_input_sizes(model, GenerationSizes(tokens, 1), tokens=tokens)
    timings = {}
    for label, shapes in (("decode", decode_shapes), ("prefill", prefill)):
        feeds = random_inputs(model, shapes, seed=0)
        timings[label] = statistics.median(run_times_ms(
            session, feeds, warmup_runs=1, measured_runs=max(3, settings.measured_runs // 3)))
    return GenerationPlan(max_context=sizes.max_context, max_sequences=sizes.max_sequences,
                          cache_bytes_per_token=sum(pair.bytes_per_token()
                                                    for pair in graph.kv_pairs),
                          decode_step_ms=round(timings["decode"], 3),
                          prefill_ms=round(timings["prefill"], 3))
