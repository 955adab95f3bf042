"""How close the chain must come to the whole model: tolerances by element type (pure).

Note on float16 (and bfloat16): ONNX Runtime's CPU provider has no float16 kernel for many
ops; it casts their inputs to float32, and removes the Cast pairs between neighbouring such
ops, so that inside one session float16 intermediates (and even a float32 input cast to
float16) stay float32 and are rounded only where a float16 tensor leaves the session: at a
cut. The whole model and a correct chain therefore differ by the rounding at each cut,
amplified by the layers after it: errors of a few float16 ulps, which float32 tolerances
(rtol 1e-4) call a mismatch. So each output is held to the tolerance of the least precise
float type among itself and every cut tensor it depends on:

- float32/float64 (and non-float) outputs on float32 cuts: the caller's rtol/atol
  (default rtol 1e-4, atol 1e-5);
- float16 or bfloat16: rtol = 10 eps and atol = 1 eps x max|expected| of that output, with
  eps the type's machine epsilon (float16 9.77e-4, bfloat16 7.81e-3): ten ulps per element,
  and one ulp of the output's largest value for elements near zero. A wrong partition
  (a changed weight, a swapped tensor) moves outputs by far more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from smlaas.graph.subgraphs import node_input_names

ULPS_PER_ELEMENT = 10.0
"""rtol of a low-precision output, in machine epsilons of its type."""
ULPS_OF_LARGEST = 1.0
"""atol of a low-precision output, in epsilons times its largest expected magnitude."""
_LOW_PRECISION: dict[int, type] = {int(onnx.TensorProto.FLOAT16): np.float16,
                                   int(onnx.TensorProto.BFLOAT16): ml_dtypes.bfloat16}


@dataclass(frozen=True)
class Tolerance:
    """``|got - expected| <= atol + rtol * |expected|`` per element, where atol is scaled by
    max|expected| of the output when ``scaled_atol``."""

    rtol: float
    atol: float
    scaled_atol: bool = False
    precision: str = "float32"
    """The element type that sets the tolerance (the output's or a cut tensor's)."""

    def absolute_atol(self, expected: np.ndarray) -> float:
        if not self.scaled_atol:
            return self.atol
        peak = float(np.max(np.abs(expected), initial=0.0)) if expected.size else 0.0
        return self.atol * peak if np.isfinite(peak) and peak > 0 else self.atol

    def describe(self) -> str:
        atol = f"atol {self.atol:.3g}" + (" x max|expected|" if self.scaled_atol else "")
        return f"{self.precision}: rtol {self.rtol:.3g}, {atol}"


def tolerance_for(elem_type: int, *, rtol: float, atol: float) -> Tolerance:
    """The tolerance for values of ONNX element type ``elem_type`` (see the module note)."""
    low = _LOW_PRECISION.get(elem_type)
    if low is None:
        return Tolerance(rtol, atol)
    eps = float(ml_dtypes.finfo(low).eps)
    name = helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type != \
        onnx.TensorProto.BFLOAT16 else "bfloat16"
    return Tolerance(max(rtol, ULPS_PER_ELEMENT * eps), ULPS_OF_LARGEST * eps,
                     scaled_atol=True, precision=name)


def output_tolerances(stage_models: Sequence[onnx.ModelProto], *, rtol: float, atol: float
                      ) -> dict[str, Tolerance]:
    """For each output of the chain, the tolerance of the least precise float type among the
    output itself and every cut tensor (a later stage's input) it depends on."""
    # The least precise type each tensor has passed through at a cut (0: none so far).
    seen: dict[str, int] = {}
    for index, model in enumerate(stage_models):
        graph = model.graph
        if index > 0:
            for value in graph.input:
                crossed = value.type.tensor_type.elem_type
                seen[value.name] = _coarser(seen.get(value.name, 0), crossed)
        for node in graph.node:
            carried = _coarsest(seen.get(name, 0) for name in node_input_names(node))
            for name in node.output:
                if name:
                    seen[name] = carried
    final = stage_models[-1].graph.output if stage_models else []
    return {value.name: _loosest(
        tolerance_for(value.type.tensor_type.elem_type, rtol=rtol, atol=atol),
        tolerance_for(seen.get(value.name, 0), rtol=rtol, atol=atol)) for value in final}


def _coarser(a: int, b: int) -> int:
    def rank(t: int) -> float:
        low = _LOW_PRECISION.get(t)
        return float(ml_dtypes.finfo(low).eps) if low is not None else 0.0
    return a if rank(a) >= rank(b) else b


def _coarsest(types: Iterable[int]) -> int:
    result = 0
    for t in types:
        result = _coarser(result, t)
    return result


def _loosest(a: Tolerance, b: Tolerance) -> Tolerance:
    return b if b.scaled_atol and (not a.scaled_atol or b.rtol > a.rtol) else a


def describe_tolerances(tolerances: Mapping[str, Tolerance]) -> str:
    """``float32: rtol 0.0001, atol 1e-05 (y); float16: ... (probs)``: each tolerance once."""
    groups: dict[str, list[str]] = {}
    for name, tolerance in tolerances.items():
        groups.setdefault(tolerance.describe(), []).append(name)
    return "; ".join(f"{text} ({', '.join(names)})" for text, names in groups.items())
