"""Whether a deployment's model generates, as the gateway learns it
(:class:`smlaas.serving.generation.Decoder`): one describe for callers at the same moment, a
permanent answer remembered (raised anew each time), a transient failure asked again."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from smlaas.errors import GenerationError, Unavailable
from smlaas.serving.generation import Decoder


class Opener:
    """Stands in for the describe through the pipeline: answers each call with the next
    outcome, after ``gate`` opens."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes, self.calls = list(outcomes), 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> object:
        self.calls += 1
        await self.gate.wait()
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def run(test) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_callers_at_the_same_moment_share_one_describe() -> None:
    async def test() -> None:
        opener = Opener("service")
        opener.gate.clear()
        decoder = Decoder(opener)  # type: ignore[arg-type]
        waiting = [asyncio.ensure_future(decoder.service()) for _ in range(5)]
        await asyncio.sleep(0.01)
        waiting[0].cancel()  # a caller that goes does not cancel the others' describe
        opener.gate.set()
        results = await asyncio.gather(*waiting[1:])
        assert results == ["service"] * 4 and opener.calls == 1
        assert decoder.known() is True and await decoder.generates()
        assert await decoder.service() == "service" and opener.calls == 1
    run(test)


def test_not_a_decoder_is_remembered_and_raised_anew() -> None:
    async def test() -> None:
        opener = Opener(GenerationError("model 'm' is not a decoder"))
        decoder = Decoder(opener)  # type: ignore[arg-type]
        assert decoder.known() is None
        assert await decoder.generates() is False
        errors = []
        for _ in range(3):
            with pytest.raises(GenerationError, match="not a decoder") as caught:
                await decoder.service()
            errors.append(caught.value)
        assert opener.calls == 1 and decoder.known() is False
        assert len({id(e) for e in errors}) == 3  # no one error whose traceback grows

        def depth(err: BaseException) -> int:
            frames, tb = 0, err.__traceback__
            while tb is not None:
                frames, tb = frames + 1, tb.tb_next
            return frames

        assert depth(errors[0]) == depth(errors[2])
    run(test)


def test_a_pipeline_that_cannot_say_is_asked_again() -> None:
    async def test() -> None:
        opener = Opener(Unavailable("stage 0 is down"), "service")
        decoder = Decoder(opener)  # type: ignore[arg-type]
        await decoder.learn()  # the prober: an Unavailable is not an answer
        assert decoder.known() is None and opener.calls == 1
        with contextlib.suppress(Unavailable):
            await decoder.learn()
        assert decoder.known() is True and opener.calls == 2
    run(test)
