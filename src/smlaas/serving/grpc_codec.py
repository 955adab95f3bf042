"""A gRPC ``ModelInferRequest`` decoded straight into an
:class:`~smlaas.transport.v2.InferRequest`, and outputs encoded as a ``ModelInferResponse``
(pure: bytes in, tensors out, and back).

Checked as the REST codec checks a body, with the same rules and messages (names, datatypes,
shapes against the model, batch size, element counts), and in two steps so that nothing is
converted before it is known to fit: :meth:`GrpcRequestDecoder.check` reads only the message's
metadata (names, datatypes, shapes, lengths of the contents, sizes of the raw contents);
:meth:`GrpcRequestDecoder.convert` then builds the tensors: floats and doubles straight from
their packed bytes, other typed ``*_contents`` in slices of :data:`CONVERT_SLICE` elements, so
that a large request never holds the interpreter for long (the front end runs both off the
event loop).
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from smlaas.errors import BadRequest, TooLarge
from smlaas.transport.classification import MAX_CLASSES
from smlaas.transport.tensors import (
    BYTES,
    TensorSpec,
    bytes_array,
    deserialize_bytes,
    serialize_bytes,
    wire_dtype,
)
from smlaas.transport.v2 import (
    DATATYPES,
    InferRequest,
    check_shape,
    check_shapes,
    datatype,
    response_outputs,
)
from smlaas.transport.v2_limits import MAX_JSON_DEPTH, RequestLimits
from smlaas.transport.v2_parameters import refuse_sequences, shown, timeout_us_of

__all__ = ["CONTENTS_FIELDS", "FINAL_REQUESTED", "GrpcRequestDecoder", "encode_infer_response",
           "parse_request", "request_parameters", "stream_error"]

CONTENTS_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                   "INT32": "int_contents", "INT64": "int64_contents",
                   "UINT8": "uint_contents", "UINT16": "uint_contents",
                   "UINT32": "uint_contents", "UINT64": "uint64_contents",
                   "FP32": "fp32_contents", "FP64": "fp64_contents",
                   "BYTES": "bytes_contents"}
"""Where each datatype's typed contents go (Triton's ``InferTensorContents``); FP16 and BF16
have none and travel raw only."""
FINAL_REQUESTED, FINAL_RESPONSE = "triton_enable_empty_final_response", "triton_final_response"
"""A streaming client may ask each response to say it is the request's last (Triton's
decoupled-model flags; here every request has exactly one response)."""
CONVERT_SLICE = 16384
"""Typed elements converted per step: about half a millisecond of holding the interpreter."""
_PACKED_FLOATS = {"float32": "<f4", "float64": "<f8"}
"""Typed contents read straight from their packed bytes (see :func:`_packed_floats`)."""


def parse_request(data: bytes) -> Any:
    """The ``ModelInferRequest`` in ``data``; BadRequest if it is not one."""
    try:
        return service_pb2.ModelInferRequest.FromString(data)
    except (DecodeError, ValueError, RecursionError) as err:
        raise BadRequest(f"the message is not a ModelInferRequest: {err}") from err


@dataclass(frozen=True)
class _Planned:
    """One input, checked: where its data is and what it becomes."""

    spec: TensorSpec
    shape: list[int]
    declared: str
    index: int
    """Its position in the message's inputs."""
    raw: bool
    """In raw_input_contents (at ``index``), else in typed contents."""


class GrpcRequestDecoder:
    """Decodes ``ModelInferRequest`` messages for one model (see the module doc)."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
                 max_batch_size: int, limits: RequestLimits) -> None:
        self.inputs = {spec.name: spec for spec in inputs}
        self.output_names = {spec.name for spec in outputs}
        self.max_batch_size = max_batch_size
        self.limits = limits

    def decode(self, message: Any) -> InferRequest:
        """The request in ``message``; BadRequest names what is wrong, and nothing else is
        raised for any message."""
        try:
            planned = self.check(message)
            return self.convert(message, planned)
        except BadRequest:
            raise
        except (RecursionError, OverflowError, MemoryError, ValueError, TypeError) as err:
            raise BadRequest(f"the request cannot be decoded: {type(err).__name__}: "
                             f"{str(err)[:200]}") from err

    # -- step 1: the metadata only ---------------------------------------------------------
    def check(self, message: Any) -> list[_Planned]:
        """Every input's name, datatype, shape and the size of its data, against the model,
        before anything is converted."""
        raw_count = len(message.raw_input_contents)
        if raw_count and raw_count != len(message.inputs):
            raise BadRequest(f"{raw_count} raw_input_contents for {len(message.inputs)} "
                             f"inputs: give raw contents for every input or for none")
        planned: dict[str, _Planned] = {}
        for index, tensor in enumerate(message.inputs):
            item = self._check_input(tensor, index, message, raw=raw_count > 0)
            if item.spec.name in planned:
                raise BadRequest(f"input {item.spec.name!r} is given twice")
            planned[item.spec.name] = item
        missing = sorted(self.inputs.keys() - planned.keys())
        if missing:
            raise BadRequest(f"missing input(s) {missing}")
        self._requested_outputs(message)
        parameters = request_parameters(message)
        refuse_sequences(parameters)
        timeout_us_of(parameters)
        return list(planned.values())

    def _check_input(self, tensor: Any, index: int, message: Any, *, raw: bool) -> _Planned:
        spec = self.inputs.get(tensor.name)
        if spec is None:
            raise BadRequest(f"unknown input {shown(tensor.name)}; the model's inputs are "
                             f"{sorted(self.inputs)}")
        name, declared = spec.name, tensor.datatype
        if declared not in DATATYPES:
            raise BadRequest(f"input {name!r} has unsupported datatype {shown(declared)} "
                             f"(supported: {', '.join(DATATYPES)})")
        if DATATYPES[declared] != spec.dtype:
            raise BadRequest(f"input {name!r} has datatype {declared}; the model expects "
                             f"{datatype(spec.dtype)}")
        shape = list(tensor.shape)
        if len(shape) > MAX_JSON_DEPTH or any(d < 0 for d in shape):
            raise BadRequest(f"input {name!r} needs a shape of non-negative integers, got "
                             f"{shown(shape)}")
        check_shape(name, shape, spec, self.max_batch_size)  # before anything is allocated
        count = math.prod(shape)
        if count > self.limits.max_elements:
            raise BadRequest(f"input {name!r}: shape {shown(shape)} has {count} elements, "
                             f"more than the model takes ({self.limits.max_elements})")
        typed = [field.name for field, _ in tensor.contents.ListFields()]
        if raw:
            if typed:
                raise BadRequest(f"input {name!r} has both raw_input_contents and {typed[0]}; "
                                 f"send one of them")
            size = len(message.raw_input_contents[index])
            if spec.dtype != BYTES and size != count * np.dtype(spec.dtype).itemsize:
                raise BadRequest(f"input {name!r}: raw_input_contents has {size} bytes but "
                                 f"shape {shape} of {declared} needs "
                                 f"{count * np.dtype(spec.dtype).itemsize} bytes")
            return _Planned(spec, shape, declared, index, raw=True)
        field = CONTENTS_FIELDS.get(declared)
        if field is None:
            raise BadRequest(f"input {name!r}: datatype {declared} has no typed contents; "
                             f"send raw_input_contents")
        if any(other != field for other in typed):
            raise BadRequest(f"input {name!r}: a {declared} tensor's typed contents go in "
                             f"{field}, not {[f for f in typed if f != field][0]}")
        given = len(getattr(tensor.contents, field))
        if given != count:
            raise BadRequest(f"input {name!r}: {given} values for shape {shape} (needs "
                             f"{count})")
        return _Planned(spec, shape, declared, index, raw=False)

    def _requested_outputs(self, message: Any) -> tuple[list[str] | None, dict[str, int]]:
        if not message.outputs:
            return None, {}
        names, classes = [], {}
        for output in message.outputs:
            if output.name not in self.output_names:
                raise BadRequest(f"unknown output {shown(output.name)}; the model's outputs "
                                 f"are {sorted(self.output_names)}")
            names.append(output.name)
            if "classification" in output.parameters:
                parameter = output.parameters["classification"]
                k = parameter.int64_param
                if parameter.WhichOneof("parameter_choice") != "int64_param" or \
                        not 1 <= k <= MAX_CLASSES:
                    raise BadRequest(f"output {output.name!r}: classification must be an "
                                     f"integer in 1..{MAX_CLASSES}")
                classes[output.name] = k
        return names, classes

    # -- step 2: the tensors ---------------------------------------------------------------
    def convert(self, message: Any, planned: list[_Planned]) -> InferRequest:
        tensors: dict[str, np.ndarray] = {}
        for item in planned:
            contents = message.inputs[item.index].contents
            tensors[item.spec.name] = (
                _raw_input(item, message.raw_input_contents[item.index]) if item.raw else
                _typed_input(item, contents))
        batch = check_shapes(tensors, self.inputs, self.max_batch_size)
        outputs, classes = self._requested_outputs(message)
        parameters = request_parameters(message)
        receipt = parameters.get("receipt", False)
        if not isinstance(receipt, bool):
            raise BadRequest(f"parameter 'receipt' must be a bool_param, got {receipt!r}"[:200])
        return InferRequest(id=message.id or None, inputs=tensors, batch=batch,
                            outputs=outputs, classification=classes, binary_default=True,
                            timeout_us=timeout_us_of(parameters), receipt=receipt)


def request_parameters(message: Any) -> dict[str, Any]:
    """The request's ``parameters`` as the REST codec sees them (each its one value), for the
    same checks (``timeout``, the sequence parameters)."""
    values: dict[str, Any] = {}
    for key, parameter in message.parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = None if choice is None else getattr(parameter, choice)
    return values


def _raw_input(item: _Planned, data: bytes) -> np.ndarray:
    if item.spec.dtype == BYTES:
        try:
            return bytes_array(deserialize_bytes(data), item.shape)
        except ValueError as err:
            raise BadRequest(f"input {item.spec.name!r}: {err}") from err
    dtype = np.dtype(item.spec.dtype)
    return np.frombuffer(data, dtype=dtype, count=math.prod(item.shape)).reshape(item.shape)


def _typed_input(item: _Planned, contents: Any) -> np.ndarray:
    """Typed contents as an array: floats straight from their packed bytes, other types a
    slice at a time, letting the event loop's thread take the interpreter between slices
    (values outside the datatype's range, an INT8 of 300, are refused as REST refuses
    them)."""
    field = CONTENTS_FIELDS[item.declared]
    values = getattr(contents, field)
    if item.spec.dtype in _PACKED_FLOATS:
        packed = _packed_floats(contents, field, np.dtype(item.spec.dtype), len(values))
        if packed is not None:
            return packed.reshape(item.shape)
    array = np.empty(len(values), dtype=object if item.spec.dtype == BYTES else item.spec.dtype)
    for start in range(0, len(values), CONVERT_SLICE):
        stop = min(start + CONVERT_SLICE, len(values))
        try:
            array[start:stop] = values[start:stop]
        except OverflowError as err:
            raise BadRequest(f"input {item.spec.name!r}: data is not {item.declared}: "
                             f"{str(err)[:200]}") from err
        time.sleep(0)  # releases the interpreter: the event loop's thread may take it
    return array.reshape(item.shape)


def _packed_floats(contents: Any, field: str, dtype: np.dtype[Any], count: int
                   ) -> np.ndarray | None:
    """``field`` of ``contents`` (its only field) read from its serialized form: protobuf
    writes a proto3 repeated float or double as one packed record, its tag, a varint length
    and the little-endian values. None if the bytes are not laid out so."""
    packed = contents.SerializeToString()
    number = contents.DESCRIPTOR.fields_by_name[field].number
    if not packed or packed[0] != (number << 3 | 2):
        return None
    length, offset, shift = 0, 1, 0
    while offset < len(packed) and shift < 64:
        length |= (packed[offset] & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if not packed[offset - 1] & 0x80:
            break
    if length != count * dtype.itemsize or offset + length != len(packed):
        return None
    return np.frombuffer(packed, dtype=_PACKED_FLOATS[dtype.name], count=count, offset=offset)


def encode_infer_response(model_name: str, model_version: str, request: InferRequest,
                          outputs: Mapping[str, np.ndarray], *, labels: list[str] | None,
                          max_bytes: int, stream: bool = False, final: bool = False
                          ) -> bytes:
    """The serialized ``ModelInferResponse`` (in a ``ModelStreamInferResponse`` when
    ``stream``) with every output raw; TooLarge past ``max_bytes``. ``final`` flags it as
    the request's last response (``triton_final_response``), for a client that asked.

    Only the small part (names, shapes) goes through protobuf; each output's bytes are
    appended as its own ``raw_output_contents`` record, so that they are copied once, into
    the response (protobuf messages may be concatenated field by field)."""
    chosen = {name: np.ascontiguousarray(value)
              for name, value in response_outputs(request, outputs, labels).items()}
    contents = [serialize_bytes(value) if value.dtype == object else
                value.view(np.uint8).reshape(-1).data for value in chosen.values()]
    size = sum(len(c) for c in contents)
    if size > max_bytes:
        raise TooLarge(f"the response would carry {size} bytes of outputs, more than the "
                       f"{max_bytes} this gateway sends; ask for fewer outputs or rows")
    head = service_pb2.ModelInferResponse(model_name=model_name, model_version=model_version,
                                          id=request.id or "")
    if final:
        head.parameters[FINAL_RESPONSE].bool_param = True
    for name, value in chosen.items():
        head.outputs.add(name=name, shape=list(value.shape),
                         datatype=datatype(wire_dtype(value.dtype)))
    parts: list[bytes | memoryview] = [head.SerializeToString()]
    for data in contents:
        parts += [_RAW_OUTPUT_TAG, _varint(len(data)), data]
    body = b"".join(parts)
    return as_stream_response(body) if stream else body


def as_stream_response(body: bytes) -> bytes:
    """A serialized ``ModelInferResponse`` as the ``infer_response`` of a
    ``ModelStreamInferResponse``."""
    return _STREAM_RESPONSE_TAG + _varint(len(body)) + body


def receipt_entry(receipt: bytes) -> bytes:
    """The ``receipt`` response parameter (base64) as a serialized ``ModelInferResponse``
    field: appended to a response, it adds that one map entry (protobuf merges repeated
    fields), so the receipt covers the response without it exactly."""
    entry = service_pb2.ModelInferResponse()
    entry.parameters["receipt"].string_param = base64.b64encode(receipt).decode()
    return bytes(entry.SerializeToString())


def without_receipt(response: bytes, receipt: bytes) -> bytes:
    """The response as the receipt covers it (what the gateway signed)."""
    entry = receipt_entry(receipt)
    if not response.endswith(entry):
        raise ValueError("the response does not end with its receipt parameter")
    return response[:-len(entry)]


_RAW_OUTPUT_TAG = bytes([service_pb2.ModelInferResponse.DESCRIPTOR.fields_by_name[
    "raw_output_contents"].number << 3 | 2])
_STREAM_RESPONSE_TAG = bytes([service_pb2.ModelStreamInferResponse.DESCRIPTOR.fields_by_name[
    "infer_response"].number << 3 | 2])


def _varint(value: int) -> bytes:
    """``value`` as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def stream_error(message: str, *, request_id: str, model_name: str, model_version: str,
                 final: bool = False) -> bytes:
    """A ``ModelStreamInferResponse`` carrying an error, with the request's id (as Triton
    answers a failed request on a stream)."""
    response = service_pb2.ModelStreamInferResponse(error_message=message)
    response.infer_response.id = request_id
    response.infer_response.model_name = model_name
    response.infer_response.model_version = model_version
    if final:
        response.infer_response.parameters[FINAL_RESPONSE].bool_param = True
    return bytes(response.SerializeToString())

