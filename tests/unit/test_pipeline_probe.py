"""The gateway is ready only when a probe passed through every stage the manifest names."""

from __future__ import annotations

import asyncio

from smlaas.serving.data_plane import Pipeline
from smlaas.serving.protocol import Description


class _Link:
    def __init__(self, stages: list[int]) -> None:
        self.stages = stages

    async def describe(self, message: object, **_: object) -> Description:
        return Description((), (), tuple(self.stages))


def _probe(stages: list[int], stage_count: int) -> str | None:
    pipeline = Pipeline(_Link(stages), timeout_s=1, stage_count=stage_count)  # type: ignore[arg-type]
    return asyncio.run(pipeline.probe())


def test_a_chain_cut_short_is_not_ready() -> None:
    assert _probe([0, 1, 2], 3) is None
    assert "answered through stages [0], the manifest has 3" in str(_probe([0], 3))
    assert _probe([0, 2], 3) is not None
