"""The Open Inference Protocol (KServe V2) inference request and response, with Triton's
binary tensor extension (pure: bytes in, tensors out, and back).

Binary extension: the request body is ``JSON | tensor bytes...``; the header
``Inference-Header-Content-Length`` gives the JSON's length, and each binary input says its
size in ``parameters.binary_data_size``. Outputs are returned in binary when the request asks
(``parameters.binary_data_output`` or per output ``parameters.binary_data``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smlaas.errors import InputError
from smlaas.serving.protocol import TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
             "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32",
             "INT64": "int64", "FP16": "float16", "FP32": "float32", "FP64": "float64"}
NUMPY_TO_DATATYPE = {v: k for k, v in DATATYPES.items()}


class BadRequest(InputError):
    """An inference request the gateway answers with HTTP 400."""


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

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def datatype(dtype: str) -> str:
    return NUMPY_TO_DATATYPE.get(dtype, dtype.upper())


def public_shape(spec: TensorSpec, batching: bool) -> list[int]:
    """A tensor's shape as clients see it: -1 for dynamic dimensions (the batch one too)."""
    return [-1 if (batching and axis == 0) or d is None else d
            for axis, d in enumerate(spec.shape)]


def parse_infer_request(body: bytes, header_length: str | None, inputs: list[TensorSpec],
                        outputs: list[TensorSpec], *, max_batch_size: int) -> InferRequest:
    """Decodes and checks a request against the model's inputs; BadRequest names what is
    wrong (malformed JSON or binary header, unknown/missing/duplicate tensor, datatype, shape,
    byte count, batch size)."""
    json_part, binary = _split_body(body, header_length)
    try:
        request = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from err
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("request must be a JSON object with an 'inputs' list")
    specs = {s.name: s for s in inputs}
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in request["inputs"]:
        if not isinstance(item, dict):
            raise BadRequest("each input must be a JSON object")
        name = item.get("name")
        if name not in specs:
            raise BadRequest(f"unknown input {name!r}; the model's inputs are "
                             f"{sorted(specs)}")
        if name in tensors:
            raise BadRequest(f"input {name!r} is given twice")
        tensors[name], offset = _decode_input(item, specs[name], binary, offset)
    if offset != len(binary):
        raise BadRequest(f"the request carries {len(binary)} bytes of binary data but its "
                         f"inputs declare {offset}")
    missing = sorted(specs.keys() - tensors.keys())
    if missing:
        raise BadRequest(f"missing input(s) {missing}")
    batch = _check_shapes(tensors, specs, max_batch_size)
    requested, binary_flags = _requested_outputs(request, {s.name for s in outputs})
    parameters = request.get("parameters") or {}
    return InferRequest(id=None if request.get("id") is None else str(request["id"]),
                        inputs=tensors, batch=batch, outputs=requested, binary=binary_flags,
                        binary_default=bool(parameters.get("binary_data_output", False)))


def encode_infer_response(model_name: str, request: InferRequest,
                          outputs: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (binary outputs after the JSON)."""
    names = request.outputs or list(outputs)
    entries, chunks = [], []
    for name in names:
        value = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype(value.dtype.name),
                                 "shape": list(value.shape)}
        if request.wants_binary(name):
            entry["parameters"] = {"binary_data_size": value.nbytes}
            chunks.append(value.tobytes())
        else:
            entry["data"] = value.reshape(-1).tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1",
                                "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return b"".join([head, *chunks]), {"Content-Type": "application/octet-stream",
                                       HEADER_LENGTH: str(len(head))}


def encode_infer_request(inputs: Mapping[str, np.ndarray], *, binary: bool = True,
                         outputs: list[str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A client's request body and headers (binary tensors after the JSON, or all JSON)."""
    entries, chunks = [], []
    for name, value in inputs.items():
        array = np.ascontiguousarray(value)
        entry: dict[str, Any] = {"name": name, "datatype": datatype(array.dtype.name),
                                 "shape": list(array.shape)}
        if binary:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            chunks.append(array.tobytes())
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    request: dict[str, Any] = {"inputs": entries, "parameters": {"binary_data_output": binary}}
    if outputs is not None:
        request["outputs"] = [{"name": n} for n in outputs]
    head = json.dumps(request).encode()
    if not binary:
        return head, {"Content-Type": "application/json"}
    return b"".join([head, *chunks]), {"Content-Type": "application/octet-stream",
                                       HEADER_LENGTH: str(len(head))}


def decode_infer_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    length = int(header_length) if header_length is not None else len(body)
    response = json.loads(body[:length])
    binary, offset, outputs = body[length:], 0, {}
    for item in response["outputs"]:
        dtype = np.dtype(DATATYPES[item["datatype"]])
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            outputs[item["name"]] = np.frombuffer(binary, dtype=dtype, count=size // dtype.itemsize,
                                                  offset=offset).reshape(item["shape"])
            offset += size
        else:
            outputs[item["name"]] = np.asarray(item["data"], dtype=dtype).reshape(item["shape"])
    return outputs


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 <= length <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    return body[:length], body[length:]


def _decode_input(item: dict[str, Any], spec: TensorSpec, binary: bytes,
                  offset: int) -> tuple[np.ndarray, int]:
    name = spec.name
    declared = item.get("datatype")
    if declared not in DATATYPES:
        raise BadRequest(f"input {name!r} has unsupported datatype {declared!r} "
                         f"(supported: {', '.join(DATATYPES)})")
    if DATATYPES[declared] != spec.dtype:
        raise BadRequest(f"input {name!r} has datatype {declared}; the model expects "
                         f"{datatype(spec.dtype)}")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r} needs a shape of non-negative integers, got {shape!r}")
    dtype = np.dtype(spec.dtype)
    count = int(np.prod(shape, dtype=np.int64))
    size = (item.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise BadRequest(f"input {name!r}: binary_data_size is {size} but shape {shape} of "
                             f"{declared} needs {count * dtype.itemsize} bytes")
        if offset + size > len(binary):
            raise BadRequest(f"input {name!r}: binary data ends after {len(binary) - offset} "
                             f"of {size} bytes")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return array, offset + size
    if "data" not in item:
        raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
    try:
        array = np.asarray(item["data"], dtype=dtype)
    except (ValueError, TypeError) as err:
        raise BadRequest(f"input {name!r}: data is not {declared}: {err}") from err
    if array.size != count:
        raise BadRequest(f"input {name!r}: {array.size} values for shape {shape} "
                         f"(needs {count})")
    return array.reshape(shape), offset


def _check_shapes(tensors: dict[str, np.ndarray], specs: dict[str, TensorSpec],
                  max_batch_size: int) -> int:
    batches = set()
    for name, value in tensors.items():
        expected = specs[name].shape
        batched = max_batch_size > 0
        if len(value.shape) != len(expected) or any(
                e is not None and e != v and not (batched and axis == 0)
                for axis, (e, v) in enumerate(zip(expected, value.shape))):
            shown = public_shape(specs[name], batched)
            raise BadRequest(f"input {name!r} has shape {list(value.shape)}; the model "
                             f"expects {shown}")
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
                       ) -> tuple[list[str] | None, dict[str, bool]]:
    items = request.get("outputs")
    if items is None:
        return None, {}
    if not isinstance(items, list):
        raise BadRequest("'outputs' must be a list")
    names, binary = [], {}
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in known:
            raise BadRequest(f"unknown output {name!r}; the model's outputs are "
                             f"{sorted(known)}")
        names.append(name)
        flag = (item.get("parameters") or {}).get("binary_data")
        if flag is not None:
            binary[name] = bool(flag)
    return names, binary
