"""The gateway's gRPC front end: the KServe V2 / Triton ``inference.GRPCInferenceService``
(the generated stubs ``tritonclient[grpc]`` ships) over TLS with the gateway's attested key,
on the same :class:`~smlaas.serving.data_plane.DataPlane` as REST (one batcher, one set of
limits, metrics and statistics), so ``tritonclient.grpc`` works unchanged.

A ``ModelInfer`` request is turned into the V2 REST codec's input (a JSON header with
``binary_data_size`` for raw contents, ``data`` for typed contents) and decoded by the very
same parser, so both protocols accept and refuse exactly the same requests. Errors map at this
boundary: bad input ``INVALID_ARGUMENT``, unknown model ``NOT_FOUND``, a stage down or a full
queue ``UNAVAILABLE``, a missed deadline ``DEADLINE_EXCEEDED``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from smlaas.errors import SmlaasError
from smlaas.serving.data_plane import MODEL_VERSION, DataPlane, error_codes
from smlaas.transport.tensors import serialize_bytes, wire_dtype
from smlaas.transport.v2 import (
    BadRequest,
    datatype,
    parse_infer_request,
    response_outputs,
    tensor_bytes,
)

logger = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""gRPC's own cap; the data plane's limits (from the model) are checked on every request."""
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents"}


class GrpcEndpoints(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The V2 gRPC calls over a data plane; its exceptions become gRPC codes here only."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC names
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=await self.plane.ready() is None)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        await self._guard(context, self.plane.check_model, request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=await self.plane.ready() is None)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerMetadataResponse(**self.plane.server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        metadata = await self._guard_async(context, self.plane.model_metadata(
            request.name, request.version))
        return json_format.ParseDict(metadata, service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        config = await self._guard(context, self.plane.model_config, request.name,
                                   request.version)
        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(
            config, model_config_pb2.ModelConfig()))

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        stats = await self._guard(context, self.plane.model_statistics, request.name,
                                  request.version)
        return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        state = "READY" if await self.plane.ready() is None else "UNAVAILABLE"
        return service_pb2.RepositoryIndexResponse(models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(
                name=self.plane.name, version=MODEL_VERSION, state=state)])

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        plane, started = self.plane, time.perf_counter()
        try:
            plane.check_model(request.model_name, request.model_version)
            limits = await plane.limits()
            specs = await plane.specs()
            body, header_length = _as_v2_body(request, limits.max_body_bytes)
            decoded_at = time.perf_counter()
            parsed = await plane.decode(lambda: parse_infer_request(
                body, header_length, specs.inputs, specs.outputs,
                max_batch_size=plane.settings.max_batch_size, limits=limits))
            decode_s = time.perf_counter() - decoded_at
            outputs = await plane.infer(parsed)
        except SmlaasError as err:
            status, code = error_codes(err)
            plane.record(code=str(status), ok=False, started=started,
                         unknown_model=status == 404)
            await context.abort(getattr(grpc.StatusCode, code), str(err))
            raise AssertionError("unreachable: abort raises") from err
        encoded_at = time.perf_counter()
        response = service_pb2.ModelInferResponse(
            model_name=plane.name, model_version=MODEL_VERSION, id=request.id)
        for name, value in response_outputs(parsed, outputs, plane.labels).items():
            value = np.asarray(value, order="C")
            response.outputs.add(name=name, shape=list(value.shape),
                                 datatype=datatype(wire_dtype(value.dtype)))
            response.raw_output_contents.append(tensor_bytes(value))
        plane.record(code="200", ok=True, started=started, decode_s=decode_s,
                     encode_s=time.perf_counter() - encoded_at)
        return response

    @staticmethod
    async def _guard(context: Any, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except SmlaasError as err:
            await context.abort(getattr(grpc.StatusCode, error_codes(err)[1]), str(err))

    @staticmethod
    async def _guard_async(context: Any, awaitable: Any) -> Any:
        try:
            return await awaitable
        except SmlaasError as err:
            await context.abort(getattr(grpc.StatusCode, error_codes(err)[1]), str(err))


def _as_v2_body(request: Any, max_bytes: int) -> tuple[bytes, str]:
    """The V2 REST body equal to a gRPC ModelInferRequest (raw contents as binary tensors,
    typed contents as JSON data), for the shared parser."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    if sum(len(r) for r in raw) > max_bytes:
        raise BadRequest(f"the inputs exceed the {max_bytes} bytes this model can take")
    items: list[dict[str, Any]] = []
    binary: list[bytes] = []
    for index, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                "shape": list(tensor.shape)}
        data = raw[index] if raw else None
        if data is None and tensor.datatype == "BYTES":  # bytes_contents: any bytes, not JSON
            data = serialize_bytes(np.array(list(tensor.contents.bytes_contents) or [],
                                            dtype=object))
        if data is not None:
            item["parameters"] = {"binary_data_size": len(data)}
            binary.append(data)
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise BadRequest(f"input {tensor.name!r}: datatype {tensor.datatype!r} has no "
                                 f"typed contents; send raw_input_contents")
            item["data"] = list(getattr(tensor.contents, field))
        items.append(item)
    outputs = [{"name": o.name, **({"parameters": {"classification": int(
        o.parameters["classification"].int64_param)}} if "classification" in o.parameters
        else {})} for o in request.outputs]
    header = json.dumps({"inputs": items, **({"outputs": outputs} if outputs else {}),
                         "parameters": {"binary_data_output": True}}).encode()
    if sum(len(b) for b in binary) > max_bytes:
        raise BadRequest(f"the inputs exceed the {max_bytes} bytes this model can take")
    return header + b"".join(binary), str(len(header))


def create_grpc_server(plane: DataPlane, *, host: str, port: int, certificate_chain_pem: bytes,
                       key_pem: bytes) -> grpc.aio.Server:
    """A TLS gRPC server for ``plane`` on ``host:port`` (start it with ``await start()``)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcEndpoints(plane), server)
    credentials = grpc.ssl_server_credentials([(key_pem, certificate_chain_pem)])
    server.add_secure_port(f"{host}:{port}", credentials)
    return server
