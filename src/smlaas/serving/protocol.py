"""What travels between gateway and stages, on top of tensor messages (pure).

A request carries its tensors and, in ``meta``, an absolute ``deadline`` (Unix seconds). Its
reply comes back on the same connection, with the same id: either the pipeline's outputs with
``stage_ms`` (each stage's run time, in stage order) or no tensors and an ``error`` with a
``status``. A request with ``op: describe`` carries no tensors; it travels the whole pipeline and
comes back with the first stage's inputs and the last stage's outputs, which is also how the
gateway knows every stage is up.
"""

from __future__ import annotations

import time
from typing import Any

from smlaas.transport.tensors import TensorMessage, TensorSpec

__all__ = ["DESCRIBE", "HTTP_STATUS", "Status", "TensorSpec", "deadline_in", "error_reply",
           "expired", "remaining_s"]

DESCRIBE = "describe"


class Status:
    """Why a request failed; the gateway maps each to an HTTP status."""

    BAD_INPUT = "bad_input"
    UNAVAILABLE = "unavailable"
    DEADLINE = "deadline"
    INTERNAL = "internal"


HTTP_STATUS = {Status.BAD_INPUT: 400, Status.UNAVAILABLE: 503, Status.DEADLINE: 504,
               Status.INTERNAL: 500}


def error_reply(request_id: str, status: str, message: str) -> TensorMessage:
    return TensorMessage(request_id, {}, {"error": message, "status": status})


def deadline_in(seconds: float) -> float:
    return time.time() + seconds


def expired(meta: dict[str, Any]) -> bool:
    deadline = meta.get("deadline")
    return deadline is not None and time.time() > float(deadline)


def remaining_s(meta: dict[str, Any], default: float) -> float:
    deadline = meta.get("deadline")
    return default if deadline is None else max(0.0, float(deadline) - time.time())
