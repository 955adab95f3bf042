"""ONNX Runtime sessions with a fixed thread count and optimisation level."""

from __future__ import annotations

import enum
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from smlaas.errors import ProfileError

# Protobuf cannot serialise a message over 2 GiB; larger models go through a file with
# external data.
_PROTOBUF_LIMIT_BYTES = 2**31 - 2**24
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class Optimization(enum.Enum):
    """ONNX Runtime graph optimisation levels smlaas uses."""

    NONE = "none"  # reference execution: every node as written (verification)
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"  # serving and stage measurement

    def ort_level(self) -> ort.GraphOptimizationLevel:
        return {
            Optimization.NONE: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            Optimization.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            Optimization.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            Optimization.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self]


def session_options(*, threads: int, optimization: Optimization,
                    profile_prefix: str | None = None,
                    optimized_model_path: str | None = None,
                    serving: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = optimization.ort_level()
    options.log_severity_level = 3
    # ORT's intra-op threads spin after each run by default. smlaas always has several
    # sessions on the same cores (profiling next to timing, one per pipeline stage), and a
    # spinning idle session doubled the time of a ResNet-18 run next to it on 2 cores
    # (49 ms vs 25 ms); without spinning a lone session is ~5% slower. Consistency wins.
    #
    # Serving sessions instead spin inside a run and stop when it ends
    # (``session.force_spinning_stop``): a pipeline stage runs after its threads slept while
    # the other stages ran, and without spinning ResNet-50 took 85 ms instead of 63 ms when
    # each run followed a 20 ms pause (2 threads, same machine), with no idle spinning left.
    if serving:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    return options


def create_session(model: onnx.ModelProto | str | Path, *, threads: int,
                   optimization: Optimization = Optimization.ALL,
                   profile_prefix: str | None = None,
                   optimized_model_path: str | None = None,
                   serving: bool = False) -> ort.InferenceSession:
    """An InferenceSession on the CPU for a model proto or a model file.

    Raises:
        ProfileError: ONNX Runtime refused the model (the message names what it refused).
    """
    options = session_options(threads=threads, optimization=optimization,
                              profile_prefix=profile_prefix,
                              optimized_model_path=optimized_model_path, serving=serving)
    model = widen_bfloat16_outputs(model)
    try:
        if isinstance(model, onnx.ModelProto):
            if model.ByteSize() < _PROTOBUF_LIMIT_BYTES:
                return ort.InferenceSession(model.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
            with tempfile.TemporaryDirectory(prefix="smlaas-session-") as tmp:
                path = Path(tmp) / "model.onnx"
                onnx.save(model, str(path), save_as_external_data=True,
                          location="model.onnx.data")
                return ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own untyped exceptions (Fail, InvalidGraph, ...)
        message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ProfileError(f"ONNX Runtime cannot load the model: {message}") from err


BFLOAT16_OUTPUTS_KEY = "smlaas.bfloat16_outputs"


def widen_bfloat16_outputs(model: onnx.ModelProto | str | Path) -> onnx.ModelProto | str | Path:
    """The model with each bfloat16 graph output cast to float32 (exact: every bfloat16 value
    is a float32), the outputs so widened listed in its metadata; :func:`run_session` casts
    them back. ONNX Runtime's numpy bridge has no bfloat16, so this is the one way to read such
    outputs while passing string inputs."""
    if not isinstance(model, onnx.ModelProto):
        header = onnx.load(str(model), load_external_data=False)
        if not _bfloat16_outputs(header):
            return model
        model = onnx.load(str(model))
    names = _bfloat16_outputs(model)
    if not names:
        return model
    widened = onnx.ModelProto()
    widened.CopyFrom(model)
    graph = widened.graph
    for output in graph.output:
        if output.name not in names:
            continue
        inner = f"{output.name}__smlaas_bfloat16"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name],
                                                to=onnx.TensorProto.FLOAT,
                                                name=f"{output.name}__smlaas_widen"))
        output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    entry = widened.metadata_props.add()
    entry.key, entry.value = BFLOAT16_OUTPUTS_KEY, ",".join(names)
    return widened


def _bfloat16_outputs(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output
            if o.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16]


def run_session(session: ort.InferenceSession, feeds: Mapping[str, Any],
                outputs: list[str] | None = None) -> list[Any]:
    """Runs ``session``; ProfileError with ORT's message if the run fails.

    Beyond what ``session.run`` takes: string tensors may hold bytes (UTF-8, as the V2
    protocol carries them; they come back as ONNX Runtime gives them, str); bfloat16 tensors
    (``ml_dtypes``) go in as OrtValues and come out of the float32 outputs
    :func:`widen_bfloat16_outputs` made."""
    names = outputs if outputs is not None else [o.name for o in session.get_outputs()]
    prepared = {name: _ort_input(name, value) for name, value in feeds.items()}
    try:
        results = list(session.run(names, prepared))
    except Exception as err:  # ORT's exceptions are not a typed hierarchy
        message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ProfileError(f"ONNX Runtime failed to run the model: {message}") from err
    narrowed = set(filter(None, session.get_modelmeta().custom_metadata_map.get(
        BFLOAT16_OUTPUTS_KEY, "").split(",")))
    return [np.asarray(r).astype(BFLOAT16) if name in narrowed else r
            for name, r in zip(names, results)]


def _ort_input(name: str, value: Any) -> Any:
    array = np.asarray(value)
    if array.dtype == BFLOAT16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), onnx.TensorProto.BFLOAT16)
    if array.dtype == object:
        try:
            return np.vectorize(_as_text, otypes=[object])(array) if array.size else array
        except UnicodeDecodeError as err:
            raise ProfileError(f"string input {name!r} is not UTF-8: {err}") from err
    return value


def _as_text(item: Any) -> str:
    return item.decode() if isinstance(item, (bytes, bytearray)) else str(item)

