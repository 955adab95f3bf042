"""Running a chain of stage sub-models in one process, with their I/O checked at each hop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from smlaas.profile.session import Optimization
from smlaas.runtime.stage_runner import StageRunner

__all__ = ["Chain", "StageRunner"]


class Chain:
    """The stages of a plan run one after the other, passing tensors by name."""

    def __init__(self, stage_models: Sequence[onnx.ModelProto | str | Path], *, threads: int,
                 optimization: Optimization = Optimization.ALL) -> None:
        self.stages = [StageRunner(m, threads=threads, optimization=optimization,
                                   label=f"stage {k}") for k, m in enumerate(stage_models)]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = dict(inputs)
        for stage in self.stages:
            tensors = stage.run(tensors)
        return tensors
