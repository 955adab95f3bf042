"""A stage runs a request on its event loop when it is the only one in the stage (no hand-over
to the run thread and back), and in the run thread otherwise (``INLINE_RUN_MAX_S``)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import smlaas.serving.worker as worker_module
from smlaas.runtime.stage_runner import StageRunner, relax_batch_dim
from smlaas.serving.protocol import Describe, Description, Infer, Outputs, deadline_in
from smlaas.serving.worker import StageWorker
from tests.component.test_in_process_pipeline import TOKENS, embedding_model

STAGE = relax_batch_dim(embedding_model())


class NotingRunner(StageRunner):
    """Runs the model, noting the thread of each run (and taking ``delay_s`` more)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(STAGE, threads=1, serving=True, label="stage 0")
        self.delay_s, self.threads = delay_s, []

    def run(self, tensors: Any) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        time.sleep(self.delay_s)
        return super().run(tensors)


def _ids(value: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {"ids": np.full((rows, TOKENS), value, np.int64)}


def _expected(value: int) -> np.ndarray:
    session = ort.InferenceSession(STAGE.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, _ids(value))[0]


async def _worker(runner: NotingRunner) -> StageWorker:
    worker = StageWorker(index=0, runner=runner, model=STAGE, server_context=None,
                         upstream_role="gateway", manifest_digest="-", next_link=None)
    await worker.start()
    return worker


@pytest.fixture(autouse=True)
def _runs_count_as_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded machine must not make the tiny model's runs look long (tests that need a
    long run set their own bound)."""
    monkeypatch.setattr(worker_module, "INLINE_RUN_MAX_S", 10.0)


def test_a_request_alone_in_the_stage_runs_on_its_loop() -> None:
    async def main() -> tuple[list[Any], list[int], int]:
        runner = NotingRunner()
        worker = await _worker(runner)
        try:
            replies = [await worker.handle(f"r{i}", Infer(_ids(i), deadline_in(10)))
                       for i in range(4)]
        finally:
            await worker.stop()
        return replies, runner.threads, threading.get_ident()

    replies, threads, loop_thread = asyncio.run(main())
    assert threads[0] != loop_thread  # the first run's length is not known yet
    assert threads[1:] == [loop_thread] * 3
    for value, reply in enumerate(replies):
        assert isinstance(reply, Outputs)
        np.testing.assert_allclose(next(iter(reply.tensors.values())), _expected(value),
                                   rtol=1e-6)


def test_requests_together_run_in_the_run_thread() -> None:
    async def main() -> tuple[list[Any], list[int], int]:
        runner = NotingRunner(delay_s=0.05)
        worker = await _worker(runner)
        try:
            await worker.handle("warm", Infer(_ids(0), deadline_in(10)))
            replies = await asyncio.gather(*(
                worker.handle(f"r{i}", Infer(_ids(i), deadline_in(10))) for i in range(4)))
        finally:
            await worker.stop()
        return list(replies), runner.threads[1:], threading.get_ident()

    replies, threads, loop_thread = asyncio.run(main())
    assert all(isinstance(reply, Outputs) for reply in replies)
    # while others wait in the stage a run goes to the run thread (the last may run alone)
    assert threads[:3] == [threads[0]] * 3 and threads[0] != loop_thread


def test_a_slow_stage_keeps_its_loop_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "INLINE_RUN_MAX_S", 0.01)

    async def main() -> tuple[list[int], int, float]:
        runner = NotingRunner(delay_s=0.3)
        worker = await _worker(runner)
        try:
            for warm in range(2):  # the first run (cold) is not a measure; the second is
                await worker.handle(f"warm{warm}", Infer(_ids(0), deadline_in(10)))
            running = asyncio.ensure_future(worker.handle("r", Infer(_ids(1), deadline_in(10))))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            described = await worker.handle("d", Describe(deadline_in(10)))
            answered_in = time.monotonic() - started
            assert isinstance(described, Description)
            assert isinstance(await running, Outputs)
        finally:
            await worker.stop()
        return runner.threads, threading.get_ident(), answered_in

    threads, loop_thread, answered_in = asyncio.run(main())
    assert threads[-1] != loop_thread
    assert answered_in < 0.2  # not behind the 0.3 s run


def test_a_larger_input_than_the_last_runs_in_the_run_thread() -> None:
    async def main() -> tuple[list[int], int]:
        runner = NotingRunner()
        worker = await _worker(runner)
        try:
            for request, rows in enumerate((1, 1, 8, 8, 1)):
                reply = await worker.handle(f"r{request}", Infer(_ids(2, rows), deadline_in(10)))
                assert isinstance(reply, Outputs)
        finally:
            await worker.stop()
        return runner.threads, threading.get_ident()

    threads, loop_thread = asyncio.run(main())
    # the first (nothing known), and the first of 8 rows (its run time is not known) in the
    # run thread; the rest, no larger than the run before, on the loop
    assert [thread == loop_thread for thread in threads] == [False, True, False, True, True]


def test_one_long_run_or_control_flow_keeps_the_loop_free_for_good(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "INLINE_RUN_MAX_S", 0.25)

    async def main(runner: NotingRunner, delays: list[float]) -> list[bool]:
        worker = await _worker(runner)
        on_loop = []
        try:
            for request, delay in enumerate(delays):
                runner.delay_s = delay
                reply = await worker.handle(f"r{request}", Infer(_ids(1), deadline_in(10)))
                assert isinstance(reply, Outputs)
                on_loop.append(runner.threads[-1] == threading.get_ident())
        finally:
            await worker.stop()
        return on_loop

    # a run as long as a hostile input could make one: never on the loop again
    assert asyncio.run(main(NotingRunner(), [0, 0, 0.5, 0, 0])) == \
        [False, True, True, False, False]
    # a model with control flow: a run's length could follow the input's values
    monkeypatch.setattr(worker_module, "INLINE_UNSAFE_OPS", frozenset({"Gather"}))
    assert asyncio.run(main(NotingRunner(), [0, 0, 0])) == [False, False, False]


def test_a_slow_first_run_is_not_held_against_the_stage(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "INLINE_RUN_MAX_S", 0.25)

    async def main() -> list[bool]:
        runner = NotingRunner(delay_s=0.5)  # cold: allocations, first touches
        worker = await _worker(runner)
        on_loop = []
        try:
            for request in range(3):
                assert isinstance(await worker.handle(
                    f"r{request}", Infer(_ids(1), deadline_in(10))), Outputs)
                on_loop.append(runner.threads[-1] == threading.get_ident())
                runner.delay_s = 0.0
        finally:
            await worker.stop()
        return on_loop

    assert asyncio.run(main()) == [False, True, True]
