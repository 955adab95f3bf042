"""Parsing ``--input-size`` and fixing a model's input dimensions with it (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from smlaas.errors import InputSizeError
from smlaas.graph.dims import fixed_dim

InputSizes = dict[str, tuple[int, ...]]
UNNAMED = ""


def parse_input_sizes(specs: Sequence[str]) -> InputSizes:
    """Parses ``["1,3,224,224"]`` or ``["ids:1,128", "mask:1,128"]``.

    An unnamed size is stored under the key ``""`` and applied by :func:`resolve_input_sizes`.
    """
    sizes: InputSizes = {}
    for spec in specs:
        name, _, dims_text = spec.rpartition(":")
        try:
            dims = tuple(int(d) for d in dims_text.replace("x", ",").split(","))
        except ValueError:
            raise InputSizeError(
                f"bad --input-size {spec!r}: expected comma-separated integers such as "
                f"1,3,224,224, optionally prefixed by an input name (name:1,3,224,224)"
            ) from None
        if any(d <= 0 for d in dims):
            raise InputSizeError(f"bad --input-size {spec!r}: every dimension must be > 0")
        if name in sizes:
            raise InputSizeError(f"--input-size given twice for {name or 'the model input'}")
        sizes[name] = dims
    if UNNAMED in sizes and len(sizes) > 1:
        raise InputSizeError("give either one unnamed --input-size or one per input name")
    return sizes


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are real inputs (not initializers listed as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def input_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Dimensions of a tensor input: ints where fixed, names (or "?") where symbolic (a
    negative ``dim_value``, PaddlePaddle's dynamic axis, is symbolic: see graph.dims)."""
    if not value.type.HasField("tensor_type"):
        raise InputSizeError(f"input {value.name!r} is not a tensor; only tensor inputs are "
                             f"supported")
    dims: list[int | str] = []
    for d in value.type.tensor_type.shape.dim:
        size = fixed_dim(d)
        dims.append(d.dim_param or "?" if size is None else size)
    return dims


def resolve_input_sizes(model: onnx.ModelProto, sizes: Mapping[str, tuple[int, ...]]
                        ) -> InputSizes:
    """The concrete shape of every model input, checked against the model.

    Raises:
        InputSizeError: a name that is not an input, a rank or fixed dimension that disagrees
            with the model, or a symbolic dimension left unfixed.
    """
    inputs = model_inputs(model)
    names = [i.name for i in inputs]
    requested = dict(sizes)
    if UNNAMED in requested:
        dims = requested.pop(UNNAMED)
        ranks = {len(input_dims(i)) for i in inputs}
        if len(inputs) > 1 and len(ranks) > 1:
            raise InputSizeError(
                f"the model has {len(inputs)} inputs of different ranks ({', '.join(names)}); "
                f"give one --input-size per input as NAME:d1,d2,..."
            )
        requested = {name: dims for name in names}
    unknown = sorted(set(requested) - set(names))
    if unknown:
        raise InputSizeError(f"--input-size names {', '.join(unknown)}, but the model's inputs "
                             f"are {', '.join(names)}")
    resolved: InputSizes = {}
    for value in inputs:
        declared = input_dims(value)
        wanted = requested.get(value.name)
        if wanted is None:
            if all(isinstance(d, int) for d in declared):
                resolved[value.name] = tuple(int(d) for d in declared)
                continue
            raise InputSizeError(
                f"input {value.name!r} has symbolic dimensions "
                f"[{', '.join(map(str, declared))}]; fix them with --input-size "
                f"{value.name}:" + ",".join("1" if isinstance(d, str) else str(d)
                                             for d in declared)
            )
        if len(wanted) != len(declared):
            raise InputSizeError(
                f"input {value.name!r} has rank {len(declared)} "
                f"[{', '.join(map(str, declared))}], but --input-size gives rank {len(wanted)} "
                f"({','.join(map(str, wanted))})"
            )
        for axis, (have, want) in enumerate(zip(declared, wanted)):
            if isinstance(have, int) and have != 0 and have != want:
                raise InputSizeError(
                    f"input {value.name!r} has fixed size {have} on axis {axis}, but "
                    f"--input-size asks for {want}"
                )
        resolved[value.name] = tuple(wanted)
    return resolved


def fix_input_sizes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *,
                    symbolic_axes: Mapping[str, Mapping[int, str]] | None = None
                    ) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have the concrete ``shapes`` (see resolve_input_sizes),
    except on ``symbolic_axes`` (input name -> {axis: dim_param}), which get that dim_param."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in model_inputs(fixed):
        shape = shapes[value.name]
        symbolic = (symbolic_axes or {}).get(value.name, {})
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(shape):
            if axis in symbolic:
                dims.add().dim_param = symbolic[axis]
            else:
                dims.add().dim_value = size
    return fixed
