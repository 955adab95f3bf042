"""HTTP content coding of V2 bodies (gzip, deflate): requests decompressed never past what the
model can take, responses compressed only when that helps (pure)."""

from __future__ import annotations

import gzip
import zlib

from smlaas.errors import BadRequest

CONTENT_ENCODINGS = ("gzip", "deflate")


def decode_content(body: bytes, encoding: str | None, *, limit: int) -> bytes:
    """The body a ``Content-Encoding`` (gzip or deflate) stands for, never expanded past
    ``limit`` bytes (a compressed bomb is refused, not inflated)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in CONTENT_ENCODINGS:
        raise BadRequest(f"unsupported Content-Encoding {encoding!r} (supported: gzip, "
                         f"deflate)")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise BadRequest(f"the {encoding} body does not decompress: {err}") from err
    if len(plain) > limit or inflater.unconsumed_tail:
        raise BadRequest(f"the {encoding} body expands past the {limit} bytes this model's "
                         f"inputs can take")
    if not inflater.eof:
        raise BadRequest(f"the {encoding} body is truncated")
    return plain


COMPRESSIBILITY_SAMPLE_BYTES = 16 * 1024
COMPRESSIBLE_RATIO = 0.9


def worth_compressing(body: bytes) -> bool:
    """Whether a sample of ``body`` shrinks by 10% at the fastest level: raw float tensors do
    not, and compressing a 600 KB one cost the gateway ~5 ms per request for nothing."""
    sample = body[:COMPRESSIBILITY_SAMPLE_BYTES]
    return len(zlib.compress(sample, 1)) < COMPRESSIBLE_RATIO * len(sample)


def encode_content(body: bytes, accept_encoding: str | None, *,
                   judged_by: bytes | None = None) -> tuple[bytes, str | None]:
    """The body compressed as the client accepts (gzip preferred), and its encoding; as is
    when it (or ``judged_by``: the response without its receipt, whose base64 alone would
    make raw tensors look compressible) would not shrink (:func:`worth_compressing`)."""
    accepted = {part.split(";")[0].strip().lower() for part in (accept_encoding or "").split(",")}
    if not accepted & {"gzip", "deflate"} or not worth_compressing(
            body if judged_by is None else judged_by):
        return body, None
    if "gzip" in accepted:
        return gzip.compress(body, compresslevel=1), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, None
