"""Does the chain of sub-models compute what the whole model computes?

The verdict is taken under *reference execution* (ONNX Runtime with graph optimisations off):
whole model and chain then run the same kernels on every node, so any difference is a fault
of the partition itself. At the serving optimisation level ORT fuses patterns differently on
either side of a cut (e.g. a BERT attention block split in two), which moves float32 results
by ~1e-5; that deviation is measured and reported too, but does not decide the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from smlaas.export.chain import Chain, StageRunner
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

    def summary(self) -> str:
        verdict = "MATCH" if self.ok else "MISMATCH"
        text = (f"{verdict}: chain of {self.stage_count} stage(s) vs whole model over "
                f"{len(self.seeds)} seeded input(s): max abs error {self.max_abs_error:.3g}, "
                f"max rel error {self.max_rel_error:.3g} (rtol {self.rtol:g}, "
                f"atol {self.atol:g}, reference execution)")
        if self.served:
            text += (f"; with ONNX Runtime's full optimisations max abs error "
                     f"{self.served_max_abs_error:.3g}")
        return text


def compare_outputs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], *,
                    rtol: float, atol: float) -> list[OutputComparison]:
    results = []
    for name, want in expected.items():
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
        # Relative to |expected|, floored at atol so values near zero do not dominate.
        rel = diff / np.maximum(np.abs(want64), atol)
        results.append(OutputComparison(
            name, tuple(want.shape),
            float(diff.max(initial=0.0)), float(rel.max(initial=0.0)),
            bool(np.allclose(got64, want64, rtol=rtol, atol=atol, equal_nan=True)),
        ))
    return results


def verify_chain(whole_model: onnx.ModelProto | str | Path,
                 stage_models: Sequence[onnx.ModelProto | str | Path],
                 input_shapes: Mapping[str, tuple[int, ...]], *, threads: int,
                 seeds: Sequence[int] = (0, 1), rtol: float = DEFAULT_RTOL,
                 atol: float = DEFAULT_ATOL, served: bool = True) -> VerificationReport:
    """Runs the whole model and the chain on the same seeded inputs and compares outputs
    (see the module docstring for the two execution modes)."""
    proto = whole_model if isinstance(whole_model, onnx.ModelProto) else \
        onnx.load(str(whole_model), load_external_data=False)
    reference = _compare(whole_model, stage_models, proto, input_shapes, threads=threads,
                         seeds=seeds, rtol=rtol, atol=atol, optimization=Optimization.NONE)
    optimized = _compare(whole_model, stage_models, proto, input_shapes, threads=threads,
                         seeds=seeds[:1], rtol=rtol, atol=atol,
                         optimization=Optimization.ALL) if served else []
    return VerificationReport(outputs=reference, seeds=list(seeds), rtol=rtol, atol=atol,
                              stage_count=len(stage_models), served=optimized)


def _compare(whole_model: onnx.ModelProto | str | Path,
             stage_models: Sequence[onnx.ModelProto | str | Path], proto: onnx.ModelProto,
             input_shapes: Mapping[str, tuple[int, ...]], *, threads: int,
             seeds: Sequence[int], rtol: float, atol: float, optimization: Optimization
             ) -> list[OutputComparison]:
    whole = StageRunner(whole_model, threads=threads, optimization=optimization,
                        label="whole model")
    chain = Chain(stage_models, threads=threads, optimization=optimization)
    merged: dict[str, OutputComparison] = {}
    for seed in seeds:
        feeds = random_inputs(proto, input_shapes, seed=seed)
        for item in compare_outputs(whole.run(feeds), chain.run(feeds), rtol=rtol, atol=atol):
            previous = merged.get(item.name)
            merged[item.name] = item if previous is None else OutputComparison(
                item.name, item.shape, max(previous.max_abs_error, item.max_abs_error),
                max(previous.max_rel_error, item.max_rel_error), previous.close and item.close)
    return list(merged.values())
