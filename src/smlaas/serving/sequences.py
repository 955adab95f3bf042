"""A decoder stage's state between generation steps: its layers' KV cache for every sequence,
and (in the last stage) each sequence's sampler.

The cache never leaves the enclave: a step's message carries hidden states, the attention
bias and token ids, never a past or a present. Each pair's store is preallocated for
``max_sequences`` sequences of ``max_context`` tokens (what the plan counted in the stage's
working set). A step's rows may hold different numbers of tokens: their pasts are fed left-
padded to the longest (the gateway's attention mask hides the padding), and what the step
adds to each row is written back after that row's own tokens. A group of sequences that
steps together (the gateway keeps them together) is fed its last step's presents as they
are, as plain decoding feeds them: the store is gathered from only when a group changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from smlaas.errors import GenerationError, Unavailable
from smlaas.generation.sampling import Sampler, SamplingParams
from smlaas.graph.kv_cache import KvPair, find_kv_pairs
from smlaas.plan.generation import TOKENIZER_NOTE
from smlaas.plan.plan import Plan
from smlaas.runtime.stage_runner import StageRunner
from smlaas.serving.protocol import TOKEN_OUTPUT, Step

logger = logging.getLogger(__name__)

IDLE_S = 120.0
"""A sequence no step has touched for this long is freed (its client went away)."""
LOGITS = "logits"


@dataclass
class _Slot:
    index: int
    length: int
    touched: float


class SequenceCache:
    """The KV caches of one stage's layers for up to ``max_sequences`` sequences."""

    def __init__(self, pairs: list[KvPair], *, max_sequences: int, max_context: int) -> None:
        self.pairs, self.max_sequences, self.max_context = pairs, max_sequences, max_context
        self._stores: dict[str, np.ndarray] = {}
        for pair in pairs:
            shape = [max_sequences if axis == 0 else max_context
                     if axis == pair.sequence_axis else int(dim)
                     for axis, dim in enumerate(pair.shape)]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(pair.elem_type)
            self._stores[pair.past] = np.zeros(shape, dtype=dtype)
        self._slots: dict[str, _Slot] = {}
        self._free = list(range(max_sequences))[::-1]
        self._kept: dict[tuple[str, ...], tuple[int, dict[str, np.ndarray]]] = {}
        """Each group's last presents, by its rows: when its next step has the same rows one
        token on, they are its pasts as they are (no gathering from the store)."""

    @property
    def active(self) -> int:
        return len(self._slots)

    def feeds(self, step: Step) -> dict[str, np.ndarray]:
        """Each pair's past for the step's rows, left-padded to the longest; admits new
        sequences. GenerationError for a row out of step; Unavailable when full."""
        self.expire()
        news = {row.new for row in step.rows}
        if len(news) != 1:
            raise GenerationError("a step adds the same number of tokens to every row")
        admitted = []
        for row in step.rows:  # every row is checked before any is admitted
            if row.past + row.new > self.max_context:
                raise GenerationError(f"the sequence would hold {row.past + row.new} tokens; "
                                      f"this deployment keeps at most {self.max_context}")
            slot = self._slots.get(row.sequence)
            if slot is None and row.past == 0 and row.sequence not in admitted:
                admitted.append(row.sequence)
            elif slot is None or slot.length != row.past:  # this stage lost or never had it
                raise Unavailable("this stage does not hold the sequence at that length "
                                  "(unknown sequence: restarted, expired or ended); start "
                                  "it again")
        if len(admitted) > len(self._free):
            raise Unavailable(f"every one of the {self.max_sequences} sequence slots is in "
                              f"use; try again shortly")
        for sequence in admitted:
            self._slots[sequence] = _Slot(self._free.pop(), 0, time.monotonic())
        longest = max(row.past for row in step.rows)
        rows = tuple(row.sequence for row in step.rows)
        kept = self._kept.pop(rows, None)
        if kept is not None and kept[0] == longest:
            return kept[1]
        self._forget(set(rows))
        feeds = {}
        for pair in self.pairs:
            store = self._stores[pair.past]
            shape = list(store.shape)
            shape[0], shape[pair.sequence_axis] = len(step.rows), longest
            fed = np.zeros(shape, dtype=store.dtype)
            for r, row in enumerate(step.rows):
                slot = self._slots[row.sequence]
                fed[_at(r, pair.sequence_axis, longest - row.past, longest)] = \
                    store[_at(slot.index, pair.sequence_axis, 0, row.past)]
            feeds[pair.past] = fed
        return feeds

    def keep(self, step: Step, outputs: Mapping[str, np.ndarray]) -> None:
        """Writes what the step added to each row's cache (the presents' last ``new``
        positions) and frees the ended sequences."""
        longest = max((row.past for row in step.rows), default=0)
        now = time.monotonic()
        for pair in self.pairs:
            present, store = outputs[pair.present], self._stores[pair.past]
            for r, row in enumerate(step.rows):
                slot = self._slots[row.sequence]
                store[_at(slot.index, pair.sequence_axis, row.past, row.past + row.new)] = \
                    present[_at(r, pair.sequence_axis, longest, longest + row.new)]
        for row in step.rows:
            slot = self._slots[row.sequence]
            slot.length, slot.touched = row.past + row.new, now
        if step.rows:
            self._kept[tuple(row.sequence for row in step.rows)] = (
                longest + step.rows[0].new,
                {pair.past: outputs[pair.present] for pair in self.pairs})
        self.end(step.ended)

    def end(self, sequences: tuple[str, ...] | list[str]) -> None:
        for sequence in sequences:
            slot = self._slots.pop(sequence, None)
            if slot is not None:
                self._free.append(slot.index)
        self._forget(set(sequences))

    def _forget(self, sequences: set[str]) -> None:
        """Drops the kept presents of every group holding one of ``sequences``."""
        for rows in [rows for rows in self._kept if sequences.intersection(rows)]:
            del self._kept[rows]

    def expire(self) -> None:
        idle = [s for s, slot in self._slots.items()
                if time.monotonic() - slot.touched > IDLE_S]
        if idle:
            logger.info("freed %d sequence(s) idle for %.0f s", len(idle), IDLE_S)
            self.end(idle)


def _at(row: int, axis: int, start: int, stop: int) -> tuple[int | slice, ...]:
    index: list[int | slice] = [slice(None)] * (axis + 1)
    index[0], index[axis] = row, slice(start, stop)
    return tuple(index)


class TokenChooser:
    """The last stage's samplers, one per sequence (seeded on its first step)."""

    def __init__(self) -> None:
        self._samplers: dict[str, tuple[Sampler, float]] = {}

    def choose(self, step: Step, logits: np.ndarray) -> np.ndarray:
        """Each row's next token from its last position's logits."""
        now = time.monotonic()
        self._samplers = {s: v for s, v in self._samplers.items() if now - v[1] <= IDLE_S}
        tokens = np.empty(len(step.rows), dtype=np.int64)
        for r, row in enumerate(step.rows):
            if row.sampling is not None:
                self._samplers[row.sequence] = (
                    Sampler(SamplingParams.from_parameters(row.sampling)), now)
            sampler = self._samplers.get(row.sequence)
            if sampler is None:
                raise GenerationError("a step for a sequence the last stage does not know")
            tokens[r] = sampler[0].choose(logits[r, -1])
            self._samplers[row.sequence] = (sampler[0], now)
        self.end(step.ended)
        return tokens

    def end(self, sequences: tuple[str, ...]) -> None:
        for sequence in sequences:
            self._samplers.pop(sequence, None)


class GenerationStage:
    """A decoder stage's step: feed the caches, run, keep what was added, and (last stage)
    choose each row's token. Stateless stages of a decoder run steps as they run any batch."""

    def __init__(self, runner: StageRunner, model: onnx.ModelProto, *, max_sequences: int,
                 max_context: int, last: bool) -> None:
        self.runner = runner
        self.cache = SequenceCache(find_kv_pairs(model), max_sequences=max_sequences,
                                   max_context=max_context)
        self.presents = {pair.present for pair in self.cache.pairs}
        self.chooser = TokenChooser() if last else None

    def run(self, tensors: Mapping[str, np.ndarray], step: Step) -> dict[str, np.ndarray]:
        if not step.rows:  # only frees sequences
            self.cache.end(step.ended)
            if self.chooser is not None:
                self.chooser.end(step.ended)
            return {}
        outputs = self.runner.run({**tensors, **self.cache.feeds(step)})
        self.cache.keep(step, outputs)
        onward = {name: value for name, value in outputs.items() if name not in self.presents}
        if self.chooser is None:
            return onward
        logits = onward.get(LOGITS, next(iter(onward.values())))
        return {TOKEN_OUTPUT: self.chooser.choose(step, logits)}


def generation_report(plan: Plan | None) -> dict[str, Any] | None:
    """What stage 0 tells the gateway about generation: the plan's sizes and the tokenizer
    sealed with the model (None: not a decoder)."""
    if plan is None or plan.generation is None:
        return None
    note = plan.notes.get(TOKENIZER_NOTE)
    note = note if isinstance(note, dict) else {}
    return {"max_context": plan.generation.max_context,
            "max_sequences": plan.generation.max_sequences,
            "tokenizer": note.get("json"), "eos_token_id": note.get("eos_token_id")}
