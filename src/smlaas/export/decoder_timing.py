"""A decoder's generation plan, with the whole model's native time for its two kinds of step:
the decode step it was planned for, and the prefill of a prompt."""

from __future__ import annotations

import statistics
from collections.abc import Mapping

import onnx

from smlaas.graph.analysis import ModelGraph
from smlaas.plan.generation import (
    PREFILL_FRACTION,
    GenerationPlan,
    GenerationSizes,
    decoder_input_sizes,
)
from smlaas.profile import ProfileSettings, random_inputs, run_times_ms
from smlaas.profile.session import create_session


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
