"""Does the chain of sub-models compute what the whole model computes?

The verdict is taken under *reference execution* (ONNX Runtime with graph optimisations off):
whole model and chain then run the same kernels on every node, so any difference is a fault
of the partition itself. At the serving optimisation level ORT fuses patterns differently on
either side of a cut (e.g. a BERT attention block split in two), which moves float32 results
by ~1e-5; that deviation is measured and reported too, but does not decide the verdict.

Each output is held to the tolerance of its element type and of the cut tensors it depends on
(float16 cuts round what one session keeps in float32): see :mod:`smlaas.export.tolerance`.
When some output is float16/bfloat16, the whole model is also run under other execution
settings (:func:`measure_model_noise`) and such outputs are held to at least NOISE_FACTOR
times its own spread; float32 verification runs nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from smlaas.errors import ProfileError
from smlaas.export.chain import Chain, StageRunner
from smlaas.export.tolerance import (
    ModelNoise,
    Tolerance,
    describe_tolerances,
    output_tolerances,
    with_model_noise,
)
from smlaas.profile.inputs import random_inputs
from smlaas.profile.session import Optimization, create_session, run_session

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

    def to_dict(self) -> dict[str, Any]:
        """Everything ``smlaas verify --json`` prints, on a match and on a mismatch."""
        return {"ok": self.ok, "summary": self.summary(), "max_abs_error": self.max_abs_error,
                "max_rel_error": self.max_rel_error, "rtol": self.rtol, "atol": self.atol,
                "stages": self.stage_count, "seeds": list(self.seeds),
                "mismatched": [o.name for o in self.outputs if not o.close],
                "outputs": [asdict(o) for o in self.outputs],
                "served": [asdict(o) for o in self.served],
                "tolerances": {name: t.to_dict() for name, t in self.tolerances.items()}}

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
    given) and compares outputs (see the module docstring for the two execution modes).
    Low-precision outputs are held to at least NOISE_FACTOR x the whole model's own spread
    (:func:`measure_model_noise`)."""
    proto = _structure(whole_model)
    tolerances = output_tolerances([_structure(m) for m in stage_models], rtol=rtol, atol=atol)
    feeds = [random_inputs(proto, input_shapes, seed=seed, samples=samples) for seed in seeds]
    expected = _run_whole(whole_model, feeds, threads=threads,
                          optimization=Optimization.NONE)
    if any(t.low_precision for t in tolerances.values()):
        tolerances = with_model_noise(tolerances, measure_model_noise(
            whole_model, feeds, expected, threads=threads))
    reference = _compare(expected, stage_models, feeds, threads=threads,
                         tolerances=tolerances, optimization=Optimization.NONE)
    optimized = _compare(
        _run_whole(whole_model, feeds[:1], threads=threads, optimization=Optimization.ALL),
        stage_models, feeds[:1], threads=threads, tolerances=tolerances,
        optimization=Optimization.ALL) if served else []
    return VerificationReport(outputs=reference, seeds=list(seeds), rtol=rtol, atol=atol,
                              stage_count=len(stage_models), served=optimized,
                              tolerances=tolerances)


def other_thread_count(threads: int) -> int:
    """The intra-op thread count the noise is also measured at: 1, or 2 when ``threads``
    is 1 (ONNX Runtime splits some reductions by thread)."""
    return 2 if threads == 1 else 1


def measure_model_noise(whole_model: onnx.ModelProto | str | Path,
                        feeds: Sequence[Mapping[str, np.ndarray]],
                        expected: Sequence[Mapping[str, np.ndarray]], *, threads: int
                        ) -> dict[str, ModelNoise]:
    """Per output, how far the whole model moves from ``expected`` (its reference execution:
    no graph optimisations, ``threads`` threads, on ``feeds``) when only the execution
    changes: full optimisations, the other thread count at both levels, and every
    intermediate stored in its own type (float16 rounded as a float16 kernel stores it).
    The last is skipped when ONNX Runtime cannot run the model that way."""
    other = other_thread_count(threads)
    spread: dict[str, float] = dict.fromkeys(expected[0] if expected else (), 0.0)
    for optimization, count in ((Optimization.ALL, threads), (Optimization.NONE, other),
                                (Optimization.ALL, other)):
        _widen(spread, expected, _run_whole(whole_model, feeds, threads=count,
                                            optimization=optimization))
    sources = ["optimisation levels", "thread counts"]
    try:
        stored = _run_whole(_stored_intermediates(whole_model), feeds, threads=threads,
                            optimization=Optimization.NONE, outputs=list(spread))
    except ProfileError:
        pass  # e.g. an intermediate ONNX Runtime cannot return; the others still count
    else:
        _widen(spread, expected, stored)
        sources.append("intermediate rounding")
    return {name: ModelNoise(value, _peak(run[name] for run in expected), tuple(sources))
            for name, value in spread.items()}


def _stored_intermediates(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """``model`` with every node output also a graph output. ONNX Runtime's CPU provider
    then stores each float16 intermediate as float16 instead of keeping it in float32
    between neighbouring float32-only kernels: the model as a chain cut at every node
    computes it. Holds every intermediate until the run ends (memory of all activations)."""
    stored = onnx.ModelProto()
    stored.CopyFrom(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
    names = {value.name for value in stored.graph.output}
    for node in stored.graph.node:
        for name in node.output:
            if name and name not in names:
                names.add(name)
                stored.graph.output.append(helper.make_empty_tensor_value_info(name))
    return stored


def _widen(spread: dict[str, float], expected: Sequence[Mapping[str, np.ndarray]],
           runs: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Raises ``spread[name]`` to the largest finite |run - expected| of each output."""
    for want, got in zip(expected, runs):
        for name in spread:
            a, b = want[name], got.get(name)
            if b is None or a.shape != b.shape or a.dtype == object or b.dtype == object:
                continue
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            finite = diff[np.isfinite(diff)]
            spread[name] = max(spread[name], float(finite.max(initial=0.0)))


def _peak(arrays: Iterable[np.ndarray]) -> float:
    peak = 0.0
    for array in arrays:
        if array.dtype != object:
            values = np.abs(array.astype(np.float64))
            peak = max(peak, float(values[np.isfinite(values)].max(initial=0.0)))
    return peak


def _structure(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else \
        onnx.load(str(model), load_external_data=False)


def _run_whole(model: onnx.ModelProto | str | Path, feeds: Sequence[Mapping[str, np.ndarray]],
               *, threads: int, optimization: Optimization, outputs: list[str] | None = None
               ) -> list[dict[str, np.ndarray]]:
    """The whole model's outputs on each of ``feeds`` (only ``outputs`` when given)."""
    if outputs is None:
        whole = StageRunner(model, threads=threads, optimization=optimization,
                            label="whole model")
        return [whole.run(feed) for feed in feeds]
    session = create_session(model, threads=threads, optimization=optimization)
    declared = {value.name for value in session.get_inputs()}
    return [dict(zip(outputs, (np.asarray(r) for r in run_session(
        session, {k: v for k, v in feed.items() if k in declared}, outputs))))
        for feed in feeds]


def _compare(expected: Sequence[Mapping[str, np.ndarray]],
             stage_models: Sequence[onnx.ModelProto | str | Path],
             feeds: Sequence[Mapping[str, np.ndarray]], *, threads: int,
             tolerances: Mapping[str, Tolerance], optimization: Optimization
             ) -> list[OutputComparison]:
    chain = Chain(stage_models, threads=threads, optimization=optimization)
    merged: dict[str, OutputComparison] = {}
    for want, feed in zip(expected, feeds):
        for item in compare_outputs(want, chain.run(feed), rtol=DEFAULT_RTOL,
                                    atol=DEFAULT_ATOL, tolerances=tolerances):
            previous = merged.get(item.name)
            merged[item.name] = item if previous is None else OutputComparison(
                item.name, item.shape, max(previous.max_abs_error, item.max_abs_error),
                max(previous.max_rel_error, item.max_rel_error), previous.close and item.close,
                item.tolerance)
    return list(merged.values())
