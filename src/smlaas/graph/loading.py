"""Reading ONNX files: the only I/O in the graph package, kept to this thin module."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from smlaas.errors import ModelError


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Loads an ONNX model with its external data.

    Raises:
        ModelError: the file is missing, is not an ONNX model, is truncated, or its external
            data cannot be found.
    """
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"model file {file} does not exist (give a path or a zoo name)")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as err:
        raise ModelError(f"{file} is not a valid ONNX model (protobuf parse failed: {err})") \
            from err
    if not model.graph.node:
        raise ModelError(f"{file} is not an ONNX model: it holds no graph nodes "
                         f"(truncated, or another kind of file)")
    try:
        onnx.load_external_data_for_model(model, str(file.parent))
    except (OSError, ValueError) as err:
        raise ModelError(f"{file}: external weight data could not be read ({err}); keep the "
                         f"data files next to the model") from err
    return model


ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})
"""Operators ONNX Runtime registers in ONNX's own domain although ONNX does not define them
(ORT's ``onnx_ops`` contrib schemas); ONNX Runtime GenAI's model builder writes them."""


def check_model(model: onnx.ModelProto, *, source: str) -> None:
    """Runs onnx's checker; ModelError naming ``source`` if the model is malformed. Nodes of
    :data:`ORT_DEFAULT_DOMAIN_OPS` are checked as the custom operators they are (onnx's
    checker would refuse them as unknown ONNX operators; ONNX Runtime runs them)."""
    if any(node.op_type in ORT_DEFAULT_DOMAIN_OPS and not node.domain
           for node in model.graph.node):
        model = _ort_ops_as_custom(model)
    try:
        onnx.checker.check_model(model, full_check=False)
    except (onnx.checker.ValidationError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ModelError(f"{source} is not a valid ONNX model: {first_line}") from err


def _ort_ops_as_custom(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which ONNX Runtime's default-domain operators are in a custom domain of
    their own."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type in ORT_DEFAULT_DOMAIN_OPS and not node.domain:
            node.domain = _ORT_ONLY_DOMAIN
    if not any(opset.domain == _ORT_ONLY_DOMAIN for opset in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(_ORT_ONLY_DOMAIN, 1))
    return copy


_ORT_ONLY_DOMAIN = "smlaas.onnxruntime_only"
