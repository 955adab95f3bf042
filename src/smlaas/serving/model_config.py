"""A served model as the V2 protocol describes it (pure): its metadata, and Triton's model
configuration (the JSON form of its ``ModelConfig``), from the inputs and outputs the pipeline
describes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smlaas.transport.tensors import BYTES, TensorSpec
from smlaas.transport.v2 import datatype, public_shape

PLATFORM = "onnxruntime_onnx"

__all__ = ["model_config", "model_metadata"]


def model_metadata(name: str, version: str, inputs: Sequence[TensorSpec],
                   outputs: Sequence[TensorSpec], *, batching: bool) -> dict[str, Any]:
    """The V2 model metadata: each tensor's datatype and shape, -1 where dynamic."""
    def tensor(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": datatype(spec.dtype),
                "shape": public_shape(spec, batching)}

    return {"name": name, "versions": [version], "platform": PLATFORM,
            "inputs": [tensor(s) for s in inputs], "outputs": [tensor(s) for s in outputs]}


def model_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], *,
                 max_batch_size: int, max_queue_delay_us: int, decoupled: bool = False
                 ) -> dict[str, Any]:
    """Triton's model configuration. As in Triton, with batching on (``max_batch_size`` > 0)
    ``dims`` leave out the batch dimension; a dynamic dimension is -1. A ``decoupled`` model
    (a decoder: a response per token) has every input optional."""
    batching = max_batch_size > 0

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        """A tensor as Triton's ModelInput/ModelOutput (``TYPE_STRING`` for BYTES)."""
        dims = public_shape(spec, batching)[1 if batching else 0:]
        kind = "STRING" if spec.dtype == BYTES else datatype(spec.dtype)
        return {"name": spec.name, "data_type": f"TYPE_{kind}", "dims": dims}

    config: dict[str, Any] = {
        "name": name, "platform": PLATFORM, "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}}, "max_batch_size": max_batch_size,
        "input": [{**tensor(s), **({"optional": True} if decoupled
                                   else {"format": "FORMAT_NONE"})} for s in inputs],
        "output": [tensor(s) for s in outputs]}
    if decoupled:
        config["model_transaction_policy"] = {"decoupled": True}
    elif batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": max_queue_delay_us}
    return config
