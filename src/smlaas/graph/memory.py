"""Memory of every candidate stage ``[i, j)`` at once, as dense matrices (pure).

For n nodes the matrices are (n+1) x (n+1), indexed ``[i, j]`` with i < j; entries with
i >= j are zero. Building them costs O(n * (n + number of initializers)) with numpy, which
keeps planning of ~700-node models well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from smlaas.graph.analysis import ModelGraph
from smlaas.graph.kv_cache import KvPair


@dataclass(frozen=True)
class SegmentMemory:
    """Per-segment memory figures of one analysed model.

    Attributes:
        weight_bytes: bytes of the initializers a segment holds (what its sub-model stores).
        touched_weight_bytes: bytes of those initializers read per inference (embedding
            lookups read only the indexed rows); this is what must stay resident in the EPC.
        peak_activation_bytes: the largest live activation set while the segment runs.
        cut_bytes: bytes crossing each cut position 0..n.
        cut_tensor_count: number of tensors crossing each cut position 0..n.
        kv_cache_bytes: bytes of the KV cache a segment keeps between steps (its layers'
            caches for every sequence at full context); None for models without one.
        kv_step_bytes: bytes its KV pasts and presents take while it runs a step (held for
            the whole run, so not in ``peak_activation_bytes``); None as above.
    """

    weight_bytes: np.ndarray
    touched_weight_bytes: np.ndarray
    peak_activation_bytes: np.ndarray
    cut_bytes: np.ndarray
    cut_tensor_count: np.ndarray
    kv_cache_bytes: np.ndarray | None = None
    kv_step_bytes: np.ndarray | None = None

    @property
    def node_count(self) -> int:
        return len(self.cut_bytes) - 1


def segment_memory(graph: ModelGraph) -> SegmentMemory:
    """Computes :class:`SegmentMemory` for every segment of ``graph``."""
    n = graph.node_count
    stored, touched = _weight_matrices(graph, n)
    return SegmentMemory(
        weight_bytes=stored,
        touched_weight_bytes=touched,
        peak_activation_bytes=_peak_activation_matrix(graph.live_bytes_by_step(), n),
        cut_bytes=graph.cut_bytes_by_position(),
        cut_tensor_count=graph.cut_count_by_position(),
        kv_cache_bytes=_kv_matrix(graph, graph.kv_cache_bytes, n) if graph.kv_pairs else None,
        kv_step_bytes=_kv_matrix(graph, graph.kv_step_bytes, n) if graph.kv_pairs else None,
    )


def _kv_matrix(graph: ModelGraph, bytes_of: Callable[[KvPair], int], n: int) -> np.ndarray:
    """Per segment, ``bytes_of`` summed over the KV pairs it holds."""
    pairs = {pair.present: pair for pair in graph.kv_pairs}
    return _held_matrix({pair.present: [first] for pair, (first, _) in graph.kv_spans().items()},
                        lambda name, _position: bytes_of(pairs[name]), n)


def _weight_matrices(graph: ModelGraph, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored and the touched weight matrices.

    Stored: the initializers each segment's sub-model file holds. Touched: the weights its
    ONNX Runtime session holds and reads per inference (``ModelGraph.session_weight_uses``:
    outputs of constant-folded nodes included, half-precision weights widened where ORT's
    CPU provider widens them).
    """
    stored = _held_matrix(graph.initializer_uses(),
                          lambda name, _position: graph.initializer_bytes[name], n)
    touched = _held_matrix(graph.session_weight_uses(), graph.touched_initializer_bytes, n)
    return stored, touched


def _held_matrix(uses: dict[str, list[int]], bytes_at: Callable[[str, int], int],
                 n: int) -> np.ndarray:
    """H[i, j] = sum over tensors whose next use at or after i is before j, of their bytes
    at that use.

    For each tensor, ``next_use[i]`` is its first use >= i (n + 1 if none); a segment
    starting at i holds it exactly when ``next_use[i] < j``.
    """
    held = np.zeros((n + 1, n + 1), dtype=np.int64)
    if not uses:
        return held
    names = list(uses)
    starts = np.arange(n + 1)
    next_use = np.full((len(names), n + 1), n + 1, dtype=np.int64)
    bytes_at_next = np.zeros((len(names), n + 1), dtype=np.int64)
    for row, name in enumerate(names):
        positions = np.array(uses[name], dtype=np.int64)
        per_use = np.array([bytes_at(name, int(p)) for p in positions], dtype=np.int64)
        index = np.searchsorted(positions, starts)
        has_next = index < len(positions)
        next_use[row, has_next] = positions[index[has_next]]
        bytes_at_next[row, has_next] = per_use[index[has_next]]
    for i in range(n + 1):
        column = next_use[:, i] + 1  # contributes to every j >= next_use + 1
        valid = column <= n
        held[i] = np.cumsum(np.bincount(column[valid], weights=bytes_at_next[valid, i],
                                        minlength=n + 1)[: n + 1]).astype(np.int64)
    return np.triu(held, 1)


def _peak_activation_matrix(live_bytes: np.ndarray, n: int) -> np.ndarray:
    """A[i, j] = max(live_bytes[i:j])."""
    peak = np.zeros((n + 1, n + 1), dtype=np.int64)
    for i in range(n):
        peak[i, i + 1:] = np.maximum.accumulate(live_bytes[i:])
    return peak


def larger_of(memory: SegmentMemory, graph: ModelGraph, other: SegmentMemory,
              other_graph: ModelGraph) -> SegmentMemory:
    """``memory`` with each segment's activations and KV step bytes the larger of its own
    and ``other``'s: the same model analysed at other input sizes (a decoder's prefill beside
    its decode step). ValueError if the two orders of nodes differ."""
    if [n.name for n in graph.nodes] != [n.name for n in other_graph.nodes]:
        raise ValueError("the two analyses ordered the nodes differently")
    step = memory.kv_step_bytes if other.kv_step_bytes is None or memory.kv_step_bytes is None \
        else np.maximum(memory.kv_step_bytes, other.kv_step_bytes)
    return replace(memory, kv_step_bytes=step, peak_activation_bytes=np.maximum(
        memory.peak_activation_bytes, other.peak_activation_bytes))
