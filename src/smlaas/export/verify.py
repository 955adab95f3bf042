"""Does the chain of sub-models compute what the whole model computes?

The verdict is taken under *reference execution* (ONNX Runtime with graph optimisations off):
whole model and chain then run the same kernels on every node, so any difference is a fault
of the partition itself. At the serving optimisation level ORT fuses patterns differently on
either side of a cut (e.g. a BERT attention block split in two), which moves float32 results
by ~1e-5; that deviation is measured and reported too, but does not decide the verdict.

Each output is held to the tolerance of its element type and of the cut tensors it depends on
(float16 cuts round what one session keeps in float32): see :mod:`smlaas.export.tolerance`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from smlaas.export.chain import Chain, StageRunner
from smlaas.export.tolerance import Tolerance, describe_tolerances, output_tolerances
from smlaas.profile.inputs import random_inputs
from smlaas.profile.session import Optimization

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


@dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    close: bool
    tolerance: str = ""
    """The tolerance it was held to, in words (see Tolerance.describe)."""


@dataclass(frozen=True)
class VerificationReport:
    """Per-output errors of the chain against the whole model over seeded random inputs."""

    outputs: list[OutputComparison]
    seeds: list[int]
    rtol: float
    atol: float
    stage_count: int
    served: list[OutputComparison] = field(default_factory=list)
    """The same comparison at the serving optimisation level (information only)."""
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    """The tolerance each output was held to (its dtype's and its cut tensors')."""

    @property
    def ok(self) -> bool:
        return all(o.close for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    @property
    def served_max_abs_error(self) -> float | None:
        return max((o.max_abs_error for o in self.served), default=None)

    def tolerance_text(self) -> str:
        if not self.tolerances or all(not t.scaled_atol for t in self.tolerances.values()):
            return f"rtol {self.rtol:g}, atol {self.atol:g}"
        return "tolerances " + describe_tolerances(self.tolerances)

    def summary(self) -> str:
        verdict = "MATCH" if self.ok else "MISMATCH"
        text = (f"{verdict}: chain of {self.stage_count} stage(s) vs whole model over "
                f"{len(self.seeds)} seeded input(s): max abs error {self.max_abs_error:.3g}, "
                f"max rel error {self.max_rel_error:.3g} ({self.tolerance_text()}; "
                f"reference execution)")
        if self.served:
            text += (f"; with ONNX Runtime's full optimisations max abs error "
                     f"{self.served_max_abs_error:.3g}")
        return text


def compare_outputs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], *,
                    rtol: float, atol: float,
                    tolerances: Mapping[str, Tolerance] | None = None
                    ) -> list[OutputComparison]:
    """Per-output errors; each output is held to ``tolerances[name]`` when given, else to
    ``rtol``/``atol``."""
    results = []
    for name, want in expected.items():
        tolerance = (tolerances or {}).get(name) or Tolerance(rtol, atol)
        got = actual.get(name)
        if got is None or got.shape != want.shape:
            results.append(OutputComparison(name, tuple(want.shape), float("inf"),
                                            float("inf"), False))
            continue
        if want.dtype == object or got.dtype == object:  # strings: equal or not
            equal = want.dtype == got.dtype and bool(np.array_equal(want, got))
            error = 0.0 if equal else float("inf")
            results.append(OutputComparison(name, tuple(want.shape), error, error, equal))
            continue
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        diff = np.abs(want64 - got64)
        abs_tol = tolerance.absolute_atol(want64)
        # Relative to |expected|, floored at atol so values near zero do not dominate.
        rel = diff / np.maximum(np.abs(want64), abs_tol)
        results.append(OutputComparison(
            name, tuple(want.shape),
            float(diff.max(initial=0.0)), float(rel.max(initial=0.0)),
            bool(np.allclose(got64, want64, rtol=tolerance.rtol, atol=abs_tol,
                             equal_nan=True)),
            tolerance.describe(),
        ))
    return results


def verify_chain(whole_model: onnx.ModelProto | str | Path,
                 stage_models: Sequence[onnx.ModelProto | str | Path],
                 input_shapes: Mapping[str, tuple[int, ...]], *, threads: int,
                 seeds: Sequence[int] = (0, 1), rtol: float = DEFAULT_RTOL,
                 atol: float = DEFAULT_ATOL, served: bool = True,
                 samples: Mapping[str, np.ndarray] | None = None) -> VerificationReport:
    """Runs the whole model and the chain on the same seeded inputs (``samples`` where
    given) and compares outputs (see the module docstring for the two execution modes)."""
    proto = _structure(whole_model)
    tolerances = output_tolerances([_structure(m) for m in stage_models], rtol=rtol, atol=atol)
    reference = _compare(whole_model, stage_models, proto, input_shapes, threads=threads,
                         seeds=seeds, tolerances=tolerances, optimization=Optimization.NONE,
                         samples=samples)
    optimized = _compare(whole_model, stage_models, proto, input_shapes, threads=threads,
                         seeds=seeds[:1], tolerances=tolerances,
                         optimization=Optimization.ALL, samples=samples) if served else []
    return VerificationReport(outputs=reference, seeds=list(seeds), rtol=rtol, atol=atol,
                              stage_count=len(stage_models), served=optimized,
                              tolerances=tolerances)


def _structure(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else \
        onnx.load(str(model), load_external_data=False)


def _compare(whole_model: onnx.ModelProto | str | Path,
             stage_models: Sequence[onnx.ModelProto | str | Path], proto: onnx.ModelProto,
             input_shapes: Mapping[str, tuple[int, ...]], *, threads: int,
             seeds: Sequence[int], tolerances: Mapping[str, Tolerance],
             optimization: Optimization, samples: Mapping[str, np.ndarray] | None
             ) -> list[OutputComparison]:
    whole = StageRunner(whole_model, threads=threads, optimization=optimization,
                        label="whole model")
    chain = Chain(stage_models, threads=threads, optimization=optimization)
    merged: dict[str, OutputComparison] = {}
    for seed in seeds:
        feeds = random_inputs(proto, input_shapes, seed=seed, samples=samples)
        for item in compare_outputs(whole.run(feeds), chain.run(feeds), rtol=DEFAULT_RTOL,
                                    atol=DEFAULT_ATOL, tolerances=tolerances):
            previous = merged.get(item.name)
            merged[item.name] = item if previous is None else OutputComparison(
                item.name, item.shape, max(previous.max_abs_error, item.max_abs_error),
                max(previous.max_rel_error, item.max_rel_error), previous.close and item.close,
                item.tolerance)
    return list(merged.values())
