"""Finding a decoder's KV cache: which graph input's past becomes which output's present (pure).

Exporters name the cache in a few ways; each past input is paired with the present output of
the same layer and kind:

=====================================  ======================================
past input                             present output
=====================================  ======================================
``past_key_values.{i}.key|value``      ``present.{i}.key|value``
``past.{i}.key|value``                 ``present.{i}.key|value``
``past_key.{i}`` / ``past_value.{i}``  ``present_key.{i}`` / ``present_value.{i}``
``past_{i}`` (key and value stacked)   ``present_{i}``
=====================================  ======================================

A present is its past with this call's tokens appended, so the sequence axis is the one axis
whose dimension differs between the two (``past_sequence`` against ``total_sequence``, say).
The batch axis is the one named like ``input_ids``' first axis.

>>> from smlaas.zoo.gpt2 import GPT2Config
>>> from smlaas.zoo.gpt2_kv import build_gpt2_kv
>>> pairs = find_kv_pairs(build_gpt2_kv("tiny", GPT2Config(layers=1, d_model=8, heads=2)))
>>> [(p.past, p.present, p.sequence_axis, p.bytes_per_token()) for p in pairs]
[('past_key_values.0.key', 'present.0.key', 2, 32), ('past_key_values.0.value', \
'present.0.value', 2, 32)]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

from smlaas.errors import UnsupportedModelError
from smlaas.graph.dims import fixed_dim

Dim = int | str
"""A fixed size, or the name of a symbolic axis ("?" when it has none)."""

_PAST_NAMES = (
    re.compile(r"past_key_values\.(?P<layer>\d+)\.(?P<kind>key|value)"),
    re.compile(r"past\.(?P<layer>\d+)\.(?P<kind>key|value)"),
    re.compile(r"past_(?P<kind>key|value)\.(?P<layer>\d+)"),
    re.compile(r"past_(?P<layer>\d+)"),
)
_PRESENT_NAMES = (
    re.compile(r"present\.(?P<layer>\d+)\.(?P<kind>key|value)"),
    re.compile(r"present_(?P<kind>key|value)\.(?P<layer>\d+)"),
    re.compile(r"present_(?P<layer>\d+)"),
)



TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""What a decoder of the supported layout takes besides its cache."""

@dataclass(frozen=True)
class TensorSignature:
    """A graph input's or output's name, dimensions and ONNX element type."""

    name: str
    shape: tuple[Dim, ...]
    elem_type: int


@dataclass(frozen=True)
class KvPair:
    """One cache tensor: the past a decoder reads and the present it returns for next time."""

    past: str
    present: str
    layer: int
    kind: str
    """"key", "value", or "" for a past that stacks both (``past_{i}``)."""
    sequence_axis: int
    batch_axis: int
    shape: tuple[Dim, ...]
    """The past's dimensions."""
    elem_type: int
    """The ONNX element type (``onnx.TensorProto.FLOAT``, ...)."""

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence adds to this tensor: the product of its dimensions
        other than batch and sequence, times the element size.

        Raises:
            UnsupportedModelError: one of those dimensions is symbolic.
        """
        sizes = [d for axis, d in enumerate(self.shape)
                 if axis not in (self.batch_axis, self.sequence_axis)]
        if not all(isinstance(d, int) for d in sizes):
            raise UnsupportedModelError(
                f"KV cache input {self.past} has symbolic dimensions {_fmt(self.shape)} beyond "
                f"batch and sequence; fix them (--input-size) to size its cache")
        return math.prod(int(d) for d in sizes) * element_size(self.elem_type)


def element_size(elem_type: int) -> int:
    """Bytes per element of ONNX element type ``elem_type``."""
    return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)


def is_decoder(model: onnx.ModelProto) -> bool:
    """Whether ``model`` reads a KV cache (a graph input named like a past)."""
    return any(_match(_PAST_NAMES, value.name) for value in _inputs(model))


def find_kv_pairs(model: onnx.ModelProto) -> list[KvPair]:
    """The KV cache pairs of ``model``, sorted by (layer, kind); [] when it reads no cache.

    Raises:
        UnsupportedModelError: a past without its present, or whose sequence axis cannot be
            told from the shapes.
    """
    inputs = [_signature(value) for value in _inputs(model)]
    outputs = [_signature(value) for value in model.graph.output]
    return kv_pairs_of(inputs, outputs)


def cache_names(input_names: Iterable[str], output_names: Iterable[str]) -> dict[str, str]:
    """Past input name -> present output name, paired by name alone (for a stage, whose
    shapes the caller already trusts).

    Raises:
        UnsupportedModelError: a past without exactly one present.
    """
    presents: dict[tuple[int, str], list[str]] = {}
    for name in output_names:
        key = _match(_PRESENT_NAMES, name)
        if key is not None:
            presents.setdefault(key, []).append(name)
    names = {}
    for name in input_names:
        key = _match(_PAST_NAMES, name)
        if key is not None:
            names[name] = _only_present(name, key, presents.get(key, []))
    return names


def kv_pairs_of(inputs: Sequence[TensorSignature], outputs: Sequence[TensorSignature]
                ) -> list[KvPair]:
    """:func:`find_kv_pairs` on a signature (e.g. an ONNX Runtime session's, which has no
    ModelProto)."""
    outputs_by_name = {output.name: output for output in outputs}
    presents = cache_names([i.name for i in inputs], outputs_by_name)
    batch_name = next((i.shape[0] for i in inputs if i.name == "input_ids" and i.shape
                       and isinstance(i.shape[0], str) and i.shape[0] != "?"), None)
    pairs = [_pair(past, outputs_by_name[presents[past.name]], key, batch_name)
             for past in inputs if (key := _match(_PAST_NAMES, past.name)) is not None]
    return sorted(pairs, key=lambda p: (p.layer, p.kind))


def _only_present(past: str, key: tuple[int, str], candidates: list[str]) -> str:
    if len(candidates) != 1:
        found = ", ".join(candidates) if candidates else "none"
        raise UnsupportedModelError(
            f"KV cache input {past} needs exactly one present output of layer {key[0]} "
            f"{key[1] or '(stacked)'}, e.g. {_expected_present(*key)}; found {found}")
    return candidates[0]


def _pair(past: TensorSignature, present: TensorSignature, key: tuple[int, str],
          batch_name: str | None) -> KvPair:
    if len(past.shape) != len(present.shape):
        raise UnsupportedModelError(
            f"KV cache input {past.name} has rank {len(past.shape)} but its present "
            f"{present.name} has rank {len(present.shape)}")
    # Two unnamed dimensions ("?") count as equal: one definite difference is enough.
    differing = [axis for axis, (a, b) in enumerate(zip(past.shape, present.shape, strict=True))
                 if a != b]
    if batch_name is None and past.shape and isinstance(past.shape[0], str):
        batch_name = past.shape[0]  # a stage without input_ids: the batch is axis 0
    if len(differing) == 2 and batch_name is not None:
        # The batch named two ways (a prepared model names its inputs' batch axis; an
        # output whose shape inference cannot reach, behind a contrib op such as
        # GroupQueryAttention, keeps the exporter's name) is one axis, not a difference.
        differing = [axis for axis in differing
                     if not (past.shape[axis] == batch_name
                             and isinstance(present.shape[axis], str))]
    if len(differing) != 1:
        raise UnsupportedModelError(
            f"cannot tell the sequence axis of KV cache input {past.name}: its shape "
            f"{_fmt(past.shape)} and its present {present.name}'s {_fmt(present.shape)} must "
            f"differ in exactly one named or fixed dimension")
    sequence_axis = differing[0]
    batch_axis = past.shape.index(batch_name) if batch_name in past.shape else 0
    if batch_axis == sequence_axis:
        raise UnsupportedModelError(
            f"KV cache input {past.name} {_fmt(past.shape)}: its batch and sequence axes "
            f"are both axis {batch_axis}")
    return KvPair(past=past.name, present=present.name, layer=key[0], kind=key[1],
                  sequence_axis=sequence_axis, batch_axis=batch_axis, shape=past.shape,
                  elem_type=past.elem_type)


def _match(patterns: Sequence[re.Pattern[str]], name: str) -> tuple[int, str] | None:
    for pattern in patterns:
        found = pattern.fullmatch(name)
        if found is not None:
            return int(found["layer"]), found.groupdict().get("kind") or ""
    return None


def _expected_present(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}" if kind else f"present_{layer}"


def _inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _signature(value: onnx.ValueInfoProto) -> TensorSignature:
    tensor = value.type.tensor_type
    dims: list[Dim] = []
    for dim in tensor.shape.dim:
        size = fixed_dim(dim)
        dims.append(size if size is not None else dim.dim_param or "?")
    return TensorSignature(value.name, tuple(dims), tensor.elem_type)


def _fmt(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
