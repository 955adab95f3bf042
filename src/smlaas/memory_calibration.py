"""Fitting the cost model's working-set constants to stages measured on this machine.

The cost model predicts a stage's working set as ``M = k_w*W + A + R + L``, with
``weight_factor`` (k_w) and ``runtime_overhead_mib`` (R) the part a native measurement sees and
``libos_overhead_mib`` (L) the LibOS's pages, which it does not (:mod:`smlaas.plan.cost_model`).
Here a few models are partitioned into stages, every stage's working set is measured natively
(:mod:`smlaas.runtime.working_set`), and k_w and R are fitted by least squares
(:func:`smlaas.profile.calibrate.fit_memory_constants`) for ``smlaas calibrate`` to write; L
is kept.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from smlaas.errors import ConfigError, ProfileError
from smlaas.export.stage_memory import unmeasured_reason
from smlaas.partition import measured_plan
from smlaas.plan import CostModel, Plan, preset
from smlaas.profile import ProfileCache, ProfileSettings, ProgressCallback
from smlaas.profile.calibrate import MemoryFit, MemorySample, fit_memory_constants

CALIBRATION_MODELS = ("resnet18", "mobilenet_v2", "resnet50")
"""Zoo models ``smlaas calibrate`` measures by default: three for a pipeline each, stages with
from 2 to 56 MiB of weights and from under 1 to 12 MiB of activations (convolutional; BERT's
and GPT-2's stages take minutes more to profile and are in ``smlaas bench working-set``)."""
CALIBRATION_MACHINES = 3


@dataclass(frozen=True)
class MemoryCalibration:
    """The fitted constants, the stages they were fitted to, and the error before and
    after."""

    fit: MemoryFit
    samples: tuple[MemorySample, ...]
    models: tuple[str, ...]
    assumed: CostModel
    """The cost model whose constants the fit replaces."""
    threads: int
    method: str

    @property
    def median_error_assumed(self) -> float:
        return statistics.median(_relative_errors(self.samples, lambda s: float(
            self.assumed.native_working_set_bytes(s.touched_weight_bytes,
                                                  s.peak_activation_bytes))))

    @property
    def median_error_calibrated(self) -> float:
        return statistics.median(_relative_errors(self.samples, self.fit.predict_bytes))

    def to_dict(self) -> dict[str, object]:
        return {"weight_factor": self.fit.weight_factor,
                "runtime_overhead_mib": self.fit.runtime_overhead_mib,
                "stages": len(self.samples), "models": list(self.models),
                "threads": self.threads, "method": self.method,
                "median_error_assumed": self.median_error_assumed,
                "median_error_calibrated": self.median_error_calibrated,
                "assumed": {"weight_factor": self.assumed.weight_factor,
                            "runtime_overhead_mib": self.assumed.runtime_overhead_mib},
                "samples": [{"stage": s.label,
                             "touched_weight_mib": round(s.touched_weight_bytes / 2**20, 3),
                             "peak_activation_mib": round(s.peak_activation_bytes / 2**20, 3),
                             "measured_mib": round(s.measured_bytes / 2**20, 3)}
                            for s in self.samples]}


def _relative_errors(samples: Sequence[MemorySample],
                     predict: Callable[[MemorySample], float]) -> list[float]:
    return [abs(predict(s) - s.measured_bytes) / s.measured_bytes for s in samples]


def memory_samples(plan: Plan) -> list[MemorySample]:
    """The measured stages of ``plan`` as samples for the fit."""
    return [MemorySample(label=f"{plan.model.name} stage {s.index}",
                         touched_weight_bytes=s.touched_weight_bytes,
                         peak_activation_bytes=s.peak_activation_bytes,
                         measured_bytes=s.measured.working_set_bytes)
            for s in plan.stages if s.measured is not None]


def calibrate_memory(models: Sequence[str] = CALIBRATION_MODELS, *, settings: ProfileSettings,
                     base: CostModel | None = None, machines: int = CALIBRATION_MACHINES,
                     cache: ProfileCache | None = None,
                     progress: ProgressCallback | None = None,
                     say: Callable[[str], None] | None = None) -> MemoryCalibration:
    """Partitions each of ``models`` (zoo names or ONNX files, at their default input size)
    for ``machines`` stages, measures every stage's working set, and fits the constants.

    Raises:
        ProfileError: a stage could not be measured, or this machine cannot measure at all.
        ConfigError: too few stages to fit (see :func:`fit_memory_constants`).
    """
    base = base or preset("sgx1")
    samples: list[MemorySample] = []
    method, reasons = "", []
    for name in models:
        plan = measured_plan(name, machines=machines, settings=settings, cost_model=base,
                             cache=cache, progress=progress)
        found = memory_samples(plan)
        if not found:
            reasons.append(f"{name}: {unmeasured_reason(plan)}")
            continue
        first = next(s.measured for s in plan.stages if s.measured is not None)
        method = (f"{first.method}, least of {first.rounds} rounds of {first.inferences} "
                  f"inferences")
        samples += found
        if say:
            say(f"{name}: " + ", ".join(
                f"stage {s.label.rsplit(' ', 1)[1]} measured {s.measured_bytes / 2**20:.1f} MiB"
                for s in found))
    if not samples:
        raise ProfileError("no working set could be measured: " + "; ".join(reasons))
    try:
        fit = fit_memory_constants(samples)
    except ValueError as err:
        raise ConfigError(f"{err} (from {', '.join(models)}); add models with "
                          f"--memory-model") from err
    return MemoryCalibration(fit=fit, samples=tuple(samples),
                             models=tuple(models), assumed=base, threads=settings.threads,
                             method=method)
