from __future__ import annotations

import pytest

from smlaas.enclave import parse_quote
from smlaas.errors import QuoteFormatError
from tests.sgx_testdata import read, requires_testdata

pytestmark = requires_testdata


def test_phala_quote_fields() -> None:
    quote = parse_quote(read("phala/sgx_quote"))
    assert quote.header.version == 3 and quote.header.attestation_key_type == 2
    assert quote.report.report_data.startswith(b"Hello, world!")
    assert not quote.report.debug
    assert quote.cert_data_type == 5
    chain = quote.pck_chain()
    assert [c.subject.rfc4514_string().split("CN=")[1].split(",")[0] for c in chain] == [
        "Intel SGX PCK Certificate", "Intel SGX PCK Processor CA", "Intel SGX Root CA"]


def test_oasis_quote_measurements_and_padding_tolerance() -> None:
    raw = read("oasis/quote_v3_ecdsa_p256_pck_chain.bin")
    quote = parse_quote(raw + b"\0" * 100)
    assert quote.report.mr_enclave.hex().startswith("68823bc6")
    assert quote.report.mr_signer.hex().startswith("9affcfae")
    assert "CN=Intel SGX PCK Platform CA" in quote.pck_chain()[1].subject.rfc4514_string()


def test_chain_is_ordered_by_issuer_not_position() -> None:
    quote = parse_quote(read("phala/sgx_quote"))
    chain = quote.pck_chain()
    from cryptography.hazmat.primitives import serialization
    shuffled = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in reversed(chain))
    from dataclasses import replace
    assert replace(quote, cert_data=shuffled).pck_chain() == chain


def test_eppid_quote_has_no_chain_and_says_so() -> None:
    quote = parse_quote(read("oasis/quote_v3_ecdsa_p256_eppid.bin"))
    with pytest.raises(QuoteFormatError, match="encrypted PPID .*fetched from a PCCS"):
        quote.pck_chain()


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:100], "at least"),
    (lambda raw: raw[:1000], "truncated"),
    (lambda raw: b"\x04\x00" + raw[2:], "version 4"),
    (lambda raw: raw[:2] + b"\x03\x00" + raw[4:], "key type 3"),
])
def test_malformed_quotes_are_format_errors(damage, message: str) -> None:
    with pytest.raises(QuoteFormatError, match=message):
        parse_quote(damage(read("phala/sgx_quote")))
