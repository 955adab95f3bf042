"""Tensor framing: round trips for any split of the stream, and bounded refusal of garbage."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from smlaas.errors import ProtocolError
from smlaas.transport.tensors import TensorDecoder, message_bytes

DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_,
                          np.float16])
TENSORS = st.dictionaries(
    st.text(min_size=1, max_size=12),
    DTYPES.flatmap(lambda d: arrays(d, array_shapes(min_dims=0, max_dims=4, max_side=6))),
    max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(TENSORS, min_size=1, max_size=3), st.data())
def test_messages_survive_any_chunking(batch, data) -> None:
    stream = b"".join(message_bytes(f"r{i}", tensors, {"i": i})
                      for i, tensors in enumerate(batch))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = TensorDecoder()
    received = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        decoder.feed(stream[start:end])
        received.extend(decoder.messages())
    assert [m.request_id for m in received] == [f"r{i}" for i in range(len(batch))]
    for message, tensors in zip(received, batch):
        assert message.meta["i"] == int(message.request_id[1:])
        assert set(message.tensors) == set(tensors)
        for name, array in tensors.items():
            np.testing.assert_array_equal(message.tensors[name], array)
            assert message.tensors[name].dtype == array.dtype
    assert decoder.pending_bytes == 0


def test_non_contiguous_arrays_are_sent_in_c_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    decoder = TensorDecoder()
    decoder.feed(message_bytes("x", {"t": array}))
    np.testing.assert_array_equal(next(decoder.messages()).tensors["t"], array)


def _header_frame(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw


@pytest.mark.parametrize("frame, message", [
    (struct.pack(">I", 1 << 30), "exceeds the limit"),
    (_header_frame({"id": "a"}), "malformed"),
    (_header_frame({"id": "a", "tensors": [{"name": "t", "dtype": "object", "shape": [1],
                                            "nbytes": 8}]}), "bad tensor description"),
    (_header_frame({"id": "a", "tensors": [{"name": "t", "dtype": "float32", "shape": [4],
                                            "nbytes": 3}]}), "expected 16"),
    (_header_frame({"id": "a", "tensors": [{"name": "t", "dtype": "float32",
                                            "shape": [1 << 20, 1 << 20],
                                            "nbytes": 4 << 40}]}), "exceeds the limit"),
])
def test_bad_headers_are_refused_before_allocation(frame: bytes, message: str) -> None:
    decoder = TensorDecoder()
    decoder.feed(frame)
    with pytest.raises(ProtocolError, match=message):
        list(decoder.messages())


def test_string_and_bfloat16_tensors_round_trip() -> None:
    strings = np.array([[b"a", "\u00e9t\u00e9".encode()], [b"", b"\x00\xff"]], dtype=object)
    brain = np.array([[1.5, -2.0, 3.0]], dtype=ml_dtypes.bfloat16)
    scalar = np.float32(7.0).reshape(())
    decoder = TensorDecoder()
    decoder.feed(message_bytes("x", {"s": strings, "b": brain, "scalar": scalar}))
    message, = decoder.messages()
    assert message.tensors["s"].dtype == object and message.tensors["s"].tolist() == \
        strings.tolist()
    assert message.tensors["b"].dtype == brain.dtype
    assert message.tensors["b"].tobytes() == brain.tobytes()
    assert message.tensors["scalar"].shape == ()


def test_string_tensors_must_hold_bytes() -> None:
    with pytest.raises(ProtocolError, match="bytes or str"):
        message_bytes("x", {"t": np.array([1, 2], dtype=object)})


@pytest.mark.parametrize("payload", [b"\x05\x00\x00\x00ab", b"\x01\x00"])
def test_cut_short_string_tensors_are_refused(payload: bytes) -> None:
    header = json.dumps({"id": "x", "meta": {}, "tensors": [
        {"name": "t", "dtype": "bytes", "shape": [1], "nbytes": len(payload)}]}).encode()
    decoder = TensorDecoder()
    decoder.feed(struct.pack(">I", len(header)) + header + payload)
    with pytest.raises(ProtocolError):
        list(decoder.messages())


def test_string_element_count_must_match_the_shape() -> None:
    payload = b"\x01\x00\x00\x00a" * 3
    header = json.dumps({"id": "x", "meta": {}, "tensors": [
        {"name": "t", "dtype": "bytes", "shape": [2], "nbytes": len(payload)}]}).encode()
    decoder = TensorDecoder()
    decoder.feed(struct.pack(">I", len(header)) + header + payload)
    with pytest.raises(ProtocolError, match="3 BYTES elements for shape"):
        list(decoder.messages())
