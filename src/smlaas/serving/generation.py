"""The gateway's side of generation: sequences through the stage pipeline, a token at a time.

A request becomes a sequence with a random id the gateway makes (a client never names one, so
no client can read or extend another's). Its prompt is one step (the prefill); then each
step adds the token the last stage chose. Sequences waiting for their next step are batched
into one step, and the batches are kept small enough that every stage has one to work on
(``ceil(sequences / max_inflight)`` rows each): stages work on different sequences at the same
moment (pipelining) and each step batches the decode of several. The caches stay in the
stages (:mod:`smlaas.serving.sequences`); what travels is token ids, the attention mask and
positions here, hidden states between stages, and one token id per row back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from smlaas.errors import GenerationError, PipelineFailed, Unavailable
from smlaas.generation.sampling import SamplingParams
from smlaas.serving.hop import Hop
from smlaas.serving.metrics import GenerationMetrics
from smlaas.serving.protocol import (
    TOKEN_OUTPUT,
    Describe,
    Failure,
    Infer,
    Outputs,
    Step,
    StepRow,
    deadline_in,
)

logger = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 10.0
DESCRIBE_TIMEOUT_S = 4.0


@dataclass(frozen=True)
class GenerationLimits:
    """What the deployment's plan sized every stage's caches for."""

    max_context: int
    max_sequences: int
    eos_token_id: int | None = None
    max_per_client: int = 0
    """Sequences one client (source address) may have at once; 0: half of max_sequences
    (at least 1), so that no client holds every slot."""

    @property
    def per_client(self) -> int:
        return self.max_per_client or max(1, math.ceil(self.max_sequences / 2))


@dataclass(frozen=True)
class Finished:
    """How a sequence ended: ``stop`` (the end-of-text token) or ``length`` (max_tokens
    or the context is full)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Sequence:
    id: str
    tokens: list[int]
    past: int
    """Tokens the stages' caches hold for it."""
    left: int
    """Tokens it may still generate."""
    sampling: dict[str, Any] | None
    prompt_length: int
    stop_at_eos: bool
    started: float = field(default_factory=time.monotonic)
    out: asyncio.Queue[int | Finished | BaseException] = field(default_factory=asyncio.Queue)
    done: bool = False
    released: bool = False
    """Its end was sent to the stages (once)."""


class Generator:
    """Runs sequences through ``link`` (the hop to stage 0)."""

    def __init__(self, link: Hop, limits: GenerationLimits, *, max_inflight: int,
                 timeout_s: float, metrics: GenerationMetrics | None = None) -> None:
        self.link, self.limits = link, limits
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max(1, max_inflight))
        self._inflight = max(1, max_inflight)
        self._waiting: list[_Sequence] = []
        self._wake = asyncio.Event()
        self._active = 0
        self._by_client: dict[str, int] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def active(self) -> int:
        return self._active

    def check(self, prompt: list[int], max_tokens: int) -> None:
        """GenerationError for a request this deployment cannot serve."""
        if not prompt:
            raise GenerationError("the prompt is empty")
        if len(prompt) >= self.limits.max_context:
            raise GenerationError(f"the prompt has {len(prompt)} tokens; this deployment "
                                  f"keeps {self.limits.max_context} per sequence, generated "
                                  f"ones included")
        if max_tokens < 1:
            raise GenerationError(f"max_tokens must be at least 1, got {max_tokens}")

    async def generate(self, prompt: list[int], *, max_tokens: int,
                       sampling: SamplingParams, stop_at_eos: bool = True,
                       client: str = "") -> AsyncIterator[int | Finished]:
        """Each new token as the last stage chooses it, then :class:`Finished`. Leaving the
        iteration early (a client gone) ends the sequence in every stage. ``client`` (its
        source address) may hold ``limits.per_client`` sequences at once. Each step has the
        gateway's request timeout to pass through the stages, from when it is sent (one
        sequence's step never fails another's); a generation as a whole ends at max_tokens
        or the context."""
        self.check(prompt, max_tokens)
        if self._active >= self.limits.max_sequences:
            raise Unavailable(f"{self._active} sequences are being generated, as many as this "
                              f"deployment holds; try again shortly")
        if self._by_client.get(client, 0) >= self.limits.per_client:
            raise Unavailable(f"this client already has {self.limits.per_client} sequence(s) "
                              f"being generated, as many as one client may; try again when "
                              f"one ends")
        self._active += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1
        if self.metrics is not None:
            self.metrics.started(len(prompt))
        left = min(max_tokens, self.limits.max_context - len(prompt))
        sequence = _Sequence(secrets.token_hex(16), list(prompt), 0, left,
                             {"temperature": sampling.temperature, "top_k": sampling.top_k,
                              "top_p": sampling.top_p, "seed": sampling.seed},
                             len(prompt),
                             stop_at_eos and self.limits.eos_token_id is not None)
        self._start()
        self._spawn(self._step([sequence]))  # the prefill, alone
        finished = False
        try:
            while True:
                item = await sequence.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    finished = True
                    return
        finally:
            if self.metrics is not None:
                self.metrics.ended()
            self._active -= 1
            self._by_client[client] -= 1
            if not self._by_client[client]:
                del self._by_client[client]
            if not finished:
                sequence.done = True
                self._release([sequence])

    async def close(self) -> None:
        """Stops dispatching; steps in flight are cancelled (their sequences expire in the
        stages)."""
        tasks = [*self._tasks, *([self._dispatcher] if self._dispatcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- scheduling ------------------------------------------------------------------------
    def _start(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch_forever())

    async def _dispatch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                await self._slots.acquire()
                waiting = [s for s in self._waiting if not s.done]
                self._waiting = []
                if not waiting:
                    self._slots.release()
                    break
                # a step for each pipeline slot, of the sequences being generated: groups
                # stay together from step to step (the stages then feed their presents on)
                size = max(1, math.ceil(self._active / self._inflight))
                batch, rest = waiting[:size], waiting[size:]
                self._waiting = rest + self._waiting
                self._spawn(self._step(batch, slot_held=True))

    async def _step(self, batch: list[_Sequence], *, slot_held: bool = False) -> None:
        if not slot_held:
            await self._slots.acquire()
        if self.metrics is not None:
            self.metrics.step(len(batch))
        try:
            reply = await self.link.request(self._message(batch))
        except Exception as err:  # noqa: BLE001 - every sequence of the batch must hear
            logger.exception("a generation step failed")
            reply = Failure(PipelineFailed.status, f"the step failed: {err}")
        finally:
            self._slots.release()
        if isinstance(reply, Failure):
            error = Unavailable(reply.message) if reply.status == Unavailable.status else \
                PipelineFailed(reply.message, status=reply.status)
            for sequence in batch:
                sequence.done = True
                sequence.out.put_nowait(error)
            self._release(batch)
            return
        tokens = reply.tensors.get(TOKEN_OUTPUT) if isinstance(reply, Outputs) else None
        if tokens is None or tokens.shape != (len(batch),):
            for sequence in batch:
                sequence.done = True
                sequence.out.put_nowait(PipelineFailed(
                    "the last stage answered a step without its tokens",
                    status=PipelineFailed.status))
            self._release(batch)
            return
        ended = []
        for sequence, token in zip(batch, tokens.tolist()):
            sequence.past = len(sequence.tokens)
            sequence.sampling = None
            if sequence.done:  # its client left while the step ran
                ended.append(sequence)
                continue
            if self.metrics is not None:
                self.metrics.generated(first_after_s=time.monotonic() - sequence.started
                                       if len(sequence.tokens) == sequence.prompt_length
                                       else None)
            sequence.tokens.append(int(token))
            sequence.left -= 1
            sequence.out.put_nowait(int(token))
            reason = "stop" if sequence.stop_at_eos and \
                int(token) == self.limits.eos_token_id else \
                "length" if sequence.left <= 0 or \
                len(sequence.tokens) >= self.limits.max_context else None
            if reason is not None:
                sequence.done = True
                sequence.out.put_nowait(Finished(
                    reason, sequence.prompt_length,
                    len(sequence.tokens) - sequence.prompt_length))
                ended.append(sequence)
            else:
                self._waiting.append(sequence)
                self._wake.set()
        if ended:
            self._release(ended)

    def _message(self, batch: list[_Sequence]) -> Infer:
        new = [s.tokens[s.past:] for s in batch]
        width = len(new[0])
        longest = max(s.past for s in batch)
        ids = np.array(new, dtype=np.int64).reshape(len(batch), width)
        mask = np.zeros((len(batch), longest + width), dtype=np.int64)
        positions = np.empty((len(batch), width), dtype=np.int64)
        for r, sequence in enumerate(batch):
            mask[r, longest - sequence.past:] = 1
            positions[r] = np.arange(sequence.past, sequence.past + width)
        rows = tuple(StepRow(s.id, s.past, width, s.sampling) for s in batch)
        return Infer({"input_ids": ids, "attention_mask": mask, "position_ids": positions},
                     deadline_in(self.timeout_s), requests=len(batch), step=Step(rows))

    def _release(self, sequences: list[_Sequence]) -> None:
        """Ends ``sequences`` in every stage (each once)."""
        ids = tuple(s.id for s in sequences if not s.released)
        for sequence in sequences:
            sequence.released = True
        if ids:
            self._spawn(self.link.request(Infer({}, deadline_in(RELEASE_TIMEOUT_S),
                                                requests=1, step=Step((), ids))))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass(frozen=True)
class GenerationService:
    """What the gateway's generate endpoints use: the generator, and the tokenizer sealed
    with the model (None: clients send and get token ids only)."""

    generator: Generator
    tokenizer: Tokenizer | None

    @property
    def vocabulary_size(self) -> int | None:
        """Token ids a prompt may hold (None: no tokenizer to say)."""
        if self.tokenizer is None:
            return None
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise GenerationError("this model was sealed without a tokenizer: send input_ids")
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


async def open_generation(link: Hop, model: str, *, max_inflight: int, timeout_s: float,
                          max_per_client: int = 0, metrics: GenerationMetrics | None = None
                          ) -> GenerationService:
    """The service stage 0's generation report describes (a describe through the pipeline
    asking for it). GenerationError: the model does not generate; Unavailable: the pipeline
    is not ready, or the report is malformed."""
    reply = await link.describe(Describe(deadline_in(DESCRIBE_TIMEOUT_S), generation=True))
    if isinstance(reply, Failure):
        raise Unavailable(f"the pipeline is not ready: {reply.message}")
    first = reply.stage_stats[0] if reply.stage_stats else {}
    report = first.get("generation") if isinstance(first, dict) else None
    if not isinstance(report, dict):
        raise GenerationError(f"model {model!r} is not a decoder with a KV cache: it does not "
                              f"generate")
    try:
        eos = report.get("eos_token_id")
        limits = GenerationLimits(int(report["max_context"]), int(report["max_sequences"]),
                                  None if eos is None else int(eos), max_per_client)
        text = report.get("tokenizer")
        tokenizer = Tokenizer.from_str(text) if isinstance(text, str) else None
    except Exception as err:  # noqa: BLE001 - int(), and the tokenizers library's own errors
        raise Unavailable(f"stage 0 sent a malformed generation report: {err}") from err
    return GenerationService(Generator(link, limits, max_inflight=max_inflight,
                                       timeout_s=timeout_s, metrics=metrics), tokenizer)


class Decoder:
    """Whether a deployment's model generates, learned from stage 0 once (its model does not
    change), and its generation service. Callers at the same moment share one describe."""

    def __init__(self, open_service: Callable[[], Awaitable[GenerationService]]) -> None:
        self._open_service = open_service
        self.current: GenerationService | None = None
        """The service once known (None: not a decoder, or not known yet)."""
        self._not_generating: str | None = None
        self._opening: asyncio.Future[GenerationService] | None = None

    async def service(self) -> GenerationService:
        """The generation service. GenerationError: the model does not generate (raised
        anew each time: one remembered error's traceback would grow with every raise);
        Unavailable: the pipeline could not say (asked again next time)."""
        if self._not_generating is not None:
            raise GenerationError(self._not_generating)
        if self.current is not None:
            return self.current
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self._open())
            # its error is read here too, should every caller have been cancelled meanwhile
            self._opening.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.shield(self._opening)

    def known(self) -> bool | None:
        """Whether the model generates, if the pipeline has said (else None)."""
        if self.current is not None:
            return True
        return False if self._not_generating is not None else None

    async def generates(self) -> bool:
        """Whether the model generates (Unavailable: the pipeline cannot say yet)."""
        known = self.known()
        if known is not None:
            return known
        try:
            await self.service()
        except GenerationError:
            return False
        return True

    async def learn(self) -> None:
        """Asks, if not known yet; a pipeline that cannot say is asked again later."""
        with contextlib.suppress(GenerationError, Unavailable):
            await self.service()

    async def _open(self) -> GenerationService:
        try:
            self.current = await self._open_service()
        except GenerationError as err:
            self._not_generating = str(err)
            raise
        return self.current
