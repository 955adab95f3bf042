"""The Open Inference Protocol (KServe V2) inference request and response, with Triton's
binary tensor extension (pure: bytes in, tensors out, and back).

Binary extension: the request body is ``JSON | tensor bytes...``; the header
``Inference-Header-Content-Length`` gives the JSON's length, and each binary input says its
size in ``parameters.binary_data_size``. Outputs are returned in binary when the request asks
(``parameters.binary_data_output`` or per output ``parameters.binary_data``).

Request parameters: ``timeout`` (Triton's, in microseconds; 0 or absent for the gateway's
deadline) is carried in :attr:`InferRequest.timeout_us`; ``sequence_id``, ``sequence_start``
and ``sequence_end`` are refused (no model here has sequence batching). Outputs asked for as
JSON are bounded: a response whose JSON could pass :data:`MAX_JSON_RESPONSE_BYTES` is refused
with a message that says to ask for binary outputs (:func:`check_json_outputs`), and JSON
data is read and written by :mod:`smlaas.transport.v2_json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smlaas.errors import BadRequest
from smlaas.transport.classification import MAX_CLASSES, classify
from smlaas.transport.tensors import (
    BYTES,
    TensorSpec,
    bytes_array,
    deserialize_bytes,
    serialize_bytes,
    wire_dtype,
)
from smlaas.transport.v2_json import json_array, json_data_text, json_text, read_json
from smlaas.transport.v2_limits import (
    MAX_JSON_DEPTH,
    MAX_JSON_RESPONSE_BYTES,
    RequestLimits,
    check_json_bounds,
    check_json_outputs,
    json_bytes_bound,
    spec_json_bytes_bound,
)
from smlaas.transport.v2_parameters import (
    encodable,
    refuse_sequences,
    shown,
    timeout_us_of,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
             "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
             "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64",
             "BF16": "bfloat16", "BYTES": BYTES}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    batch: int
    """Rows on the batch dimension (1 when the model is served without one)."""
    outputs: list[str] | None = None
    """Requested outputs in order; None for all."""
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    classification: dict[str, int] = field(default_factory=dict)
    """Output name -> k: return its top-k classes (the classification extension)."""
    timeout_us: int = 0
    """The request's ``timeout`` parameter in microseconds (Triton's unit); 0: none given,
    the gateway's own deadline applies. The gateway's deadline also caps it."""
    receipt: bool = False
    """The ``receipt`` parameter: answer with a receipt (:mod:`smlaas.receipts`)."""

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def datatype(dtype: str) -> str:
    return NUMPY_TO_DATATYPE.get(dtype, dtype.upper())


def tensor_bytes(value: np.ndarray) -> bytes:
    """A tensor in the binary extension's layout (BYTES length-prefixed, others raw)."""
    return serialize_bytes(value) if value.dtype == object else value.tobytes()


def public_shape(spec: TensorSpec, batching: bool) -> list[int]:
    """A tensor's shape as clients see it: -1 for dynamic dimensions (the batch one too)."""
    return [-1 if (batching and axis == 0) or d is None else d
            for axis, d in enumerate(spec.shape)]


def parse_infer_request(body: bytes | bytearray, header_length: str | None,
                        inputs: list[TensorSpec], outputs: list[TensorSpec], *,
                        max_batch_size: int,
                        limits: RequestLimits | None = None) -> InferRequest:
    """Decodes and checks a request against the model's inputs; BadRequest names what is
    wrong (malformed JSON or binary header, unknown/missing/duplicate tensor, datatype, shape,
    byte count, batch size, or a request larger than the model can take). Never raises
    anything else for any input."""
    limits = limits or RequestLimits.for_model(inputs, max_batch_size=max_batch_size)
    try:
        return _parse(body, header_length, inputs, outputs, max_batch_size, limits)
    except BadRequest:
        raise
    except (RecursionError, OverflowError, MemoryError, ValueError, TypeError) as err:
        raise BadRequest(f"the request cannot be decoded: {type(err).__name__}: "
                         f"{str(err)[:200]}") from err


def _parse(body: bytes | bytearray, header_length: str | None, inputs: list[TensorSpec],
           outputs: list[TensorSpec], max_batch_size: int,
           limits: RequestLimits) -> InferRequest:
    json_part, binary = _split_body(body, header_length)
    check_json_bounds(json_part, limits)
    request = read_json(json_part)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("request must be a JSON object with an 'inputs' list")
    parameters = _parameters(request, "the request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {type(request_id).__name__}")
    if request_id is not None and not request_id.isprintable() or \
            not encodable(request_id or ""):
        raise BadRequest("'id' must be printable text (no control characters or lone "
                         "surrogates)")
    specs = {s.name: s for s in inputs}
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in request["inputs"]:
        if not isinstance(item, dict):
            raise BadRequest("each input must be a JSON object")
        name = item.get("name")
        if not isinstance(name, str) or name not in specs:
            raise BadRequest(f"unknown input {shown(name)}; the model's inputs are "
                             f"{sorted(specs)}")
        if name in tensors:
            raise BadRequest(f"input {name!r} is given twice")
        tensors[name], offset = _decode_input(item, specs[name], binary, offset,
                                              limits.max_elements, max_batch_size)
    if offset != len(binary):
        raise BadRequest(f"the request carries {len(binary)} bytes of binary data but its "
                         f"inputs declare {offset}")
    missing = sorted(specs.keys() - tensors.keys())
    if missing:
        raise BadRequest(f"missing input(s) {missing}")
    batch = check_shapes(tensors, specs, max_batch_size)
    requested, binary_flags, classes = _requested_outputs(request, {s.name for s in outputs})
    refuse_sequences(parameters)
    return InferRequest(id=request_id, inputs=tensors, batch=batch, outputs=requested,
                        binary=binary_flags, classification=classes,
                        binary_default=_flag(parameters, "binary_data_output", "the request"),
                        timeout_us=timeout_us_of(parameters),
                        receipt=_flag(parameters, "receipt", "the request"))


def _parameters(item: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = item.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' of {where} must be an object, got "
                         f"{type(parameters).__name__}")
    return parameters


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key!r} of {where} must be true or false, got "
                         f"{shown(value)}")
    return value


def response_outputs(request: InferRequest, outputs: Mapping[str, np.ndarray],
                     labels: list[str] | None = None) -> dict[str, np.ndarray]:
    """The outputs to return, in order, with the classification extension applied."""
    return {name: classify(outputs[name], request.classification[name], labels)
            if name in request.classification else outputs[name]
            for name in request.outputs or list(outputs)}


def encode_infer_response(model_name: str, request: InferRequest,
                          outputs: Mapping[str, np.ndarray], *,
                          labels: list[str] | None = None,
                          max_json_bytes: int = MAX_JSON_RESPONSE_BYTES
                          ) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs after the JSON). BadRequest
    when the outputs asked for as JSON could take more than ``max_json_bytes``."""
    chosen = response_outputs(request, outputs, labels)
    binary = {name: request.wants_binary(name) for name in chosen}
    check_json_outputs({name: json_bytes_bound(value) for name, value in chosen.items()
                        if not binary[name]}, limit=max_json_bytes)
    entries, chunks = _tensor_entries(chosen, binary)
    head: dict[str, Any] = {"model_name": model_name, "model_version": "1"}
    if request.id is not None:
        head["id"] = request.id
    return _body(head, "outputs", entries, chunks)


def json_output_bounds(request: InferRequest, outputs: list[TensorSpec], *,
                       batching: bool) -> dict[str, int | None]:
    """For each output ``request`` asks for as JSON, the most its data can take (None: not
    known until it runs), from the model's description: checked before anything runs."""
    wanted = request.outputs or [spec.name for spec in outputs]
    specs = {spec.name: spec for spec in outputs}
    return {name: None if name in request.classification else
            spec_json_bytes_bound(specs[name], rows=request.batch, batching=batching)
            for name in wanted if name in specs and not request.wants_binary(name)}


def _tensor_entries(tensors: Mapping[str, np.ndarray], binary: Mapping[str, bool]
                    ) -> tuple[list[str], list[bytes]]:
    """Each tensor's JSON entry (as JSON text), and the binary data of those sent in binary,
    in order."""
    entries, chunks = [], []
    for name, value in tensors.items():
        array = np.asarray(value, order="C")
        entry: dict[str, Any] = {"name": name, "datatype": datatype(wire_dtype(array.dtype)),
                                 "shape": list(array.shape)}
        if binary[name]:
            data = tensor_bytes(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
            entries.append(json_text(entry))
        else:
            entries.append(json_text(entry)[:-1] + ',"data":' + json_data_text(array) + "}")
    return entries, chunks


def _body(head: dict[str, Any], key: str, entries: list[str], chunks: list[bytes]
          ) -> tuple[bytes, dict[str, str]]:
    """``head`` with ``key`` holding the (already encoded) ``entries``, alone or followed by
    binary tensors with the header length the extension uses."""
    text = (json_text(head)[:-1] + ("," if head else "") + f'"{key}":[' + ",".join(entries)
            + "]}").encode()
    if not chunks:
        return text, {"Content-Type": "application/json"}
    return b"".join([text, *chunks]), {"Content-Type": "application/octet-stream",
                                       HEADER_LENGTH: str(len(text))}


def encode_infer_request(inputs: Mapping[str, np.ndarray], *, binary: bool = True,
                         outputs: list[str] | None = None, receipt: bool = False
                         ) -> tuple[bytes, dict[str, str]]:
    """A client's request body and headers (binary tensors after the JSON, or all JSON);
    with ``receipt``, asking for a receipt."""
    entries, chunks = _tensor_entries(inputs, dict.fromkeys(inputs, binary))
    request: dict[str, Any] = {"parameters": {"binary_data_output": binary}}
    if receipt:
        request["parameters"]["receipt"] = True
    if outputs is not None:
        request["outputs"] = [{"name": n} for n in outputs]
    return _body(request, "inputs", entries, chunks)


def decode_infer_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    length = int(header_length) if header_length is not None else len(body)
    response = json.loads(body[:length])
    binary, offset, outputs = body[length:], 0, {}
    for item in response["outputs"]:
        size = (item.get("parameters") or {}).get("binary_data_size")
        if item["datatype"] == "BYTES":
            values = deserialize_bytes(binary[offset:offset + size]) if size is not None \
                else [str(v).encode() for v in item["data"]]
            outputs[item["name"]] = bytes_array(values, item["shape"])
            offset += size or 0
            continue
        dtype = np.dtype(DATATYPES[item["datatype"]])
        if size is not None:
            outputs[item["name"]] = np.frombuffer(binary, dtype=dtype, count=size // dtype.itemsize,
                                                  offset=offset).reshape(item["shape"])
            offset += size
        else:
            outputs[item["name"]] = json_array(item["data"], dtype).reshape(item["shape"])
    return outputs


def _split_body(body: bytes | bytearray, header_length: str | None
                ) -> tuple[bytes | bytearray, memoryview]:
    """The JSON header and a view of the binary data after it (tensors are read from the
    body's own buffer, not from copies of it)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _decode_input(item: dict[str, Any], spec: TensorSpec, binary: memoryview,
                  offset: int, max_elements: int, max_batch_size: int
                  ) -> tuple[np.ndarray, int]:
    name = spec.name
    declared = item.get("datatype")
    if not isinstance(declared, str) or declared not in DATATYPES:
        raise BadRequest(f"input {name!r} has unsupported datatype {shown(declared)} "
                         f"(supported: {', '.join(DATATYPES)})")
    if DATATYPES[declared] != spec.dtype:
        raise BadRequest(f"input {name!r} has datatype {declared}; the model expects "
                         f"{datatype(spec.dtype)}")
    shape = item.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_JSON_DEPTH or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r} needs a shape of non-negative integers, got "
                         f"{shown(shape)}")
    check_shape(name, shape, spec, max_batch_size)  # before anything is allocated
    count = math.prod(shape)  # Python ints: no overflow
    if count > max_elements:
        raise BadRequest(f"input {name!r}: shape {shown(shape)} has {count} elements, more "
                         f"than the model takes ({max_elements})")
    size = _parameters(item, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative "
                             f"integer, got {shown(size)}")
        if offset + size > len(binary):
            raise BadRequest(f"input {name!r}: binary data ends after {len(binary) - offset} "
                             f"of {size} bytes")
        data = binary[offset:offset + size]
        array = _bytes_input(name, data, shape) if spec.dtype == BYTES else \
            _fixed_input(name, data, shape, np.dtype(spec.dtype), declared)
        return array, offset + size
    if "data" not in item:
        raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
    if spec.dtype == BYTES:
        array = _json_bytes_input(name, item["data"], shape)
    else:
        try:
            array = json_array(item["data"], np.dtype(spec.dtype))
        except (ValueError, TypeError, OverflowError) as err:
            raise BadRequest(f"input {name!r}: data is not {declared}: "
                             f"{str(err)[:200]}") from err
    if array.size != count:
        raise BadRequest(f"input {name!r}: {array.size} values for shape {shape} "
                         f"(needs {count})")
    return array.reshape(shape), offset


def _fixed_input(name: str, data: memoryview, shape: list[int], dtype: np.dtype[Any],
                 declared: str) -> np.ndarray:
    count = math.prod(shape)
    if len(data) != count * dtype.itemsize:
        raise BadRequest(f"input {name!r}: binary_data_size is {len(data)} but shape {shape} "
                         f"of {declared} needs {count * dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _bytes_input(name: str, data: memoryview, shape: list[int]) -> np.ndarray:
    try:
        return bytes_array(deserialize_bytes(data), shape)
    except ValueError as err:
        raise BadRequest(f"input {name!r}: {err}") from err


def _json_bytes_input(name: str, data: Any, shape: list[int]) -> np.ndarray:
    """BYTES in JSON: a flat or nested list of strings (UTF-8 on the wire)."""
    items: list[bytes] = []
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(reversed(value))
        elif isinstance(value, str):
            items.append(value.encode())
        else:
            raise BadRequest(f"input {name!r}: BYTES data must be strings, got "
                             f"{type(value).__name__}")
    try:
        return bytes_array(items, shape)
    except ValueError as err:
        raise BadRequest(f"input {name!r}: {err}") from err


def check_shape(name: str, shape: list[int], spec: TensorSpec, max_batch_size: int) -> None:
    batched = max_batch_size > 0
    if len(shape) != len(spec.shape) or any(
            e is not None and e != v and not (batched and axis == 0)
            for axis, (e, v) in enumerate(zip(spec.shape, shape))):
        raise BadRequest(f"input {name!r} has shape {list(shape)}; the model expects "
                         f"{public_shape(spec, batched)}")
    if batched and not 1 <= shape[0] <= max_batch_size:
        raise BadRequest(f"batch size {shape[0]} is outside 1..{max_batch_size} "
                         f"(max_batch_size)")


def check_shapes(tensors: dict[str, np.ndarray], specs: dict[str, TensorSpec],
                  max_batch_size: int) -> int:
    batches = set()
    for name, value in tensors.items():
        check_shape(name, list(value.shape), specs[name], max_batch_size)
        batched = max_batch_size > 0
        if batched:
            batches.add(value.shape[0])
    if not batches:
        return 1
    if len(batches) > 1:
        raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}")
    batch = batches.pop()
    if not 1 <= batch <= max_batch_size:
        raise BadRequest(f"batch size {batch} is outside 1..{max_batch_size} "
                         f"(max_batch_size)")
    return batch


def _requested_outputs(request: dict[str, Any], known: set[str]
                       ) -> tuple[list[str] | None, dict[str, bool], dict[str, int]]:
    items = request.get("outputs")
    if items is None:
        return None, {}, {}
    if not isinstance(items, list):
        raise BadRequest("'outputs' must be a list")
    names, binary, classes = [], {}, {}
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in known:
            raise BadRequest(f"unknown output {shown(name)}; the model's outputs are "
                             f"{sorted(known)}")
        names.append(name)
        parameters = _parameters(item, f"output {name!r}")
        if "binary_data" in parameters:
            binary[name] = _flag(parameters, "binary_data", f"output {name!r}")
        if "classification" in parameters:
            k = parameters["classification"]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_CLASSES:
                raise BadRequest(f"output {name!r}: classification must be an integer in "
                                 f"1..{MAX_CLASSES}, got {shown(k)}")
            classes[name] = k
    return names, binary, classes
