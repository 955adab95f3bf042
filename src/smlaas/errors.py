"""The one exception tree of smlaas.

::

    SmlaasError                      every error smlaas raises on purpose
     ├─ InputError                   the user gave something unusable (CLI exit code 2)
     │   ├─ ModelError               not an ONNX model, truncated, does not run in ONNX Runtime
     │   │   └─ UnsupportedModelError  a construct unsupported by design (names node, op, why)
     │   ├─ InputSizeError           --input-size does not fit the model's inputs
     │   ├─ GenerationError          a prompt, sampling setting or sequence that cannot be served
     │   ├─ ZooError                 unknown zoo model or bad zoo option
     │   ├─ ConfigError              bad TOML override / preset name
     │   ├─ BuildDirError            build directory cannot be written or read
     │   ├─ BadRequest               an inference request the gateway answers 400
     │   └─ GraphError               graph analysis found an inconsistency in the model
     │       └─ UnknownShapesError   shape inference left activations without a static shape
     ├─ ProfileError                 ONNX Runtime failed while measuring
     ├─ PlanError                    no plan satisfies the constraints, or a plan is invalid
     │   └─ InfeasiblePlanError      a hard constraint (--fit-epc, --machines) cannot be met
     ├─ ExportError                  writing sub-models failed
     ├─ DeployError                  a deployment did not come up in time, or a process died
     ├─ ServingError                 the inference service answered with an error (HTTP status)
     ├─ GatewayError                 the gateway cannot answer a request (HTTP/gRPC status)
     │   ├─ ModelNotFound            no such model or version here
     │   ├─ Unavailable              a stage is down, or the queue is full
     │   │   └─ QueueFull            as many requests wait as the batcher holds
     │   ├─ DeadlineExceeded         no result within the request's deadline
     │   ├─ PipelineFailed           a stage answered with an error
     │   ├─ ClientGone               the client left before its answer
     │   ├─ TooLarge                 a gRPC message larger than the model's can be
     │   └─ TooManyCalls             as many gRPC inferences run as the gateway serves
     ├─ ProtocolError                a peer sent something that is not a valid frame
     ├─ TransportError               the service could not be reached or talked to
     │   ├─ TlsError                 TLS failed (certificate not from the pinned CA, handshake)
     │   └─ RequestTimeout           no answer within the call's deadline
     ├─ QuoteFormatError             bytes that are not a well-formed SGX quote (exit code 2)
     └─ CheckFailed                  a check ran and said "no" (CLI exit code 1)
         ├─ VerificationError        the chain of sub-models differs from the whole model
         ├─ SealError                a sealed file is tampered, swapped, or the key is wrong
         ├─ ReceiptError             a receipt or its chain does not verify (first broken link)
         ├─ CoordinatorRefused       the coordinator answered a request with a refusal (a code)
         └─ AttestationError         a quote, report or collateral failed verification
             ├─ PolicyError          verified evidence that the policy does not accept
             └─ ReleaseError         no current owner release (unsigned, expired, older, other)

Messages say what failed, what was expected against what was found, and how to fix it.

Errors a server answers with carry a :class:`Status`, which knows its HTTP status and gRPC
code: each boundary maps an error once, with :func:`status_of`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class Status(StrEnum):
    """Why a request failed, as the stages, the gateway and both of its protocols report it.

    The value is the name it travels under between the stages; :attr:`http` and
    :attr:`grpc` are the codes a front end answers with (``grpc`` names a
    ``grpc.StatusCode`` member, so that this module imports nothing).
    """

    http: int
    grpc: str

    def __new__(cls, value: str, http: int, grpc: str) -> Status:
        member = str.__new__(cls, value)
        member._value_ = value
        member.http, member.grpc = http, grpc
        return member

    BAD_INPUT = "bad_input", 400, "INVALID_ARGUMENT"
    NOT_FOUND = "not_found", 404, "NOT_FOUND"
    TOO_LARGE = "too_large", 413, "RESOURCE_EXHAUSTED"
    TOO_MANY_CALLS = "too_many_calls", 429, "RESOURCE_EXHAUSTED"
    CLIENT_GONE = "client_gone", 499, "CANCELLED"
    INTERNAL = "internal", 500, "INTERNAL"
    UNAVAILABLE = "unavailable", 503, "UNAVAILABLE"
    DEADLINE = "deadline", 504, "DEADLINE_EXCEEDED"


class SmlaasError(Exception):
    """Base class of every error smlaas raises on purpose."""


class InputError(SmlaasError):
    """The user gave something smlaas cannot use."""


class ModelError(InputError):
    """The model file is not a usable ONNX model."""


class InputSizeError(InputError):
    """An --input-size does not fit the model's inputs."""


class UnsupportedModelError(ModelError):
    """The model uses a construct smlaas does not support by design; the message is one line
    naming the node, its op and why."""


class GenerationError(InputError):
    """Generation parameters, a prompt or a sequence that cannot be served (too long, a bad
    sampling setting); the gateway answers it with HTTP 400."""

    status: ClassVar[Status] = Status.BAD_INPUT


class ZooError(InputError):
    """Unknown zoo model or bad zoo option."""


class ConfigError(InputError):
    """A preset name or a TOML override is not valid."""


class BuildDirError(InputError):
    """A build directory cannot be written or does not hold a build."""


class GraphError(InputError):
    """Graph analysis found an inconsistency in the model (a cycle, a tensor nothing
    produces): the model is unusable as given."""


class UnknownShapesError(GraphError):
    """Shape inference left some activations without a static shape."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        shown = ", ".join(repr(n) for n in names[:5])
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        super().__init__(f"no static shape for {shown}{more}")


class ProfileError(SmlaasError):
    """ONNX Runtime failed while measuring a model."""


class PlanError(SmlaasError):
    """A plan is invalid or cannot be made."""


class InfeasiblePlanError(PlanError):
    """A hard planning constraint cannot be met."""


class ExportError(SmlaasError):
    """Writing the sub-models or the build directory failed."""


class DeployError(SmlaasError):
    """A deployment did not come up (a process died, or readiness missed its deadline)."""


class ServingError(SmlaasError):
    """The inference service answered a request with an error (carries the HTTP status)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ProtocolError(SmlaasError):
    """A peer sent something that is not a valid frame, or closed mid-frame."""


class BadRequest(InputError):
    """An inference request the gateway answers with HTTP 400 (gRPC INVALID_ARGUMENT)."""

    status: ClassVar[Status] = Status.BAD_INPUT


class GatewayError(SmlaasError):
    """The gateway cannot answer a request; each subclass knows its :class:`Status`."""

    status: Status = Status.INTERNAL


class ModelNotFound(GatewayError):
    """No such model or version here."""

    status = Status.NOT_FOUND


class Unavailable(GatewayError):
    """The pipeline cannot answer now (a stage is down, or the queue is full)."""

    status = Status.UNAVAILABLE


class QueueFull(Unavailable):
    """As many requests wait as the batcher holds."""


class DeadlineExceeded(GatewayError):
    """No result within the request's deadline."""

    status = Status.DEADLINE


class PipelineFailed(GatewayError):
    """A stage answered the request with an error (its status says which kind)."""

    def __init__(self, message: str, *, status: Status) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(GatewayError):
    """The client closed its connection before its answer was ready (nobody to answer)."""

    status = Status.CLIENT_GONE


class TooLarge(GatewayError):
    """A gRPC message is larger than this model's requests (or responses) can be."""

    status = Status.TOO_LARGE


class TooManyCalls(GatewayError):
    """As many gRPC inferences are running as the gateway serves at once."""

    status = Status.TOO_MANY_CALLS


def status_of(err: BaseException) -> Status:
    """The status a server answers ``err`` with: its own, else INTERNAL."""
    status = getattr(err, "status", None)
    return status if isinstance(status, Status) else Status.INTERNAL


class TransportError(SmlaasError):
    """The service could not be reached, or the connection failed mid-request."""


class TlsError(TransportError):
    """TLS failed: the server's certificate is not from the pinned CA, or the handshake."""


class RequestTimeout(TransportError):
    """No answer within the call's deadline."""


class CheckFailed(SmlaasError):
    """A check ran to completion and its answer is no."""


class VerificationError(CheckFailed):
    """The chain of sub-models does not compute what the whole model computes."""


class QuoteFormatError(InputError):
    """Bytes that are not a well-formed SGX quote or attestation report."""


class AttestationError(CheckFailed):
    """A quote, an attestation report or its collateral failed verification."""


class PolicyError(AttestationError):
    """Evidence verified, but the attestation policy does not accept it."""


class ReleaseError(AttestationError):
    """The owner's release is missing, malformed, not the owner's, expired, for another
    manifest, or older than one already seen."""


class ReceiptError(CheckFailed):
    """A receipt, its chain or its evidence does not verify (the message names the first
    broken link)."""


class SealError(CheckFailed):
    """A sealed file was changed, is not the expected stage, or the key does not fit."""


class CoordinatorRefused(CheckFailed):
    """The coordinator refused a request; ``code`` says why in machine-readable form
    (``no_manifest``, ``bad_nonce``, ``not_accepted``, ``malformed``, ... see
    :mod:`smlaas.coordinator.protocol`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
