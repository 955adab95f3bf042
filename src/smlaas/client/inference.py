"""Inference over the Open Inference Protocol, binary tensors by default."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import (
    QuoteVerdict,
    TrustedRoot,
    load_collateral,
    select_root,
    verify_quote,
)
from smlaas.errors import AttestationError, ServingError
from smlaas.serving.v2 import HEADER_LENGTH, decode_infer_response, encode_infer_request
from smlaas.transport.tls import certificate_manifest


class InferenceClient:
    def __init__(self, url: str, *, ca: str | Path, model: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        context = ssl.create_default_context(cafile=str(ca))
        self._http = httpx.Client(base_url=self.url, verify=context, timeout=timeout_s)
        self._model = model

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def model(self) -> str:
        if self._model is None:
            index = self._checked(self._http.post("/v2/repository/index")).json()
            if len(index) != 1:
                raise ServingError(f"the gateway serves {len(index)} models; name one",
                                   status=400)
            self._model = str(index[0]["name"])
        return self._model

    def ready(self) -> bool:
        try:
            return self._http.get("/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def metadata(self) -> dict[str, Any]:
        return dict(self._checked(self._http.get(f"/v2/models/{self.model}")).json())

    def infer(self, inputs: Mapping[str, np.ndarray], *, binary: bool = True,
              outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Runs the model on named ``inputs``; returns its outputs by name."""
        body, headers = encode_infer_request(inputs, binary=binary, outputs=outputs)
        response = self._checked(self._http.post(f"/v2/models/{self.model}/infer",
                                                 content=body, headers=headers))
        return decode_infer_response(response.content, response.headers.get(HEADER_LENGTH))

    def attest(self, policy: Policy, roots: list[TrustedRoot], *,
               manifest_digest: str | None = None) -> QuoteVerdict:
        """Verifies the gateway's quote against ``policy`` (role ``gateway``) and that its
        report_data binds the key of the certificate this connection is talking to; with
        ``manifest_digest``, also that the coordinator admitted it under that manifest."""
        response = self._checked(self._http.get("/v2/smlaas/attestation"))
        evidence = response.json()
        peer = _peer_certificate(response)
        served = x509.load_pem_x509_certificate(str(evidence["certificate"]).encode())
        if peer is None or peer != served.public_bytes(serialization.Encoding.DER):
            raise AttestationError("the evidence names another certificate than the one "
                                   "serving this connection")
        admitted = certificate_manifest(served)
        if manifest_digest is not None and admitted != manifest_digest:
            raise AttestationError(f"the gateway was admitted under manifest {admitted}, not "
                                   f"{manifest_digest}")
        spki = served.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        quote = base64.b64decode(evidence["quote"])
        verdict = verify_quote(quote, load_collateral(evidence["collateral"], source="gateway"),
                               at=dt.datetime.now(dt.UTC), root=select_root(quote, roots))
        if not verdict.verified:
            raise AttestationError(f"the gateway's quote does not verify: {verdict.error}")
        policy.check(verdict, role="gateway",
                     expected_report_data=hashlib.sha256(spki).digest())
        return verdict

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if response.status_code != 200:
            try:
                message = str(response.json().get("error", response.text))
            except ValueError:
                message = response.text
            raise ServingError(f"HTTP {response.status_code}: {message}",
                               status=response.status_code)
        return response


def _peer_certificate(response: httpx.Response) -> bytes | None:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    return ssl_object.getpeercert(True) if ssl_object is not None else None
