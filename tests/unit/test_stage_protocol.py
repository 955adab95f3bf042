"""The stage messages: each kind survives the wire, and a frame that is not well formed is a
ProtocolError (never a KeyError, a TypeError or a half-built message)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smlaas.errors import ProtocolError, Status
from smlaas.serving.protocol import (
    Describe,
    Description,
    Failure,
    Infer,
    Outputs,
    TensorSpec,
    from_frame,
    to_frame,
)
from smlaas.transport.tensors import TensorDecoder, TensorMessage, message_bytes

X = np.arange(6, dtype=np.float32).reshape(2, 3)


def over_the_wire(frame: TensorMessage) -> TensorMessage:
    decoder = TensorDecoder()
    decoder.feed(message_bytes(frame.request_id, frame.tensors, frame.meta))
    [received] = list(decoder.messages())
    return received


@pytest.mark.parametrize("message", [
    Infer({"x": X}, 1.5e9, requests=2, stage_ms=(1.25,)),
    Describe(1.5e9),
    Outputs({"y": X * 2}, (1.0, 2.5)),
    Description((TensorSpec("x", "float32", [None, 3]),), (TensorSpec("y", "int64", [2]),),
                (0, 1), ({"index": 0}, {"index": 1})),
    Failure(Status.BAD_INPUT, "stage 1 could not run", failed_link="stage-1"),
    Failure(Status.DEADLINE, "late"),
], ids=lambda m: type(m).__name__)
def test_every_kind_arrives_as_sent(message: Any) -> None:
    received = from_frame(over_the_wire(to_frame("r-1", message)))
    assert type(received) is type(message)
    tensors = getattr(message, "tensors", None)
    if tensors is None:
        assert received == message
    else:
        for name, value in tensors.items():
            np.testing.assert_array_equal(received.tensors[name], value)
        assert {k: v for k, v in vars(received).items() if k != "tensors"} == \
            {k: v for k, v in vars(message).items() if k != "tensors"}


@pytest.mark.parametrize("meta", [
    {},
    {"kind": "launch"},
    {"kind": "infer"},
    {"kind": "infer", "deadline": "soon", "requests": 1, "stage_ms": []},
    {"kind": "infer", "deadline": float("nan"), "requests": 1, "stage_ms": []},
    {"kind": "infer", "deadline": 1.0, "requests": 0, "stage_ms": []},
    {"kind": "infer", "deadline": 1.0, "requests": True, "stage_ms": []},
    {"kind": "infer", "deadline": 1.0, "requests": 1, "stage_ms": "fast"},
    {"kind": "failure", "status": "teapot", "error": "x"},
    {"kind": "failure", "status": "internal", "error": 5},
    {"kind": "description", "inputs": [{"name": "x"}], "outputs": [], "stages": [],
     "stage_stats": []},
    {"kind": "description", "inputs": [], "outputs": [], "stages": [-1], "stage_stats": []},
    {"kind": "description", "inputs": [], "outputs": [], "stages": [], "stage_stats": [3]},
])
def test_a_malformed_frame_is_a_protocol_error(meta: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        from_frame(TensorMessage("r", {}, meta))


def test_a_describe_with_tensors_is_refused() -> None:
    with pytest.raises(ProtocolError, match="no tensors"):
        from_frame(TensorMessage("r", {"x": X}, {"kind": "describe", "deadline": 1.0}))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=12)


@given(st.dictionaries(st.sampled_from(["kind", "deadline", "requests", "stage_ms", "status",
                                        "error", "inputs", "outputs", "stages",
                                        "stage_stats", "failed_link"]), json_values)
       | st.fixed_dictionaries({"kind": st.sampled_from(["infer", "describe", "outputs",
                                                         "description", "failure"])},
                               optional={"deadline": json_values, "requests": json_values,
                                         "stage_ms": json_values, "status": json_values,
                                         "error": json_values, "inputs": json_values,
                                         "outputs": json_values, "stages": json_values,
                                         "stage_stats": json_values}))
def test_any_header_is_a_message_or_a_protocol_error(meta: dict[str, Any]) -> None:
    with contextlib.suppress(ProtocolError):
        from_frame(TensorMessage("r", {}, meta))
