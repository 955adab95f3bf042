"""Timing exported stages on their own, as the partition job reports them beside the
predictions."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from smlaas.export.chain import Chain
from smlaas.profile import ProfileSettings, ProgressCallback, run_times_ms

MEASURE_ROUNDS = 3
"""Interleaved rounds in which the exported stages are timed (see :func:`measure_stages`)."""


def measure_stages(stage_models: Sequence[onnx.ModelProto], feeds: Mapping[str, np.ndarray],
                   settings: ProfileSettings, progress: ProgressCallback | None = None
                   ) -> list[float]:
    """Median native time of each exported stage, fed with the tensors the chain produces
    from the model's inputs ``feeds``.

    The measured runs are taken in interleaved rounds (every stage a few runs, then again),
    so that a slow period of the machine, which on a shared VM lasts seconds, slows every
    stage alike instead of one stage wholly: measured one stage after another, two identical
    ResNet-50 stages once differed by 1.7x.
    """
    chain = Chain(stage_models, threads=settings.threads, optimization=settings.optimization)
    tensors: dict[str, np.ndarray] = dict(feeds)
    stage_feeds = []
    for runner in chain.stages:
        stage_feeds.append({name: tensors[name] for name in runner.inputs})
        tensors = runner.run(tensors)
    rounds = min(MEASURE_ROUNDS, settings.measured_runs)
    per_round = [settings.measured_runs // rounds + (r < settings.measured_runs % rounds)
                 for r in range(rounds)]
    times: list[list[float]] = [[] for _ in chain.stages]
    for round_index, runs in enumerate(per_round):
        for index, runner in enumerate(chain.stages):
            # The chain's own session, so each stage is loaded into ONNX Runtime once.
            times[index] += run_times_ms(runner.session, stage_feeds[index],
                                         warmup_runs=settings.warmup_runs if round_index == 0
                                         else 1, measured_runs=runs)
        if progress:
            progress("measuring stages", round_index + 1, rounds)
    return [statistics.median(t) for t in times]
