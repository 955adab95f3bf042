"""What a decoder's plan promises its generation service (pure data, ``generation`` in
plan.json).

A decoder is planned for its decode step: ``max_sequences`` sequences each adding one token
after ``max_context - 1`` cached ones. Every stage keeps its layers' KV cache for that many
sequences of that many tokens (``stages[k].kv_cache_bytes``), counted in its working set, so a
``--fit-epc`` plan holds with every cache full.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import onnx

from smlaas.errors import ConfigError, UnsupportedModelError
from smlaas.graph.input_size import input_dims, model_inputs
from smlaas.graph.kv_cache import TOKEN_INPUTS, find_kv_pairs

DEFAULT_MAX_CONTEXT = 256
DEFAULT_MAX_SEQUENCES = 4
PREFILL_FRACTION = 2
"""The prefill is profiled for a prompt of max_context / PREFILL_FRACTION tokens."""
TOKENIZER_NOTE = "tokenizer"
"""``plan.notes`` key where ``smlaas seal`` puts a decoder's tokenizer.json text, its SHA-256
and end-of-text id (see NOTE_TOKENIZER in :mod:`smlaas.export.sealed_build`)."""


@dataclass(frozen=True)
class GenerationPlan:
    """The sizes a decoder's stages hold caches for, and how its steps were profiled."""

    max_context: int
    """Tokens per sequence, prompt and generated (T)."""
    max_sequences: int
    """Sequences in flight at once (S); each stage holds a cache for each."""
    cache_bytes_per_token: int
    """Every stage's cache bytes for one token of one sequence, summed."""
    decode_step_ms: float | None = None
    """The whole model's native time for one decode step of S sequences at full context."""
    prefill_ms: float | None = None
    """... and for the prefill of one prompt of max_context / PREFILL_FRACTION tokens."""

    @property
    def cache_bytes(self) -> int:
        return self.cache_bytes_per_token * self.max_context * self.max_sequences

    def describe(self) -> str:
        return (f"{self.max_sequences} sequence(s) of up to {self.max_context} tokens, KV "
                f"cache {self.cache_bytes / 2**20:.1f} MiB in all")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationPlan:
        return cls(**data)


@dataclass(frozen=True)
class GenerationSizes:
    """``--max-context`` and ``--max-sequences``: what a decoder's stages hold caches for."""

    max_context: int = DEFAULT_MAX_CONTEXT
    max_sequences: int = DEFAULT_MAX_SEQUENCES


def decoder_input_sizes(model: onnx.ModelProto, generation: GenerationSizes, *,
                        tokens: int = 1) -> dict[str, tuple[int, ...]]:
    """A decoder's input sizes for a step adding ``tokens`` tokens to each of S sequences
    that then hold T tokens (:func:`smlaas.plan.generation.decode_step_sizes`)."""
    check_generation_sizes(generation.max_context, generation.max_sequences)
    pairs = find_kv_pairs(model)
    for pair in pairs:
        if pair.batch_axis != 0:
            raise UnsupportedModelError(f"KV cache input {pair.past!r} has its batch on axis "
                                        f"{pair.batch_axis}; smlaas serves caches batched on "
                                        f"axis 0")
    return decode_step_sizes({value.name: tuple(input_dims(value))
                              for value in model_inputs(model)},
                             max_context=generation.max_context,
                             max_sequences=generation.max_sequences,
                             sequence_axes={p.past: p.sequence_axis for p in pairs},
                             tokens=tokens)


def decoder_axes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every symbolic axis of a decoder's inputs (batch, sequence, past and total length):
    its stages serve any number of sequences, tokens and cached tokens."""
    return {value.name: tuple(axis for axis, dim in enumerate(input_dims(value))
                              if isinstance(dim, str)) for value in model_inputs(model)}


def check_generation_sizes(max_context: int, max_sequences: int) -> None:
    """ConfigError for sizes no decoder can be planned for."""
    if max_context < 2:
        raise ConfigError(f"--max-context must be at least 2 tokens, got {max_context}")
    if max_sequences < 1:
        raise ConfigError(f"--max-sequences must be at least 1, got {max_sequences}")


def decode_step_sizes(model_dims: Mapping[str, tuple[int | str, ...]], *, max_context: int,
                      max_sequences: int, sequence_axes: Mapping[str, int],
                      tokens: int = 1) -> dict[str, tuple[int, ...]]:
    """Input sizes of a step adding ``tokens`` tokens to each of ``max_sequences``
    sequences that then hold ``max_context`` tokens: ``input_ids``/``position_ids``
    (S, tokens), ``attention_mask`` (S, T), each past (S, ..., T - tokens, ...) on its
    sequence axis (``sequence_axes``), its fixed dims as declared."""
    sizes: dict[str, tuple[int, ...]] = {}
    for name, dims in model_dims.items():
        if name in sequence_axes:
            past = max_context - tokens
            sizes[name] = tuple(
                max_sequences if axis == 0 else past if axis == sequence_axes[name]
                else int(dim) if isinstance(dim, int) else 1
                for axis, dim in enumerate(dims))
        elif name == "attention_mask":
            sizes[name] = (max_sequences, max_context)
        elif name in TOKEN_INPUTS:
            sizes[name] = (max_sequences, tokens)
        else:
            raise ConfigError(f"decoder input {name!r} is none of {', '.join(TOKEN_INPUTS)} "
                              f"nor a KV cache input; give its size with --input-size")
    return sizes
