"""Axes that stay symbolic through preparation, so that stages serve any batch (pure).

Exporters keep the batch axis dynamic with ``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape`` (or ``Expand``) chains. Preparing a model with every input size fixed folds those
chains into constants, and the stages then only run at the batch given to ``--input-size``.
So a model is prepared twice (see note below):

* the *symbolic* model, with the dynamic axes left symbolic: folding cannot bake them in,
  because a Shape of a tensor with a symbolic axis is not static. Its nodes are what gets
  profiled, planned and cut, and its inferred types say which axes of each tensor are
  symbolic (a dim_param, or unknown) - those stay symbolic on the stages' inputs and outputs;
* the *concrete* model, the symbolic one prepared again with every input size fixed. It
  gives the static shapes that memory and transfer estimates need. Preparing it from the
  symbolic model keeps node names; nodes it folds further are initializers whose dims are
  the tensors' shapes.

By default the dynamic axes are axis 0 of every input the model declares symbolic there (the
batch); ``--dynamic-axis NAME:AXIS`` adds others, such as a sequence axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from smlaas.errors import InputSizeError
from smlaas.graph.input_size import input_dims, model_inputs
from smlaas.graph.prepare import prepare_model

BATCH_DIM = "batch"
"""The dim_param given to the batch axis (axis 0) of every input: one name, because the
gateway batches all inputs together."""

SymbolicAxes = dict[str, dict[int, str]]
"""Input name -> {axis: dim_param}."""


def parse_dynamic_axes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parses ``["input_ids:1", "attention_mask:1"]`` (``--dynamic-axis NAME:AXIS``)."""
    axes: dict[str, list[int]] = {}
    for spec in specs:
        name, _, axis_text = spec.rpartition(":")
        if not name or not axis_text.strip().isdigit():
            raise InputSizeError(f"bad --dynamic-axis {spec!r}: expected NAME:AXIS, such as "
                                 f"input_ids:1")
        axes.setdefault(name, []).append(int(axis_text))
    return {name: tuple(sorted(set(values))) for name, values in axes.items()}


def symbolic_axes(model: onnx.ModelProto,
                  requested: Mapping[str, Sequence[int]] | None = None) -> SymbolicAxes:
    """The axes to keep symbolic: axis 0 of each input declared symbolic there, and the
    ``requested`` ones (each must be symbolic in the model).

    Raises:
        InputSizeError: a requested input or axis that the model does not have, or fixes.
    """
    inputs = {value.name: value for value in model_inputs(model)}
    axes: SymbolicAxes = {}
    for name, value in inputs.items():
        dims = input_dims(value)
        if dims and isinstance(dims[0], str):
            axes[name] = {0: BATCH_DIM}
    for name, wanted in (requested or {}).items():
        if name not in inputs:
            raise InputSizeError(f"--dynamic-axis names {name!r}, but the model's inputs are "
                                 f"{', '.join(inputs)}")
        dims = input_dims(inputs[name])
        for axis in wanted:
            if not 0 <= axis < len(dims):
                raise InputSizeError(f"--dynamic-axis {name}:{axis}: input {name!r} has rank "
                                     f"{len(dims)}")
            if not isinstance(dims[axis], str):
                raise InputSizeError(f"--dynamic-axis {name}:{axis}: input {name!r} has fixed "
                                     f"size {dims[axis]} on axis {axis}; only an axis the "
                                     f"model declares symbolic can stay symbolic")
            declared = dims[axis]
            param = BATCH_DIM if axis == 0 else (
                declared if isinstance(declared, str) and declared != "?"
                else f"{name}_axis{axis}")
            axes.setdefault(name, {})[axis] = param
    return axes


def prepare_symbolic(model: onnx.ModelProto, input_sizes: Mapping[str, tuple[int, ...]],
                     axes: SymbolicAxes) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The symbolic and the concrete preparation of ``model`` (see the module docstring):
    ``(symbolic, concrete)``. Give the symbolic one and ``concrete=`` the other to
    :class:`smlaas.graph.analysis.ModelGraph`."""
    symbolic = prepare_model(model, input_sizes, symbolic_axes=axes)
    concrete = prepare_model(symbolic, input_sizes)
    return symbolic, concrete
