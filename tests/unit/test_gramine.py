"""The gramine backend's testable parts: manifest rendering and the attestation file protocol
(against a directory standing in for /dev/attestation). Hardware path: tests/sgx, skipped."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from smlaas.coordinator.owner import OwnerKey
from smlaas.deploy.gramine_manifests import write_manifests
from smlaas.enclave.backends.gramine import GramineBackend, enclave_size_mib
from smlaas.errors import AttestationError
from smlaas.export.build_dir import read_plan
from smlaas.roles import StageSpec
from tests.builds import sealed_chain_build


def test_enclave_size_is_a_power_of_two_covering_the_working_set() -> None:
    assert enclave_size_mib(50 * 2**20) == 1024
    assert enclave_size_mib(900 * 2**20) == 2048
    assert enclave_size_mib(3000 * 2**20) == 4096


def _toml(text: str) -> dict:
    return tomllib.loads(text.replace("{{ gramine.libos }}", "/libos.so").replace(
        "{{ gramine.runtimedir() }}", "/runtime"))


@pytest.fixture(scope="module")
def sealed_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OwnerKey]:
    build, _, owner = sealed_chain_build(tmp_path_factory.mktemp("gramine"))
    return build, OwnerKey.load(owner)


def test_manifests_fix_the_measured_configuration(sealed_build, tmp_path: Path) -> None:
    build, owner = sealed_build
    out = tmp_path / "gramine"
    first = write_manifests(build, out, owner_public_key=owner.public_key_hex,
                            coordinator_mrenclave=None, state_dir=tmp_path / "state")
    assert [p.name for p in first] == ["coordinator.manifest.template"]
    coordinator = _toml(first[0].read_text())
    argv = coordinator["loader"]["argv"]
    assert argv[argv.index("--owner-public-key") + 1] == owner.public_key_hex
    written = write_manifests(build, out, owner_public_key=owner.public_key_hex,
                              coordinator_mrenclave="ab" * 32, state_dir=tmp_path / "state")
    plan = read_plan(build / "sealed")
    assert len(written) == len(plan.stages) + 2
    for stage in plan.stages:
        data = _toml((out / f"stage-{stage.index}.manifest.template").read_text())
        argv, env = data["loader"]["argv"], data["loader"]["env"]
        # What the stage trusts is fixed in its measured argv...
        assert argv[argv.index("--coordinator-mrenclave") + 1] == "ab" * 32
        assert argv[argv.index("--role") + 1] == f"stage-{stage.index}"
        # ...and the host may pass only placement, never the coordinator or the role.
        passthrough = {k for k, v in env.items() if v == {"passthrough": True}}
        assert {"SMLAAS_LISTEN", "SMLAAS_COORDINATOR", "SMLAAS_THREADS",
                "SMLAAS_REPLICA"} <= passthrough
        assert not passthrough & {"SMLAAS_COORDINATOR_MRENCLAVE", "SMLAAS_ROLE",
                                  "SMLAAS_OWNER_PUBLIC_KEY", "SMLAAS_BACKEND"}
        assert env["SMLAAS_BUILD"] == "/smlaas/sealed"
        assert data["sgx"]["enclave_size"] == f"{enclave_size_mib(stage.working_set_bytes)}M"
        assert data["sgx"]["debug"] is False and data["sgx"]["remote_attestation"] == "dcap"
        assert any("sealed" in f for f in data["sgx"]["allowed_files"])
    gateway = _toml((out / "gateway.manifest.template").read_text())
    assert "--coordinator-mrenclave" in gateway["loader"]["argv"]


def test_worker_command_line_takes_host_options_from_the_environment(
        sealed_build, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads exactly the passthrough variables the manifest lets in."""
    from click.testing import CliRunner

    from smlaas.cli import serve_cmds

    seen = {}
    monkeypatch.setattr("smlaas.serving.worker.run_worker", lambda spec: seen.update(s=spec))
    spec = StageSpec(index=1, backend="sim", coordinator_mrenclave="cd" * 32,
                     coordinator=("10.0.0.1", 7443), listen=("0.0.0.0", 9000),
                     sealed_dir="/smlaas/sealed", threads=2)
    result = CliRunner().invoke(serve_cmds.worker, spec.measured_argv()[1:],
                                env=spec.host_env())
    assert result.exit_code == 0, result.output
    assert seen["s"] == spec


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
