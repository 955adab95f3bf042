"""Timing exported stages on their own, as the partition job reports them beside the
predictions (their working sets: :mod:`smlaas.export.stage_memory`)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from smlaas.export.chain import Chain
from smlaas.profile import ProfileSettings, ProgressCallback, run_times_ms

MEASURE_ROUNDS = 3
"""Interleaved rounds in which the exported stages are timed (see :func:`measure_stages`)."""


def stage_inputs(chain: Chain, feeds: Mapping[str, np.ndarray]
                 ) -> list[dict[str, np.ndarray]]:
    """Each stage's own inputs: the tensors the chain produces from the model's ``feeds``."""
    return chain.stage_feeds(feeds)[:-1]


def measure_stages(chain: Chain, stage_feeds: Sequence[Mapping[str, np.ndarray]],
                   settings: ProfileSettings, progress: ProgressCallback | None = None
                   ) -> list[float]:
    """Median native time of each stage of ``chain`` (a :class:`Chain` of the exported
    stages at ``settings``' threads and optimisation), fed with its :func:`stage_inputs`.

    The measured runs are taken in interleaved rounds (every stage a few runs, then again),
    so that a slow period of the machine, which on a shared VM lasts seconds, slows every
    stage alike instead of one stage wholly: measured one stage after another, two identical
    ResNet-50 stages once differed by 1.7x.
    """
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
