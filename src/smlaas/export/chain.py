"""Running a chain of stage sub-models in one process, with their I/O checked at each hop.

A decoder's stages also take their layers' KV pasts from the model's inputs and give their
presents beside the last stage's outputs (:mod:`smlaas.graph.kv_cache`): in serving each
stage keeps them; here they are fed and collected as the whole model's are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from smlaas.graph.kv_cache import cache_names
from smlaas.profile.session import Optimization
from smlaas.runtime.stage_runner import StageRunner

__all__ = ["Chain", "StageRunner"]


class Chain:
    """The stages of a plan run one after the other, passing tensors by name."""

    def __init__(self, stage_models: Sequence[onnx.ModelProto | str | Path], *, threads: int,
                 optimization: Optimization = Optimization.ALL) -> None:
        self.stages = [StageRunner(m, threads=threads, optimization=optimization,
                                   label=f"stage {k}") for k, m in enumerate(stage_models)]

        self.caches = [cache_names(s.inputs, s.output_names) for s in self.stages]
        """Per stage, its KV pasts and the presents it makes of them (empty: none)."""

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.stage_feeds(inputs)[-1]

    def stage_feeds(self, inputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """What each stage is fed (the previous stage's outputs, and its KV pasts from
        ``inputs``), then the chain's outputs (the last stage's, and every present)."""
        fed: list[dict[str, np.ndarray]] = []
        tensors: dict[str, np.ndarray] = dict(inputs)
        presents: dict[str, np.ndarray] = {}
        for stage, cache in zip(self.stages, self.caches):
            feeds = {**tensors, **{past: inputs[past] for past in cache if past in inputs}}
            fed.append({name: feeds[name] for name in stage.inputs if name in feeds})
            tensors = stage.run(feeds)
            presents.update({present: tensors.pop(present) for present in cache.values()})
        return [*fed, {**tensors, **presents}]
