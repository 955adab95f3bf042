"""What travels between the gateway and the stages: five frozen message types (pure).

Requests go down the chain, each to the next role: :class:`Infer` (tensors, with an absolute
deadline and the number of client requests batched in them) or :class:`Describe` (no
tensors; it travels the whole chain and reports every stage). Replies come back on the same
connection under the same request id: :class:`Outputs` (the last stage's tensors, with each
stage's run time in stage order), :class:`Description` (the first stage's inputs, the last
stage's outputs, the stages it passed and each one's report) or :class:`Failure` (a
:class:`~smlaas.errors.Status` and a message fit for a client, never ONNX Runtime's text).

On the wire a message is a :class:`~smlaas.transport.tensors.TensorMessage` whose ``meta``
names its ``kind``; :func:`to_frame` and :func:`from_frame` convert, and :func:`from_frame`
checks every field, so that code above it never reads a dict.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from smlaas.errors import ProtocolError, Status
from smlaas.receipts.claims import Leaf, StageReceipt
from smlaas.transport.tensors import TensorMessage, TensorSpec

__all__ = ["Description", "Describe", "Failure", "Infer", "Message", "Outputs", "ReceiptAsk",
           "Reply", "Request", "Signed", "StageReceipt", "Status", "Step", "StepRow",
           "TensorSpec", "deadline_in", "from_frame", "to_frame"]


@dataclass(frozen=True)
class ReceiptAsk:
    """Receipts wanted for a batch: each request's rows (stacked in order) and salt."""

    rows: tuple[int, ...]
    salts: tuple[bytes, ...]


TOKEN_OUTPUT = "token_ids"
"""The last stage's answer to a step: each row's next token (int64, [rows])."""


@dataclass(frozen=True)
class StepRow:
    """One sequence's row of a generation step (see :class:`Step`)."""

    sequence: str
    """The gateway's id for the sequence (random, never a client's)."""
    past: int
    """Tokens this sequence already holds in every stage's cache."""
    new: int
    """Tokens this step adds (the prompt on a sequence's first step, then 1)."""
    sampling: Mapping[str, Any] | None = None
    """On a sequence's first step: how the last stage chooses its tokens."""


@dataclass(frozen=True)
class Step:
    """A decoder's generation step: its rows are the batch's sequences, in order. Stages
    holding KV caches feed each row's cache and keep what the step adds to it; the last
    stage answers each row's next token. ``ended`` sequences are freed (after the step)."""

    rows: tuple[StepRow, ...]
    ended: tuple[str, ...] = ()


@dataclass(frozen=True)
class Infer:
    """Run these tensors through the rest of the chain by ``deadline`` (Unix seconds)."""

    tensors: Mapping[str, np.ndarray]
    deadline: float
    requests: int = 1
    """Client requests batched in the tensors (for the stages' counts)."""
    stage_ms: tuple[float, ...] = ()
    """Run times of the stages before this one, in stage order."""
    receipt: ReceiptAsk | None = None
    """Each stage signs a receipt for the batch (None: none asked for); a stage's receipt
    follows its batch to the next stage as a :class:`Signed` message."""
    step: Step | None = None
    """A decoder's generation step (None: a stateless inference)."""

    def expired(self) -> bool:
        return time.time() > self.deadline

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.time())

    def after_stage(self, tensors: Mapping[str, np.ndarray], run_ms: float) -> Infer:
        """The request for the next stage: this stage's outputs and its run time added."""
        return Infer(tensors, self.deadline, self.requests, (*self.stage_ms, run_ms),
                     self.receipt, self.step)


@dataclass(frozen=True)
class Signed:
    """A stage's receipt for the batch it sent on under the same request id, sent after
    the batch on the same connection: the next stage needs it only when it signs its own."""

    receipt: StageReceipt


@dataclass(frozen=True)
class Describe:
    """Report every stage, by ``deadline`` (Unix seconds); with ``evidence``, each stage's
    report carries its receipt key's evidence too."""

    deadline: float
    evidence: bool = False
    generation: bool = False
    """Stage 0's report carries the decoder's generation settings and tokenizer."""

    def expired(self) -> bool:
        return time.time() > self.deadline

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.time())


@dataclass(frozen=True)
class Outputs:
    """The pipeline's outputs, and every stage's run time (ms) in stage order."""

    tensors: Mapping[str, np.ndarray]
    stage_ms: tuple[float, ...] = ()
    receipts: tuple[StageReceipt, ...] = ()
    """Every stage's receipt for the batch, when asked for."""
    index: int = 0
    """This request's place in its batch (the batcher sets it when it splits a batch)."""


@dataclass(frozen=True)
class Description:
    """What a describe found: the model's inputs (the first stage's) and outputs (the last
    stage's), the stage indices it passed in order, and each stage replica's report."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    stages: tuple[int, ...] = ()
    stage_stats: tuple[Mapping[str, Any], ...] = ()

    def through(self, index: int, inputs: tuple[TensorSpec, ...],
                report: Mapping[str, Any]) -> Description:
        """This description as stage ``index`` (whose inputs are ``inputs``) passes it on."""
        return Description(inputs, self.outputs, (index, *self.stages),
                           (report, *self.stage_stats))


@dataclass(frozen=True)
class Failure:
    """The request failed: why, in a message fit for the client."""

    status: Status
    message: str
    failed_link: str | None = None
    """The role whose link failed (set by the link that could not deliver or get an answer,
    so that a replica set avoids that replica)."""


Request = Infer | Describe
Reply = Outputs | Description | Failure
Message = Request | Reply | Signed
_KINDS = {Infer: "infer", Describe: "describe", Outputs: "outputs", Description: "description",
          Failure: "failure", Signed: "signed"}


def deadline_in(seconds: float) -> float:
    return time.time() + seconds


def to_frame(request_id: str, message: Message) -> TensorMessage:
    """``message`` as the wire's tensor message under ``request_id``."""
    meta: dict[str, Any] = {"kind": _KINDS[type(message)]}
    tensors: Mapping[str, np.ndarray] = {}
    if isinstance(message, Infer):
        tensors = message.tensors
        meta.update(deadline=message.deadline, requests=message.requests,
                    stage_ms=list(message.stage_ms))
        if message.receipt is not None:
            meta["receipt"] = {"rows": list(message.receipt.rows),
                               "salts": [s.hex() for s in message.receipt.salts]}
        if message.step is not None:
            meta["step"] = {"rows": [[r.sequence, r.past, r.new, r.sampling]
                                     for r in message.step.rows],
                            "ended": list(message.step.ended)}
    elif isinstance(message, Signed):
        meta["receipts"] = [_receipt_json(message.receipt)]
    elif isinstance(message, Describe):
        meta["deadline"] = message.deadline
        if message.evidence:
            meta["evidence"] = True
        if message.generation:
            meta["generation"] = True
    elif isinstance(message, Outputs):
        tensors = message.tensors
        meta["stage_ms"] = list(message.stage_ms)
        if message.receipts:
            meta["receipts"] = [_receipt_json(r) for r in message.receipts]
    elif isinstance(message, Description):
        meta.update(inputs=[s.to_dict() for s in message.inputs],
                    outputs=[s.to_dict() for s in message.outputs],
                    stages=list(message.stages), stage_stats=list(message.stage_stats))
    else:
        meta.update(status=str(message.status), error=message.message)
        if message.failed_link is not None:
            meta["failed_link"] = message.failed_link
    return TensorMessage(request_id, dict(tensors), meta)


def from_frame(frame: TensorMessage) -> Message:
    """The typed message a frame carries; ProtocolError for one that is not well formed."""
    meta = frame.meta
    kind = meta.get("kind")
    try:
        if kind == "infer":
            ask = meta.get("receipt")
            step = meta.get("step")
            return Infer(frame.tensors, _time(meta["deadline"]), _count(meta["requests"]),
                         _milliseconds(meta["stage_ms"]),
                         None if ask is None else _receipt_ask(ask),
                         None if step is None else _step(step))
        if kind == "signed":
            _no_tensors(frame)
            receipts = _receipts(meta["receipts"])
            if len(receipts) != 1:
                raise ValueError("a signed message carries one receipt")
            return Signed(receipts[0])
        if kind == "describe":
            _no_tensors(frame)
            return Describe(_time(meta["deadline"]), meta.get("evidence") is True,
                            meta.get("generation") is True)
        if kind == "outputs":
            return Outputs(frame.tensors, _milliseconds(meta["stage_ms"]),
                           _receipts(meta.get("receipts", [])))
        if kind == "description":
            _no_tensors(frame)
            return Description(_specs(meta["inputs"]), _specs(meta["outputs"]),
                               tuple(_count(i, least=0) for i in _list(meta["stages"])),
                               tuple(_report(r) for r in _list(meta["stage_stats"])))
        if kind == "failure":
            _no_tensors(frame)
            link = meta.get("failed_link")
            return Failure(_status(meta["status"]), _text(meta["error"]),
                           None if link is None else _text(link))
    except (KeyError, ValueError, TypeError, binascii.Error) as err:
        raise ProtocolError(f"a {kind} message is malformed: {err!r}") from err
    raise ProtocolError(f"unknown message kind {kind!r}")


def _receipt_json(receipt: StageReceipt) -> dict[str, Any]:
    return {"cose": base64.b64encode(receipt.cose).decode(),
            "leaves": [[leaf.received.hex(), leaf.sent.hex()] for leaf in receipt.leaves],
            "hashes": [h.hex() for h in receipt.hashes]}


def _receipts(value: Any) -> tuple[StageReceipt, ...]:
    receipts = []
    for item in _list(value):
        if not isinstance(item, dict):
            raise TypeError("a stage receipt is an object")
        leaves = tuple(Leaf(bytes.fromhex(_text(a)), bytes.fromhex(_text(b)))
                       for a, b in _list(item["leaves"]))
        hashes = tuple(bytes.fromhex(_text(h)) for h in _list(item["hashes"]))
        if len(leaves) != len(hashes):
            raise ValueError("a stage receipt's leaves and hashes differ in number")
        receipts.append(StageReceipt(base64.b64decode(_text(item["cose"]), validate=True),
                                     leaves, hashes))
    return tuple(receipts)


def _receipt_ask(value: Any) -> ReceiptAsk:
    if not isinstance(value, dict):
        raise TypeError("a receipt request is an object")
    rows = tuple(_count(r) for r in _list(value["rows"]))
    salts = tuple(bytes.fromhex(_text(s)) for s in _list(value["salts"]))
    if not rows or len(rows) != len(salts):
        raise ValueError("a receipt request needs one salt per request")
    return ReceiptAsk(rows, salts)


def _step(value: Any) -> Step:
    if not isinstance(value, dict):
        raise TypeError("a generation step is an object")
    rows = []
    for item in _list(value["rows"]):
        sequence, past, new, sampling = _list(item)
        if sampling is not None and not isinstance(sampling, dict):
            raise TypeError("a row's sampling is an object")
        rows.append(StepRow(_text(sequence), _count(past, least=0), _count(new), sampling))
    return Step(tuple(rows), tuple(_text(s) for s in _list(value["ended"])))


def _status(value: Any) -> Status:
    for status in Status:
        if status.value == value:
            return status
    raise ValueError(f"not a status: {value!r}")


def _no_tensors(frame: TensorMessage) -> None:
    if frame.tensors:
        raise ValueError("this kind of message carries no tensors")


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise ValueError(f"not a time: {value!r}")
    return float(value)


def _count(value: Any, *, least: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"not a count: {value!r}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"not a list: {value!r}")
    return value


def _milliseconds(value: Any) -> tuple[float, ...]:
    return tuple(_time(v) for v in _list(value))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"not text: {value!r}")
    return value


def _specs(value: Any) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_dict(s) for s in _list(value))


def _report(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"a stage report is not an object: {value!r}")
    return value
