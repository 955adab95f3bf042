"""Collateral the coordinator trusts for registrants' quotes: obtained by the coordinator
itself, never taken from the registrant (who could pick the oldest still-valid TCB info to
hide a TCB recovery).

The manifest's ``collateral`` field says where from: ``{}`` is the coordinator's own source
(the simulation PCS for the sim backend, its PCCS for gramine), ``{"pccs_url": URL}`` a PCCS
the owner chose, ``{"documents": [...]}`` collateral files the owner put in the manifest (one
is chosen by the quote's FMSPC). Age and TCB evaluation number are then the policy's to judge
(``max_collateral_age_days``, ``min_tcb_evaluation_data_number``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import dcap_qvl
from cryptography.hazmat.primitives import serialization

from smlaas.coordinator.protocol import Code, refusal
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.quote import parse_quote
from smlaas.enclave.verification import fetch_collateral, load_collateral
from smlaas.errors import AttestationError, QuoteFormatError


def collateral_for(quote: bytes, source: Mapping[str, Any], backend: EnclaveBackend
                   ) -> dcap_qvl.QuoteCollateralV3:
    """Collateral for ``quote`` from the manifest's ``source`` (see the module docstring).

    Raises:
        CoordinatorRefused (not_accepted): no collateral could be obtained for this quote.
    """
    try:
        if "pccs_url" in source:
            return fetch_collateral(str(source["pccs_url"]), quote)
        if "documents" in source:
            return _by_fmspc(quote, list(source["documents"]))
        return backend.collateral_for(quote)
    except AttestationError as err:
        raise refusal(Code.NOT_ACCEPTED, f"no collateral for the quote: {err}") from err


def describe(source: Mapping[str, Any], backend: EnclaveBackend) -> str:
    if "pccs_url" in source:
        return f"the manifest's PCCS {source['pccs_url']}"
    if "documents" in source:
        return f"{len(source['documents'])} collateral document(s) in the manifest"
    return f"the {backend.name} backend's own source" + (
        " (simulation PCS: INSECURE)" if backend.simulated else "")


def _by_fmspc(quote: bytes, documents: list[str]) -> dcap_qvl.QuoteCollateralV3:
    try:
        pck = parse_quote(quote).pck_chain()[0]
    except QuoteFormatError as err:
        raise AttestationError(f"the quote carries no PCK certificate to choose collateral "
                               f"by: {err}") from err
    try:
        fmspc = dcap_qvl.parse_pck_extension_from_pem(
            pck.public_bytes(serialization.Encoding.PEM)).fmspc.hex().upper()
    except ValueError as err:
        raise AttestationError(f"the quote's PCK certificate has no readable SGX extension: "
                               f"{err}") from err
    for number, document in enumerate(documents):
        collateral = load_collateral(document, source=f"collateral.documents[{number}]")
        if str(json.loads(collateral.tcb_info).get("fmspc", "")).upper() == fmspc:
            return collateral
    raise AttestationError(f"the manifest has no collateral for FMSPC {fmspc}")
