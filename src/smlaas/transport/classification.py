"""Triton's classification extension: an output's top-k classes as text (pure)."""

from __future__ import annotations

import numpy as np

from smlaas.errors import BadRequest

MAX_CLASSES = 10_000


def classify(values: np.ndarray, k: int, labels: list[str] | None = None) -> np.ndarray:
    """Triton's classification extension: over the last axis, the ``k`` highest values as
    ``"score:index"`` (``"score:index:label"`` with labels), highest first, as bytes."""
    if values.ndim == 0:
        raise BadRequest("classification needs an output with at least one axis")
    k = min(k, values.shape[-1])
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    rows = []
    for row, indices in zip(flat, order):
        rows.append([(f"{row[i]:f}:{i}" + (f":{labels[i]}" if labels and i < len(labels)
                                           else "")).encode() for i in indices])
    result = np.empty((len(rows), k), dtype=object)
    result[:] = rows
    return result.reshape(*values.shape[:-1], k)
