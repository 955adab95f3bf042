"""Serving stages at any batch size.

Stages keep the batch axis symbolic where the model declares it so, shape computations on it
included (see :mod:`smlaas.graph.dynamic_axes`); for stages of other models, a stage's first
dimension becomes symbolic on its inputs and outputs and the fixed intermediate shapes are
dropped (ONNX Runtime infers them again). Whether the stages then compute, at batch n, what
they compute for n separate requests depends on the model: a Reshape to a constant
``[1, ...]`` (written so in the model) does not. :func:`batching_problem` finds out by
running the chain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from smlaas.errors import SmlaasError
from smlaas.export.chain import Chain
from smlaas.runtime.stage_runner import BATCH_DIM, relax_batch_dim

__all__ = ["BATCH_DIM", "batching_problem", "relax_batch_dim"]
from smlaas.profile.session import BFLOAT16


def batching_problem(stage_models: Sequence[onnx.ModelProto], inputs: Mapping[str, np.ndarray],
                     *, batch: int = 2, threads: int = 1) -> str | None:
    """None when the relaxed chain computes, for ``batch`` stacked copies of ``inputs`` (each
    with its own noise), the same as for each one alone; otherwise why it does not."""
    if any(value.ndim == 0 or value.shape[0] != 1 for value in inputs.values()):
        return "the model's inputs do not have a leading batch dimension of 1"
    rng = np.random.default_rng(0)
    samples = [{name: _perturbed(value, rng) for name, value in inputs.items()}
               for _ in range(batch)]
    try:
        chain = Chain([relax_batch_dim(m) for m in stage_models], threads=threads)
        stacked = chain.run({name: np.concatenate([s[name] for s in samples])
                             for name in inputs})
        singles = [chain.run(sample) for sample in samples]
    except SmlaasError as err:
        return f"the stages do not run at batch {batch}: {err}"
    for name, value in stacked.items():
        expected = np.concatenate([single[name] for single in singles])
        if value.shape != expected.shape:
            return f"output {name!r} has shape {value.shape} at batch {batch}, expected " \
                   f"{expected.shape}"
        same = np.array_equal(value, expected) if value.dtype == object else np.allclose(
            value.astype(np.float64), expected.astype(np.float64), rtol=1e-4, atol=1e-5)
        if not same:
            return f"output {name!r} at batch {batch} differs from the requests run alone"
    return None


def _perturbed(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if np.issubdtype(value.dtype, np.floating) or value.dtype == BFLOAT16:
        noise = rng.standard_normal(value.shape)
        return (value.astype(np.float32) + noise).astype(value.dtype)
    if value.dtype == object:  # strings: each sample its own
        suffix = str(int(rng.integers(1 << 30)))
        return np.vectorize(lambda v: bytes(v) + suffix.encode() if isinstance(v, bytes)
                            else f"{v}{suffix}", otypes=[object])(value)
    return value.copy()
