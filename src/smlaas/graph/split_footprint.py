"""How much a split node's pieces hold and move, as the graph will count it after the
rewrite (pure); :mod:`smlaas.graph.splitting` chooses with it (NOTE_SPLIT_CHOICE there)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from smlaas.graph.analysis import ModelGraph
from smlaas.graph.linear_ops import LinearNode, SplitAxis


def even_bounds(size: int, pieces: int) -> list[int]:
    """Boundaries of ``pieces`` pieces of ``size`` whose sizes differ by at most one."""
    return [size * i // pieces for i in range(pieces + 1)]


class Footprint:
    """Working sets and transfers of a node's rewrite, as the graph will count them after it
    (NOTE_SPLIT_CHOICE). A *group* is what must share a stage: the Split; a reduction piece's
    product with its Add; an output piece; the last output piece with the Concat when they
    fit together (else each alone)."""

    def __init__(self, graph: ModelGraph, op: LinearNode, live: np.ndarray,
                 weight_factor: float) -> None:
        self.op, self.weight_factor = op, weight_factor
        # Live bytes that are not the node's own stay live across all of its pieces: all but
        # its output and the activation inputs it reads last (the Transpose output of a
        # transposed weight goes with the rewrite).
        own = op.y.nbytes
        for name in {op.x.name, op.node.input[1]}:
            if name in graph.tensors and graph.last_use[name] == op.position:
                own += graph.tensors[name].nbytes
        self.held = float(live[op.position]) - own
        self.x_own = op.x.nbytes if graph.last_use[op.x.name] == op.position else 0
        self.x, self.y = op.x.nbytes, op.y.nbytes

    def _weights(self, axis: SplitAxis, bounds: list[int], index: int) -> float:
        return self.weight_factor * self.op.piece_weight_bytes(axis, bounds[index],
                                                               bounds[index + 1], index)

    # -- reduction: equal pieces (each holds about the same activations) -----------------
    def reduction_bounds(self, limit: float, max_pieces: int) -> list[int] | None:
        size = self.op.split_size(SplitAxis.REDUCTION)
        weights = self.weight_factor * (self.op.weight_bytes + self.op.bias_bytes)
        for pieces in range(max(2, math.ceil(weights / limit)), min(size, max_pieces) + 1):
            bounds = even_bounds(size, pieces)
            if self.peak(SplitAxis.REDUCTION, bounds, limit) <= limit:
                return bounds
        return None

    def _reduction_groups(self, bounds: list[int]) -> list[float]:
        size, pieces = bounds[-1], len(bounds) - 1
        y = self.y
        sizes = self.weight_factor * 8 * pieces  # the Split's int64 sizes (opset >= 13)
        groups = [self.held + sizes + self.x_own + self.x]  # x and all of its slices
        for i in range(pieces):
            remaining = self.x * (size - bounds[i]) / size  # slices not yet consumed
            after = self.x * (size - bounds[i + 1]) / size
            if i == 0:
                live = remaining + y
            elif self.op.op_type == "Gemm":  # accumulator in as C, updated accumulator out
                live = remaining + 2 * y
            else:  # the product with the accumulator, then the Add's sum as well
                live = max(remaining + 2 * y, after + 3 * y)
            groups.append(self.held + self._weights(SplitAxis.REDUCTION, bounds, i) + live)
        return groups

    # -- output: filled from the last piece back ----------------------------------------
    def output_bounds(self, limit: float) -> list[int] | None:
        """The fewest output pieces, filled from the end: the last as wide as still shares a
        stage with the Concat (so the whole output crosses no cut), when any width does,
        then each earlier one as wide as fits next to the outputs that wait for the Concat.
        Boundaries are then as early as they can be, which is what a boundary's bytes (x and
        the outputs so far) grow with."""
        size = self.op.split_size(SplitAxis.OUTPUT)
        low = smallest(lambda start: self._joined(start, size) <= limit, 0, size)
        if low is None:  # the Concat stands alone
            low = smallest(functools.partial(self._piece_fits, high=size, limit=limit), 0,
                            size)
        reversed_bounds = [size]
        while low is not None and low > 0:
            reversed_bounds.append(low)
            low = smallest(functools.partial(self._piece_fits, high=low, limit=limit), 0, low)
        if low is None:
            return None
        bounds = [0, *reversed(reversed_bounds)]
        if len(bounds) < 3:  # the node fits whole (a Transpose made it oversize): halve it
            bounds = even_bounds(size, 2)
        return bounds if self.peak(SplitAxis.OUTPUT, bounds, limit) <= limit else None

    def _piece_fits(self, low: int, *, high: int, limit: float) -> bool:
        return self._piece(low, high) <= limit

    def _piece(self, low: int, high: int) -> float:
        """An output piece ``[low, high)`` that is not last: its weights, x, and the outputs
        of the pieces so far."""
        return (self.held + self.weight_factor * self.op.piece_weight_bytes(
            SplitAxis.OUTPUT, low, high, 0) + self.x_own + self.y * high / self.op.output_size)

    def _joined(self, low: int, size: int) -> float:
        """The last output piece ``[low, size)`` with the Concat (which holds the output
        twice, the pieces' and its own)."""
        return self.held + self.weight_factor * self.op.piece_weight_bytes(
            SplitAxis.OUTPUT, low, size, 0) + max(self.x_own + self.y, 2 * self.y)

    def concat_joins(self, bounds: list[int], limit: float) -> bool:
        return self._joined(bounds[-2], bounds[-1]) <= limit

    def _output_groups(self, bounds: list[int], limit: float) -> list[float]:
        groups = [self._piece(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
        if self.concat_joins(bounds, limit):
            groups[-1] = self._joined(bounds[-2], bounds[-1])
        else:
            groups.append(self.held + 2 * self.y)
        return groups

    # -- both ----------------------------------------------------------------------------
    def peak(self, axis: SplitAxis, bounds: list[int], limit: float = math.inf) -> float:
        """The largest working set of a group of the rewrite."""
        if axis is SplitAxis.REDUCTION:
            return max(self._reduction_groups(bounds))
        return max(self._output_groups(bounds, limit))

    def transfer(self, axis: SplitAxis, bounds: list[int], limit: float = math.inf) -> int:
        """Bytes of the rewrite's tensors on the boundaries between consecutive groups."""
        size = bounds[-1]
        if axis is SplitAxis.REDUCTION:  # the accumulator and the slices still to come
            total = sum(self.y + self.x * (size - b) / size for b in bounds[1:-1])
        else:  # x, and the outputs so far
            total = sum(self.x_own + self.y * b / size for b in bounds[1:-1])
            if not self.concat_joins(bounds, limit):
                total += self.y
        return round(total)


def smallest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The smallest v in [low, high) with fits(v), for fits monotone (False then True)."""
    if low >= high or not fits(high - 1):
        return None
    while low < high - 1:
        middle = (low + high - 1) // 2
        if fits(middle):
            high = middle + 1
        else:
            low = middle + 1
    return low
