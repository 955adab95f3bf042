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

Note on the model's own noise: ten ulps is not always enough. A cut rounds a tensor that one
session keeps in float32, and the layers after it can amplify that rounding: a GELU output
with a common offset of 30 feeding a LayerNorm turns one float16 rounding (steps of 2**-6)
into an output error 4.5 times the atol (tests/unit/test_fp16_tolerance.py). The whole model
moves as much when only its execution changes (the zoo BERT, made float16 by ONNX Runtime's
transformer optimiser, moves by 2 ulps of its largest pooled value between optimisation
levels, beyond the ulp tolerance), so for low-precision outputs verification measures that
movement (:class:`ModelNoise`): the whole model's largest deviation from its reference
execution under full optimisations, another thread count, and with every intermediate
stored in its own type (rounded as a float16 kernel would store it: the model cut at every
node). Such an output's atol is then ``max(1 eps x max|expected|, NOISE_FACTOR x spread)``;
rtol stays ten ulps. float32/float64 outputs on float32 cuts are never measured: their
tolerance is exactly the caller's.

NOISE_FACTOR is 4 = 2 x 2: the spread is the largest of a few samples (a handful of settings
and seeds) of an error of the same kind as the chain's own (rounding moved to a cut, kernels
chosen differently at a stage's edge), so another draw may exceed it, and the chain's cut
rounding comes on top of that. Measured: at 159 cuts of that BERT (12 layers, sequence 32)
the chain's error is at most 1.5 x the spread, in the LayerNorm test model 1.0 x. A fault
moves outputs by a sizeable fraction of their scale (a weight scaled by 1.5: tens of
percent), while 4 x spread stays under 2% of the largest value in both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from smlaas.graph.kv_cache import cache_names
from smlaas.graph.subgraphs import node_input_names

ULPS_PER_ELEMENT = 10.0
"""rtol of a low-precision output, in machine epsilons of its type."""
ULPS_OF_LARGEST = 1.0
"""atol of a low-precision output, in epsilons times its largest expected magnitude."""
NOISE_FACTOR = 4.0
"""A low-precision output's atol is at least this many times the whole model's own spread
(see the module note for why 4)."""
_LOW_PRECISION: dict[int, type] = {int(onnx.TensorProto.FLOAT16): np.float16,
                                   int(onnx.TensorProto.BFLOAT16): ml_dtypes.bfloat16}


@dataclass(frozen=True)
class ModelNoise:
    """How far the whole model's output moves from its reference execution when only the
    execution changes (see the module note)."""

    spread: float
    """max |output - reference output| over the settings, seeds and elements."""
    peak: float
    """max |reference output| over the seeds."""
    sources: tuple[str, ...]
    """What was varied, in words: ``("optimisation levels", "thread counts", ...)``."""

    @property
    def relative_spread(self) -> float:
        """The spread as a fraction of the output's largest value (0 for an all-zero one)."""
        return self.spread / self.peak if self.peak > 0 else 0.0

    @property
    def derived_atol(self) -> float:
        """NOISE_FACTOR x spread: the least atol an output with this noise is held to."""
        return NOISE_FACTOR * self.spread

    def describe_sources(self) -> str:
        names = list(self.sources) or ["nothing"]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"

    def to_dict(self) -> dict[str, Any]:
        return {"spread": self.spread, "relative_spread": self.relative_spread,
                "peak": self.peak, "factor": NOISE_FACTOR, "derived_atol": self.derived_atol,
                "sources": list(self.sources)}


@dataclass(frozen=True)
class Tolerance:
    """``|got - expected| <= atol + rtol * |expected|`` per element, where atol is scaled by
    max|expected| of the output when ``scaled_atol``, and raised to NOISE_FACTOR x the whole
    model's spread when ``noise`` was measured."""

    rtol: float
    atol: float
    scaled_atol: bool = False
    precision: str = "float32"
    """The element type that sets the tolerance (the output's or a cut tensor's)."""
    noise: ModelNoise | None = None
    """The whole model's own noise on this output, measured for low-precision outputs only."""

    @property
    def low_precision(self) -> bool:
        """Held to ulps of float16/bfloat16 (and so to the model's own noise)."""
        return self.scaled_atol

    def absolute_atol(self, expected: np.ndarray) -> float:
        atol = self.atol
        if self.scaled_atol:
            peak = float(np.max(np.abs(expected), initial=0.0)) if expected.size else 0.0
            atol = self.atol * peak if np.isfinite(peak) and peak > 0 else self.atol
        return max(atol, self.noise.derived_atol) if self.noise is not None else atol

    def with_noise(self, noise: ModelNoise) -> Tolerance:
        return replace(self, noise=noise)

    def describe(self) -> str:
        atol = f"atol {self.atol:.3g}" + (" x max|expected|" if self.scaled_atol else "")
        text = f"{self.precision}: rtol {self.rtol:.3g}, {atol}"
        noise = self.noise
        if noise is None:
            return text
        across = f"across {noise.describe_sources()}"
        if noise.spread <= 0:
            return f"{text} (the whole model's spread {across}: 0)"
        return (f"{text} or {noise.derived_atol:.3g} if larger (derived: {NOISE_FACTOR:g} x "
                f"the whole model's spread {noise.spread:.3g}, "
                f"{100 * noise.relative_spread:.2g}% of its largest value, {across})")

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "rtol": self.rtol, "atol": self.atol,
                "atol_times_max_expected": self.scaled_atol,
                "noise": None if self.noise is None else self.noise.to_dict(),
                "text": self.describe()}


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
    """For each output of the chain (the last stage's, and a decoder's KV presents, which
    every stage gives), the tolerance of the least precise float type among the output
    itself and every cut tensor (a later stage's input) it depends on."""
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
    final = list(stage_models[-1].graph.output) if stage_models else []
    for model in stage_models[:-1]:  # a decoder's presents: outputs of the stage they are in
        presents = set(cache_names([v.name for v in model.graph.input],
                                   [v.name for v in model.graph.output]).values())
        final += [value for value in model.graph.output if value.name in presents]
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


def with_model_noise(tolerances: Mapping[str, Tolerance], noise: Mapping[str, ModelNoise]
                     ) -> dict[str, Tolerance]:
    """``tolerances`` with each low-precision output's measured ``noise`` attached; the
    others unchanged."""
    return {name: tolerance.with_noise(noise[name])
            if tolerance.low_precision and name in noise else tolerance
            for name, tolerance in tolerances.items()}
