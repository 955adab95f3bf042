"""The sampler: greedy is argmax, top-k and top-p cut where they should, a seed fixes the
tokens, and bad parameters are refused with every problem named."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from smlaas.errors import GenerationError
from smlaas.generation.sampling import Sampler, SamplingParams

RAMP = np.linspace(-2.0, 2.0, 10)


def _logits(seed: int, vocab: int = 257) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(vocab).astype(np.float32) * 3


def test_greedy_is_the_first_argmax() -> None:
    sampler = Sampler(SamplingParams())
    for seed in range(20):
        logits = _logits(seed)
        assert sampler.choose(logits) == int(np.argmax(logits))
    assert sampler.choose(np.array([0.0, 5.0, 5.0, -np.inf])) == 1


def test_a_seed_fixes_the_tokens_in_any_process() -> None:
    """Pinned: numpy keeps PCG64's stream stable, and the arithmetic is float64."""
    first = Sampler(SamplingParams(temperature=1.0, seed=1234))
    assert [first.choose(RAMP) for _ in range(12)] == [2, 8, 4, 9, 9, 9, 9, 9, 3, 9, 8, 7]
    cut = Sampler(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1234))
    assert [cut.choose(RAMP) for _ in range(12)] == [6, 9, 7, 9, 9, 9, 9, 9, 6, 9, 9, 8]


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    def tokens(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, seed=seed))
        return [sampler.choose(_logits(step)) for step in range(40)]
    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_top_k_1_and_a_tiny_top_p_are_greedy() -> None:
    by_k = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3))
    by_p = Sampler(SamplingParams(temperature=5.0, top_p=1e-9, seed=3))
    for seed in range(30):
        logits = _logits(seed)
        assert by_k.choose(logits) == by_p.choose(logits) == int(np.argmax(logits))


def test_top_k_keeps_only_the_k_most_likely() -> None:
    sampler = Sampler(SamplingParams(temperature=10.0, top_k=3, seed=0))
    assert {sampler.choose(RAMP) for _ in range(300)} == {7, 8, 9}


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3 (0.8 >= 0.75), 0.15, 0.05
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    assert {sampler.choose(np.log(probs)) for _ in range(300)} == {1, 3}


def test_draws_follow_the_softmax() -> None:
    sampler = Sampler(SamplingParams(temperature=2.0, seed=42))
    logits = np.array([0.0, 1.0, 2.0, 3.0])
    counts = np.bincount([sampler.choose(logits) for _ in range(4000)], minlength=4)
    expected = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    np.testing.assert_allclose(counts / 4000, expected, atol=0.03)


def test_masked_tokens_are_never_drawn() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0])
    assert {sampler.choose(logits) for _ in range(200)} == {1, 3}


@pytest.mark.parametrize("logits", [np.array([0.0, np.nan]), np.full(3, -np.inf),
                                    np.array([0.0, np.inf]), np.zeros((2, 3)), np.zeros(0)])
def test_unusable_logits_are_refused(logits: np.ndarray) -> None:
    with pytest.raises(GenerationError):
        Sampler(SamplingParams(temperature=1.0)).choose(logits)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": 2**64}, "seed"),
])
def test_bad_parameters_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**kwargs)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(GenerationError) as raised:
        SamplingParams(temperature=-1.0, top_k=-2, top_p=2.0)
    assert all(name in str(raised.value) for name in ("temperature", "top_k", "top_p"))


def test_from_parameters_reads_json_values() -> None:
    params = SamplingParams.from_parameters({"temperature": 1, "top_k": 40, "top_p": 0.95,
                                             "seed": 9, "max_tokens": 16})
    assert params == SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=9)
    assert isinstance(params.temperature, float)
    assert SamplingParams.from_parameters({"temperature": None, "seed": None}) == \
        SamplingParams()
    assert SamplingParams.from_parameters({}).is_greedy


@pytest.mark.parametrize("parameters, message", [
    ({"temperature": True}, "temperature must be a number, got boolean True"),
    ({"top_k": False}, "top_k must be an integer, got boolean"),
    ({"top_k": 2.5}, "top_k must be an integer, got float"),
    ({"seed": "7"}, "seed must be an integer, got string"),
    ({"top_p": [0.5]}, "top_p must be a number, got array"),
    ({"temperature": 10**400}, "temperature is out of range"),
    ({"temperature": -1}, "temperature must be a finite number >= 0"),
])
def test_from_parameters_refuses_wrong_types(parameters: dict[str, Any], message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        SamplingParams.from_parameters(parameters)
