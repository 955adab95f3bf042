"""One stage's ONNX Runtime session with its declared inputs and outputs checked on each run,
and the copy of a stage that runs at any batch size."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from smlaas.errors import ProfileError
from smlaas.profile.session import Optimization, create_session, run_session

BATCH_DIM = "batch"


class StageRunner:
    """One stage's ONNX Runtime session with its declared inputs and outputs."""

    def __init__(self, model: onnx.ModelProto | str | Path, *, threads: int,
                 optimization: Optimization = Optimization.ALL, label: str = "stage",
                 serving: bool = False) -> None:
        self.label = label
        self.session: ort.InferenceSession = create_session(
            model, threads=threads, optimization=optimization, serving=serving)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs on the named ``tensors`` (extra names are ignored), checking each declared
        input is present with the declared shape."""
        feeds = {}
        for name, meta in self.inputs.items():
            if name not in tensors:
                raise ProfileError(f"{self.label} needs input {name!r}, which the previous "
                                   f"stage did not produce")
            value = tensors[name]
            expected = [d if isinstance(d, int) and d >= 0 else None for d in meta.shape]
            if len(value.shape) != len(expected) or any(
                    e is not None and e != v for e, v in zip(expected, value.shape)):
                raise ProfileError(f"{self.label} input {name!r} has shape {value.shape}, "
                                   f"expected {meta.shape}")
            feeds[name] = value
        results = run_session(self.session, feeds, self.output_names)
        return dict(zip(self.output_names, (np.asarray(r) for r in results)))


def relax_batch_dim(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs and outputs have a symbolic first dimension and whose
    intermediate shapes are left to inference. At the original shapes it computes the same."""
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    for value in [*relaxed.graph.input, *relaxed.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    del relaxed.graph.value_info[:]
    return relaxed
