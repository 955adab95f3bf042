"""Measuring tensors whose shape static shape inference could not determine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from smlaas.errors import ModelError, ProfileError
from smlaas.graph.analysis import TensorInfo
from smlaas.graph.dims import loosen_for_control_flow
from smlaas.profile.inputs import random_inputs
from smlaas.profile.profiler import RUN_FAILURE_HINT
from smlaas.profile.session import Optimization, create_session, run_session


def observe_tensors(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],
                    names: Sequence[str], *, threads: int,
                    feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, TensorInfo]:
    """Runs the model once on ``feeds`` (default: seeded inputs) with ``names`` exposed as
    outputs and returns their element types and shapes (data-dependent shapes, e.g. of
    NonZero, are those of these inputs).

    Raises:
        ModelError: the model cannot run with those input shapes.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(loosen_for_control_flow(model))
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            # An empty value info lets ONNX Runtime take type and shape from the graph.
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    try:
        session = create_session(probe, threads=threads, optimization=Optimization.BASIC)
        results = run_session(session, feeds if feeds is not None else
                              random_inputs(model, input_shapes), list(names))
    except ProfileError as err:
        raise ModelError(f"the model does not run with input shapes {dict(input_shapes)}: "
                         f"{err}{RUN_FAILURE_HINT}") from err
    observed = {}
    for name, value in zip(names, results):
        array = np.asarray(value)
        observed[name] = TensorInfo(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                    tuple(array.shape))
    return observed
