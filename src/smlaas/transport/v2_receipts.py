"""A receipt as the V2 REST response parameter ``receipt`` (base64), and the response it
covers: the body without it (:mod:`smlaas.receipts`)."""

from __future__ import annotations

import base64

from smlaas.transport.v2 import HEADER_LENGTH


def with_receipt(body: bytes, headers: dict[str, str], receipt: bytes
                 ) -> tuple[bytes, dict[str, str]]:
    """The response ``body`` (as :func:`encode_infer_response` made it) with the response
    parameter ``receipt`` (base64) appended to its JSON part: the receipt covers ``body``
    exactly, which :func:`without_receipt` gives back."""
    length = int(headers.get(HEADER_LENGTH, len(body)))
    head, rest = body[:length], body[length:]
    suffix = (',"parameters":{"receipt":"' + base64.b64encode(receipt).decode() + '"}}'
              ).encode()
    text = head[:-1] + suffix
    if HEADER_LENGTH in headers:
        headers = {**headers, HEADER_LENGTH: str(len(text))}
    return text + rest, headers


def without_receipt(body: bytes, header_length: str | None) -> tuple[bytes, bytes | None]:
    """The response as the receipt covers it (the ``receipt`` parameter taken out) and the
    receipt; ``(body, None)`` when it carries none."""
    length = int(header_length) if header_length is not None else len(body)
    head, rest = body[:length], body[length:]
    marker = b',"parameters":{"receipt":"'
    at = head.rfind(marker)
    if at < 0 or not head.endswith(b'"}}'):
        return body, None
    receipt = base64.b64decode(head[at + len(marker):-3])
    return head[:at] + b"}" + rest, receipt
