"""The V2 request parameters both front ends check the same way: ``timeout``, the sequence
parameters a stateless model refuses, and how a client's value is shown in a message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smlaas.errors import BadRequest

SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def shown(value: Any) -> str:
    """A client's value in a message: short, whatever it is."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def timeout_us_of(parameters: Mapping[str, Any]) -> int:
    """The `timeout` request parameter in microseconds (0: none; Triton's is a uint64);
    BadRequest if malformed."""
    value = parameters.get("timeout", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise BadRequest(f"parameter 'timeout' must be a non-negative 64-bit integer number "
                         f"of microseconds (0: the gateway's deadline), got {shown(value)}")
    return value


def refuse_sequences(parameters: Mapping[str, Any]) -> None:
    """Sequence parameters ask for a stateful model's sequence batcher; saying "no sequence"
    (an id of 0 or "", start and end false, as tritonclient does by default) is allowed."""
    for key in SEQUENCE_PARAMETERS:
        value = parameters.get(key)
        if value is not None and value is not False and value != 0 and value != "":
            raise BadRequest(f"parameter {key!r} ({shown(value)}) asks for sequence batching, "
                             f"which this model does not have (it keeps no state between "
                             f"requests); send the request without sequence_id, "
                             f"sequence_start and sequence_end")
