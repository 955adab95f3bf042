"""The gRPC front end's bounds, derived from the model as REST's body limit is (pure).

REST refuses a body larger than the model's inputs can take at its largest batch
(:class:`~smlaas.transport.v2.RequestLimits`). gRPC gets the same kind of bound in its own
units: a ``ModelInferRequest`` carries each element either raw (its itemsize) or as typed
``*_contents`` (a varint takes up to 10 bytes, a float 4), so the largest message a model can
use is its inputs' elements at the largest batch times the widest form of each, plus the
same allowance REST gives the header. gRPC's own ``max_receive_message_length`` is set to it,
so a larger message is refused by gRPC (``RESOURCE_EXHAUSTED``) before the gateway holds it.

Concurrency is bounded twice (see :class:`GrpcLimits`): gRPC refuses calls beyond
``max_rpcs``, so no more messages than that are ever held; and at most ``max_inferences``
requests (unary calls and stream requests together) are decoded or waiting for the pipeline,
the others refused at once with ``RESOURCE_EXHAUSTED``, never queued.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from smlaas.errors import TooLarge, TooManyCalls
from smlaas.transport.tensors import BYTES, TensorSpec
from smlaas.transport.v2_limits import (
    BYTES_ELEMENT_ALLOWANCE,
    DYNAMIC_DIM_CAP,
    HEADER_ALLOWANCE_BYTES,
)

__all__ = ["BOOTSTRAP_LIMITS", "GrpcLimits", "InferenceSlots", "TooManyCalls",
           "TooLarge", "generation_limits"]

# The widest a typed element can be on the wire: proto3 packs repeated scalars, a varint
# takes 7 bits a byte and a negative int32 is sign-extended to 10 bytes (protobuf encoding
# guide, "Base 128 Varints"); fixed32/fixed64 for floats.
_TYPED_WIRE_BYTES = {"bool": 1, "int8": 10, "int16": 10, "int32": 10, "int64": 10,
                     "uint8": 2, "uint16": 3, "uint32": 5, "uint64": 10, "float32": 4,
                     "float64": 8}
_BYTES_ELEMENT_WIRE = 4 + BYTES_ELEMENT_ALLOWANCE
"""A BYTES element: a 4-byte length prefix raw (a tag and a varint length typed) and its
bytes, as REST's body limit allows them on average."""
SCORE_TEXT_BYTES = {8: 330, 4: 48}
"""The widest ``f"{score:f}"`` of a classification, by the output's itemsize: a float64 has
up to 309 integer digits, a float32 39 (and a sign, a point and six decimals)."""
MEMORY_BUDGET_BYTES = 256 << 20
"""What concurrent gRPC inferences may hold at once, at the largest message."""
COPIES_PER_INFERENCE = 5
"""What one inference holds at its peak, in messages: the bytes gRPC received, the parsed
message, the tensors, their frame to the first stage, the outputs and the response
(measured: 8 concurrent 4 MiB requests raised the gateway's peak by about 150 MiB)."""
MIN_INFERENCES, MAX_INFERENCES = 4, 64
RPC_HEADROOM = 16
"""Calls gRPC admits beyond the inference bound: health, metadata and streams."""






@dataclass(frozen=True)
class GrpcLimits:
    """What the gRPC server admits, from the model's inputs and outputs."""

    max_receive_bytes: int
    """gRPC's ``max_receive_message_length``: the largest ModelInferRequest the model's
    inputs can fill at the largest batch."""
    max_send_bytes: int
    """gRPC's ``max_send_message_length``: the largest response its outputs can fill."""
    max_inferences: int
    """Requests decoded or waiting for the pipeline at once (unary and streamed)."""
    max_rpcs: int
    """gRPC's ``maximum_concurrent_rpcs``: calls admitted at once, of any kind."""

    @classmethod
    def for_model(cls, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
                  max_batch_size: int, labels: Sequence[str] | None = None) -> GrpcLimits:
        receive = HEADER_ALLOWANCE_BYTES + sum(
            _elements(spec, max_batch_size) * _receive_width(spec) for spec in inputs)
        label_bytes = max((len(label.encode()) for label in labels or ()), default=0)
        send = HEADER_ALLOWANCE_BYTES + sum(
            _elements(spec, max_batch_size) * max(_send_width(spec),
                                                  _class_width(spec, label_bytes))
            for spec in outputs)
        inferences = min(MAX_INFERENCES, max(
            MIN_INFERENCES, MEMORY_BUDGET_BYTES // (COPIES_PER_INFERENCE * receive)))
        return cls(receive, max(send, receive), inferences, inferences + RPC_HEADROOM)

    def describe(self) -> str:
        return (f"messages up to {self.max_receive_bytes} bytes in, {self.max_send_bytes} "
                f"out; {self.max_inferences} inferences and {self.max_rpcs} calls at once")


def generation_limits(*, max_context: int, max_sequences: int, max_prompt_bytes: int,
                      max_token_text_bytes: int) -> GrpcLimits:
    """A decoder's: a request is a prompt (text, or up to ``max_context`` token ids) and a few
    parameters; a response at most the context's tokens and their text. A unary generation
    holds its call until its last token, so the calls admitted count every sequence."""
    receive = HEADER_ALLOWANCE_BYTES + max_prompt_bytes + max_context * _TYPED_WIRE_BYTES["int64"]
    send = HEADER_ALLOWANCE_BYTES + max_prompt_bytes + max_context * (8 + max_token_text_bytes)
    return GrpcLimits(receive, send, MAX_INFERENCES,
                      MAX_INFERENCES + max_sequences + RPC_HEADROOM)


BOOTSTRAP_LIMITS = GrpcLimits(4 << 20, 4 << 20, MIN_INFERENCES, MIN_INFERENCES + RPC_HEADROOM)
"""Until the pipeline has described the model: gRPC's default message size (no inference
can run before then; the server is replaced by one with the model's limits once it has)."""


def _elements(spec: TensorSpec, max_batch_size: int) -> int:
    """A tensor's elements at the largest batch (symbolic dimensions as REST bounds them)."""
    rows = max(1, max_batch_size)
    return math.prod(rows if axis == 0 and max_batch_size > 0 else
                     DYNAMIC_DIM_CAP if d is None else d for axis, d in enumerate(spec.shape))


def _receive_width(spec: TensorSpec) -> int:
    if spec.dtype == BYTES:
        return _BYTES_ELEMENT_WIRE
    return max(np.dtype(spec.dtype).itemsize, _TYPED_WIRE_BYTES.get(spec.dtype, 0))


def _class_width(spec: TensorSpec, label_bytes: int) -> int:
    """A classification element of ``spec``: a length prefix, ``score:index:label``."""
    if spec.dtype == BYTES:
        return 0
    score = SCORE_TEXT_BYTES.get(np.dtype(spec.dtype).itemsize, SCORE_TEXT_BYTES[4])
    index = len(str(spec.shape[-1] if spec.shape and spec.shape[-1] else DYNAMIC_DIM_CAP))
    return 4 + score + 1 + index + 1 + label_bytes


def _send_width(spec: TensorSpec) -> int:
    return _BYTES_ELEMENT_WIRE if spec.dtype == BYTES else np.dtype(spec.dtype).itemsize


class InferenceSlots:
    """A count of running inferences that refuses beyond its bound instead of queueing
    (event-loop only: no lock)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.busy = 0

    def claim(self) -> None:
        """One slot, or TooManyCalls (release it with :meth:`release`)."""
        if self.busy >= self.bound:
            raise TooManyCalls(f"{self.bound} gRPC inferences are already running on this "
                               f"gateway; retry later or send fewer at once")
        self.busy += 1

    def release(self) -> None:
        self.busy -= 1
