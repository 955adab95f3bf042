"""The gramine backend's testable parts: manifest rendering and the attestation file protocol
(against a directory standing in for /dev/attestation). Hardware path: tests/sgx, skipped."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from smlaas.enclave.backends.gramine import (
    GramineBackend,
    enclave_size_mib,
    render_manifest,
)
from smlaas.errors import AttestationError


def test_enclave_size_is_a_power_of_two_covering_the_working_set() -> None:
    assert enclave_size_mib(50 * 2**20) == 1024
    assert enclave_size_mib(900 * 2**20) == 2048
    assert enclave_size_mib(3000 * 2**20) == 4096


def test_manifest_is_toml_once_gramine_placeholders_are_filled(tmp_path: Path) -> None:
    text = render_manifest(role="stage-1", argv=["python3", "-m", "smlaas", "worker"],
                           enclave_size_mib=2048, sealed_dir=tmp_path / "sealed")
    filled = text.replace("{{ gramine.libos }}", "/libos.so").replace(
        "{{ gramine.runtimedir() }}", "/runtime")
    data = tomllib.loads(filled)
    assert data["sgx"]["enclave_size"] == "2048M"
    assert data["sgx"]["debug"] is False and data["sgx"]["remote_attestation"] == "dcap"
    assert any("sealed" in f for f in data["sgx"]["allowed_files"])
    assert data["loader"]["env"]["SMLAAS_ROLE"] == "stage-1"


def test_attestation_file_protocol(tmp_path: Path) -> None:
    (tmp_path / "quote").write_bytes(b"QUOTE")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "_sgx_mrenclave").write_bytes(bytes(16))
    backend = GramineBackend("stage-0", attestation_dir=tmp_path)
    assert backend.quote(b"binding") == b"QUOTE"
    assert (tmp_path / "user_report_data").read_bytes() == b"binding".ljust(64, b"\0")
    assert len(backend.sealing_key("state")) == 32
    assert backend.sealing_key("a") != backend.sealing_key("b")
    with pytest.raises(AttestationError, match="at most 64"):
        backend.quote(bytes(65))


def test_outside_gramine_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="not running inside a Gramine"):
        GramineBackend("stage-0", attestation_dir=tmp_path)


def test_collateral_comes_from_the_configured_pccs_for_the_last_quote(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from smlaas.enclave.backends import gramine

    (tmp_path / "quote").write_bytes(b"QUOTE")
    (tmp_path / "user_report_data").write_bytes(b"")
    backend = GramineBackend("stage-0", attestation_dir=tmp_path)
    with pytest.raises(AttestationError, match="no quote"):
        backend.collateral_json()
    asked = []

    class Collateral:
        def to_json(self) -> str:
            return "{}"

    def fake_fetch(url: str, raw: bytes) -> Collateral:
        asked.append((url, raw))
        return Collateral()

    monkeypatch.setattr(gramine, "fetch_collateral", fake_fetch)
    monkeypatch.setenv("SMLAAS_PCCS_URL", "https://pccs.example/sgx/certification/v4/")
    backend.quote(b"x")
    assert backend.collateral_json() == "{}"
    assert asked == [("https://pccs.example/sgx/certification/v4/", b"QUOTE")]
