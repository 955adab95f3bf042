"""Inference over the Open Inference Protocol, binary tensors by default, attested by default.

Before its first request a client attests the gateway (:meth:`InferenceClient.attest`): the
gateway's quote must pass the policy for role ``gateway`` and bind the key of the certificate
serving the connection, the owner's release the gateway staples must be the owner's current
one for the manifest the gateway was admitted under (:mod:`smlaas.client.release_check`; the
client is configured with the owner's public key for this), and from then on every response
must come from that same certificate. ``attest=False`` skips all of this (the client then
trusts whoever the pinned CA vouches for); ``check_release=False`` skips the release check
only (the client then accepts any deployment of the pinned code, stale ones included).
``roots`` are the attestation roots quotes must chain to (default: Intel's only; a sim
deployment's clients pass its simulation root, as ``smlaas infer`` and
``Deployment.client()`` do).

Errors (one tree, :mod:`smlaas.errors`): ServingError (the gateway answered an error, with its
HTTP status), TlsError (the server's certificate is not from the pinned CA, or the handshake
failed), RequestTimeout, TransportError (cannot connect, connection lost), AttestationError or
PolicyError (evidence failed), ConfigError (bad arguments). Never a raw httpx exception.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import httpx
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smlaas.client.generate import (
    Generation,
    GenerationPiece,
    astream_pieces,
    generate_request,
    parse_generation,
    stream_pieces,
)
from smlaas.client.release_check import ReleaseCheck
from smlaas.coordinator.release import Release
from smlaas.enclave.attestation import attest as attest_evidence
from smlaas.enclave.keys import spki_sha256
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import (
    INTEL_ROOT,
    QuoteVerdict,
    TrustedRoot,
    load_collateral,
)
from smlaas.errors import (
    AttestationError,
    ConfigError,
    InputError,
    RequestTimeout,
    ServingError,
    TlsError,
    TransportError,
)
from smlaas.transport.tls import certificate_manifest
from smlaas.transport.v2 import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
)
from smlaas.transport.v2_receipts import without_receipt
from smlaas.version_memory import VersionMemory

ATTESTATION_PATH = "/v2/smlaas/attestation"
EVIDENCE_PATH = "/v2/smlaas/evidence"
RECHECK_S = 300.0
"""A client attests the gateway (and checks the owner's release) again after this long."""


class _ClientCore:
    """What the sync and async clients share: settings, checks, error mapping (no I/O)."""

    def __init__(self, url: str, *, ca: str | Path, policy: Policy | None,
                 roots: list[TrustedRoot] | None, attest: bool, manifest_digest: str | None,
                 model: str | None, timeout_s: float, owner_public_key: str | Path | None,
                 check_release: bool, releases: VersionMemory | None) -> None:
        if not url.startswith("https://"):
            raise ConfigError(f"the gateway URL must be https:// (got {url!r}): smlaas serves "
                              f"only over TLS with the deployment CA")
        if attest and policy is None:
            raise ConfigError("attesting the gateway needs a policy (the gateway measurement "
                              "to accept: `smlaas deploy` writes gateway-policy.toml); or pass "
                              "attest=False")
        self.url = url.rstrip("/")
        try:
            self._context = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"cannot load the CA {ca}: {err}") from err
        if attest and check_release and owner_public_key is None:
            raise ConfigError("attesting the gateway needs the owner's public key, to accept "
                              "only the owner's current release (owner.pub beside the CA "
                              "`smlaas deploy` wrote, or `smlaas owner show`); or pass "
                              "check_release=False")
        self.policy, self.manifest_digest = policy, manifest_digest
        self.roots = roots if roots is not None else [INTEL_ROOT]
        self.release_check = ReleaseCheck(str(owner_public_key), roots=self.roots,
                                          memory=releases) \
            if attest and check_release and owner_public_key is not None else None
        self.release: Release | None = None
        """The owner's release the attested gateway is under (after attestation)."""
        self._attested_at = 0.0
        self.attest_first = attest
        self.timeout_s = timeout_s
        self._model = model
        self._attested: bytes | None = None
        """DER of the certificate whose quote passed; every response must come from it."""
        self.verdict: QuoteVerdict | None = None

    def _check_evidence(self, response: httpx.Response, policy: Policy,
                        roots: list[TrustedRoot], manifest_digest: str | None) -> QuoteVerdict:
        evidence = self._checked(response, pinned=False).json()
        peer = _peer_certificate(response)
        try:
            served = x509.load_pem_x509_certificate(str(evidence["certificate"]).encode())
            quote = base64.b64decode(evidence["quote"])
            collateral = load_collateral(str(evidence["collateral"]), source="gateway")
        except (KeyError, TypeError, ValueError, InputError) as err:
            raise AttestationError(f"the gateway's evidence is malformed: {err}") from err
        served_der = served.public_bytes(serialization.Encoding.DER)
        if peer is None or peer != served_der:
            raise AttestationError("the evidence names another certificate than the one "
                                   "serving this connection")
        admitted = certificate_manifest(served)
        if admitted is None:
            raise AttestationError("the gateway's certificate names no manifest")
        if manifest_digest is not None and admitted != manifest_digest:
            raise AttestationError(f"the gateway was admitted under manifest {admitted}, not "
                                   f"{manifest_digest}")
        verdict = attest_evidence(quote, collateral, policy=policy, roots=roots, role="gateway",
                                  expected_report_data=spki_sha256(served.public_key()),
                                  whose="the gateway's")
        if self.release_check is not None:
            self.release = self.release_check.check(evidence.get("release"),
                                                    admitted_manifest=admitted,
                                                    simulated=verdict.simulated)
        self._attested, self.verdict = served_der, verdict
        self._attested_at = time.time()
        return verdict

    def _needs_attestation(self) -> bool:
        """Before the first request, and again once the release it accepted expired or
        RECHECK_S passed (a long-lived client follows the owner's current release too)."""
        if not self.attest_first:
            return False
        if self._attested is None:
            return True
        now = time.time()
        if (self.release is not None and self.release.expired(now)) or \
                now - self._attested_at >= RECHECK_S:
            self._attested = None
            return True
        return False

    def _checked(self, response: httpx.Response, *, pinned: bool = True) -> httpx.Response:
        if pinned and self._attested is not None and \
                _peer_certificate(response) not in (None, self._attested):
            raise AttestationError("the gateway's certificate changed since it was attested")
        if response.status_code != 200:
            try:
                message = str(response.json().get("error", response.text))
            except ValueError:
                message = response.text
            raise ServingError(f"HTTP {response.status_code}: {message}",
                               status=response.status_code)
        return response

    def _model_from_index(self, response: httpx.Response) -> str:
        index = self._checked(response).json()
        if len(index) != 1:
            raise ServingError(f"the gateway serves {len(index)} models; name one",
                               status=400)
        self._model = str(index[0]["name"])
        return self._model

    def _transport_error(self, err: httpx.HTTPError) -> Exception:
        """The typed error for an httpx failure, in one line."""
        text = str(err) or type(err).__name__
        if isinstance(err, httpx.TimeoutException):
            return RequestTimeout(f"no answer from {self.url} in time ({text})")
        if isinstance(err, httpx.ConnectError) and ("CERTIFICATE" in text or "SSL" in text):
            return TlsError(f"TLS with {self.url} failed: {text.splitlines()[0]} (is --ca the "
                            f"deployment CA that `smlaas deploy` printed?)")
        if isinstance(err, httpx.ConnectError):
            return TransportError(f"cannot connect to {self.url}: {text.splitlines()[0]}")
        return TransportError(f"the request to {self.url} failed: {text.splitlines()[0]}")


class InferenceClient(_ClientCore):
    """A blocking client (see the module docstring)."""

    def __init__(self, url: str, *, ca: str | Path, policy: Policy | None = None,
                 roots: list[TrustedRoot] | None = None, attest: bool = True,
                 manifest_digest: str | None = None, model: str | None = None,
                 timeout_s: float = 60.0, owner_public_key: str | Path | None = None,
                 check_release: bool = True, releases: VersionMemory | None = None,
                 receipts: bool = False) -> None:
        super().__init__(url, ca=ca, policy=policy, roots=roots, attest=attest,
                         manifest_digest=manifest_digest, model=model, timeout_s=timeout_s,
                         owner_public_key=owner_public_key, check_release=check_release,
                         releases=releases)
        self.receipts = receipts
        self._http = httpx.Client(base_url=self.url, verify=self._context, timeout=timeout_s)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, *, timeout_s: float | None = None,
              stream: bool = False, **kwargs: Any) -> httpx.Response:
        if path != ATTESTATION_PATH and self._needs_attestation():
            assert self.policy is not None  # checked in __init__
            self.attest(self.policy, self.roots, manifest_digest=self.manifest_digest)
        try:
            return self._http.send(self._http.build_request(
                method, path, timeout=timeout_s or self.timeout_s, **kwargs), stream=stream)
        except httpx.HTTPError as err:
            raise self._transport_error(err) from err

    @property
    def model(self) -> str:
        return self._model or self._model_from_index(self._send("POST", "/v2/repository/index"))

    def ready(self) -> bool:
        """Whether the gateway is ready through every stage (transport failures raise)."""
        return self._send("GET", "/v2/health/ready").status_code == 200

    def metadata(self) -> dict[str, Any]:
        return dict(self._checked(self._send("GET", f"/v2/models/{self.model}")).json())

    def infer(self, inputs: Mapping[str, np.ndarray], *, binary: bool = True,
              outputs: list[str] | None = None, timeout_s: float | None = None
              ) -> InferResult:
        """Runs the model on named ``inputs``; returns its outputs by name (with
        ``receipts``, and its ``receipt``)."""
        body, headers = encode_infer_request(inputs, binary=binary, outputs=outputs,
                                             receipt=self.receipts)
        response = self._checked(self._send("POST", f"/v2/models/{self.model}/infer",
                                            content=body, headers=headers,
                                            timeout_s=timeout_s))
        return _result(body, response, receipts=self.receipts)

    @overload
    def generate(self, prompt: str | list[int], *, max_tokens: int = ...,
                 temperature: float = ..., top_k: int = ..., top_p: float = ...,
                 seed: int | None = ..., stream: Literal[False] = ...) -> Generation: ...

    @overload
    def generate(self, prompt: str | list[int], *, max_tokens: int = ...,
                 temperature: float = ..., top_k: int = ..., top_p: float = ...,
                 seed: int | None = ..., stream: Literal[True]) -> Iterator[GenerationPiece]: ...

    def generate(self, prompt: str | list[int], *, max_tokens: int = 16,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stream: bool = False
                 ) -> Generation | Iterator[GenerationPiece]:
        """New tokens after ``prompt`` (text, or token ids), greedy by default; with
        ``stream``, an iterator of pieces as they arrive (closing it early ends the
        generation). See :mod:`smlaas.client.generate`."""
        body = generate_request(prompt, max_tokens=max_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)
        path = f"/v2/models/{self.model}/generate" + ("_stream" if stream else "")
        response = self._send("POST", path, json=body, stream=stream)
        if not stream:
            return parse_generation(self._checked(response).json())
        return stream_pieces(response, checked=self._checked,
                             transport_error=self._transport_error)

    def evidence(self) -> bytes:
        """The evidence the gateway's receipts refer to (CBOR; see :mod:`smlaas.receipts`)."""
        return self._checked(self._send("GET", EVIDENCE_PATH)).content

    def attest(self, policy: Policy, roots: list[TrustedRoot], *,
               manifest_digest: str | None = None) -> QuoteVerdict:
        """Verifies the gateway's quote against ``policy`` (role ``gateway``) and that its
        report_data binds the key of the certificate this connection is talking to; with
        ``manifest_digest``, also that the coordinator admitted it under that manifest."""
        return self._check_evidence(self._send("GET", ATTESTATION_PATH), policy, roots,
                                    manifest_digest)


class AsyncInferenceClient(_ClientCore):
    """The same surface for asyncio (``async with``, ``await client.infer(...)``)."""

    def __init__(self, url: str, *, ca: str | Path, policy: Policy | None = None,
                 roots: list[TrustedRoot] | None = None, attest: bool = True,
                 manifest_digest: str | None = None, model: str | None = None,
                 timeout_s: float = 60.0, owner_public_key: str | Path | None = None,
                 check_release: bool = True, releases: VersionMemory | None = None,
                 receipts: bool = False) -> None:
        super().__init__(url, ca=ca, policy=policy, roots=roots, attest=attest,
                         manifest_digest=manifest_digest, model=model, timeout_s=timeout_s,
                         owner_public_key=owner_public_key, check_release=check_release,
                         releases=releases)
        self.receipts = receipts
        self._http = httpx.AsyncClient(base_url=self.url, verify=self._context,
                                       timeout=timeout_s)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, *, timeout_s: float | None = None,
                    stream: bool = False, **kwargs: Any) -> httpx.Response:
        if path != ATTESTATION_PATH and self._needs_attestation():
            assert self.policy is not None  # checked in __init__
            await self.attest(self.policy, self.roots, manifest_digest=self.manifest_digest)
        try:
            return await self._http.send(self._http.build_request(
                method, path, timeout=timeout_s or self.timeout_s, **kwargs), stream=stream)
        except httpx.HTTPError as err:
            raise self._transport_error(err) from err

    async def generate(self, prompt: str | list[int], *, max_tokens: int = 16,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int | None = None) -> Generation:
        """:meth:`InferenceClient.generate`, whole."""
        body = generate_request(prompt, max_tokens=max_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)
        response = await self._send("POST", f"/v2/models/{await self.model()}/generate",
                                    json=body)
        return parse_generation(self._checked(response).json())

    async def generate_stream(self, prompt: str | list[int], *, max_tokens: int = 16,
                              temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                              seed: int | None = None) -> AsyncIterator[GenerationPiece]:
        """The pieces as they arrive (``async for``; leaving early ends the generation)."""
        body = generate_request(prompt, max_tokens=max_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed)
        response = await self._send("POST", f"/v2/models/{await self.model()}/generate_stream",
                                    json=body, stream=True)
        async for piece in astream_pieces(response, checked=self._checked,
                                          transport_error=self._transport_error):
            yield piece

    async def model(self) -> str:
        return self._model or self._model_from_index(
            await self._send("POST", "/v2/repository/index"))

    async def ready(self) -> bool:
        return (await self._send("GET", "/v2/health/ready")).status_code == 200

    async def metadata(self) -> dict[str, Any]:
        return dict(self._checked(await self._send("GET",
                                                   f"/v2/models/{await self.model()}")).json())

    async def infer(self, inputs: Mapping[str, np.ndarray], *, binary: bool = True,
                    outputs: list[str] | None = None, timeout_s: float | None = None
                    ) -> InferResult:
        body, headers = encode_infer_request(inputs, binary=binary, outputs=outputs,
                                             receipt=self.receipts)
        response = self._checked(await self._send(
            "POST", f"/v2/models/{await self.model()}/infer", content=body, headers=headers,
            timeout_s=timeout_s))
        return _result(body, response, receipts=self.receipts)

    async def evidence(self) -> bytes:
        return self._checked(await self._send("GET", EVIDENCE_PATH)).content

    async def attest(self, policy: Policy, roots: list[TrustedRoot], *,
                     manifest_digest: str | None = None) -> QuoteVerdict:
        response = await self._send("GET", ATTESTATION_PATH)
        # Quote verification and asking the coordinator for the current release block:
        # off the event loop.
        return await asyncio.to_thread(self._check_evidence, response, policy, roots,
                                       manifest_digest)


@dataclass(frozen=True)
class Receipt:
    """A result's receipt and the exact bytes it covers; :meth:`save` writes the directory
    ``smlaas receipt verify`` checks (with the evidence from :meth:`InferenceClient.evidence`)."""

    cose: bytes
    request: bytes
    response: bytes

    def save(self, directory: str | Path, evidence: bytes) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for name, data in (("receipt.cose", self.cose), ("evidence.cbor", evidence),
                           ("request.bin", self.request), ("response.bin", self.response)):
            (path / name).write_bytes(data)
        return path


class InferResult(dict[str, np.ndarray]):
    """The outputs by name; ``receipt`` when the client asked for receipts."""

    receipt: Receipt | None = None


def _result(request: bytes, response: httpx.Response, *, receipts: bool) -> InferResult:
    header_length = response.headers.get(HEADER_LENGTH)
    covered, cose = without_receipt(response.content, header_length) if receipts else \
        (response.content, None)
    if receipts and cose is None:
        raise ServingError("the gateway answered without the receipt asked for", status=502)
    result = InferResult(decode_infer_response(response.content, header_length))
    if cose is not None:
        result.receipt = Receipt(cose, request, covered)
    return result


def _peer_certificate(response: httpx.Response) -> bytes | None:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    return ssl_object.getpeercert(True) if ssl_object is not None else None
