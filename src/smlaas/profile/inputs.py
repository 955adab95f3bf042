"""Seeded random inputs for a model, valid for the operators that consume them."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from smlaas.graph.input_size import model_inputs

DEFAULT_SEED = 0


def random_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *,
                  seed: int = DEFAULT_SEED, samples: Mapping[str, np.ndarray] | None = None
                  ) -> dict[str, np.ndarray]:
    """Standard-normal floats; integers that are valid indices for every Gather they feed
    (0/1 otherwise, which every index-like use accepts); booleans at random. Inputs in
    ``samples`` (given by the user, see :mod:`smlaas.profile.samples`) take those values."""
    rng = np.random.default_rng(seed)
    bounds = _gather_bounds(model)
    feeds: dict[str, np.ndarray] = {}
    for value in model_inputs(model):
        shape = tuple(shapes[value.name])
        if samples and value.name in samples:
            feeds[value.name] = samples[value.name]
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        if dtype == np.dtype(object):  # string tensors: short ASCII words
            words = np.empty(shape, dtype=object)
            words.reshape(-1)[:] = [f"w{n}" for n in rng.integers(0, 1000, size=words.size)]
            feeds[value.name] = words
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            high = bounds.get(value.name, 2)
            feeds[value.name] = rng.integers(0, high, size=shape).astype(dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _gather_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For inputs used directly as Gather indices into an initializer: the table's length."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    bounds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in dims:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = dims[node.input[0]]
        if table:
            length = table[axis]
            bounds[node.input[1]] = min(bounds.get(node.input[1], length), length)
    return bounds
