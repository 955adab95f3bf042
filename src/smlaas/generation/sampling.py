"""Choosing the next token from a row of logits: greedy, or sampled with temperature, top-k and
top-p (pure numpy, seeded).

A :class:`Sampler` owns its random generator (PCG64, seeded from :class:`SamplingParams`), so a
fixed seed gives the same tokens in any process: the probabilities are float64 numpy
arithmetic, and each sampled token takes exactly one ``rng.random()`` draw.

>>> import numpy as np
>>> Sampler(SamplingParams()).choose(np.array([0.1, 2.0, 2.0, -1.0]))
1
>>> SamplingParams.from_parameters({"temperature": 0.8, "top_p": 0.9, "seed": 7}).top_p
0.9
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from smlaas.errors import GenerationError

MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; the defaults are greedy decoding."""

    temperature: float = 0.0
    """0 picks the most likely token (greedy); above 0 divides the logits before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 keeps every token."""
    top_p: float = 1.0
    """Sample among the smallest set of most likely tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seeds the sampler's generator; None draws fresh entropy (not reproducible)."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def problems(self) -> list[str]:
        """Every bad value, each as a sentence naming the parameter, what came and what is
        allowed; empty when the parameters are usable."""
        found = []
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            found.append(f"temperature must be a finite number >= 0 (0 = greedy), got "
                         f"{self.temperature!r}")
        if not _is_integer(self.top_k) or self.top_k < 0:
            found.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            found.append(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_integer(self.seed)
                                      or not 0 <= self.seed <= MAX_SEED):
            found.append(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")
        return found

    def validate(self) -> None:
        """Raises GenerationError listing every bad value."""
        found = self.problems()
        if found:
            raise GenerationError("bad sampling parameters: " + "; ".join(found))

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> SamplingParams:
        """The parameters named ``temperature``, ``top_k``, ``top_p`` and ``seed`` in a V2
        ``parameters`` object or an OpenAI request body (JSON values); other names are left
        to the caller, and null means the default.

        Raises:
            GenerationError: a value of the wrong JSON type (a boolean is not a number) or out
                of range; every problem is listed.
        """
        values: dict[str, Any] = {}
        found = []
        for field in fields(cls):
            value = parameters.get(field.name)
            if value is None:
                continue
            integer = field.name in ("top_k", "seed")
            if integer and not _is_integer(value) or not integer and not _is_real(value):
                kind = "an integer" if integer else "a number"
                found.append(f"{field.name} must be {kind}, got {_json_type(value)} "
                             f"{value!r}")
                continue
            try:
                values[field.name] = value if integer else float(value)
            except OverflowError:
                found.append(f"{field.name} is out of range: {value!r}")
        if found:
            raise GenerationError("bad sampling parameters: " + "; ".join(found))
        return cls(**values)


class Sampler:
    """Picks tokens for one sequence under ``params``, drawing from its own generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.Generator(np.random.PCG64(params.seed))

    def choose(self, logits_row: np.ndarray) -> int:
        """The next token id from one position's logits [vocab].

        Greedy: the first index of the largest logit. Otherwise, in float64: logits divided by
        the temperature, cut to the top k, softmax, cut to the top-p nucleus (the shortest
        prefix of the probabilities in descending order whose sum reaches top_p), then the
        token whose cumulative probability first exceeds one uniform draw.

        Raises:
            GenerationError: the row is empty, not 1-D, holds NaN, or has no finite logit.
        """
        logits = np.asarray(logits_row)
        if logits.ndim != 1 or logits.size == 0:
            raise GenerationError(f"expected one row of logits [vocab], got shape "
                                  f"{logits.shape}")
        if np.isnan(logits).any() or np.isposinf(logits).any() or \
                not np.isfinite(logits).any():
            raise GenerationError("the model's logits hold NaN, +inf or no finite value; "
                                  "cannot choose a token")
        if self.params.is_greedy:
            return int(np.argmax(logits))
        values = logits.astype(np.float64)
        # Descending; equal logits keep index order, so ties break the same way everywhere.
        order = np.argsort(-values, kind="stable")
        if 0 < self.params.top_k < order.size:
            order = order[:self.params.top_k]
        kept = values[order]
        # softmax(logits / temperature), the maximum subtracted before dividing so that a
        # tiny temperature underflows to 0 instead of overflowing to inf.
        probs = np.exp((kept - kept[0]) / self.params.temperature)
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            nucleus = int(np.searchsorted(np.cumsum(probs), self.params.top_p)) + 1
            probs = probs[:nucleus]
        cumulative = np.cumsum(probs)
        draw = self.rng.random() * cumulative[-1]
        index = min(int(np.searchsorted(cumulative, draw, side="right")), probs.size - 1)
        return int(order[index])


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__
