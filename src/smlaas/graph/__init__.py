"""Pure graph analysis: loading, input sizes, preparation, cut positions, memory.

Only :mod:`smlaas.graph.loading` reads files; everything else maps values to values.
"""

from __future__ import annotations

from smlaas.errors import UnknownShapesError
from smlaas.graph.analysis import ModelGraph, TensorInfo
from smlaas.graph.input_size import (
    InputSizes,
    fix_input_sizes,
    model_inputs,
    parse_input_sizes,
    resolve_input_sizes,
)
from smlaas.graph.loading import check_model, load_model
from smlaas.graph.memory import SegmentMemory, segment_memory
from smlaas.graph.prepare import prepare_model
from smlaas.graph.splitting import (
    SPLIT_NOTE,
    SplitAxis,
    SplitBudget,
    SplitOperator,
    split_operator,
    split_oversize_operators,
)

__all__ = [
    "SPLIT_NOTE",
    "InputSizes",
    "ModelGraph",
    "SegmentMemory",
    "SplitAxis",
    "SplitBudget",
    "SplitOperator",
    "TensorInfo",
    "UnknownShapesError",
    "check_model",
    "fix_input_sizes",
    "load_model",
    "model_inputs",
    "parse_input_sizes",
    "prepare_model",
    "resolve_input_sizes",
    "segment_memory",
    "split_operator",
    "split_oversize_operators",
]
