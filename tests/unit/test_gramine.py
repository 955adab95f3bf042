"""The gramine backend's testable parts: manifest rendering (what it runs, mounts and trusts
for a Python layout; its sizes), the file rules a manifest sets, and the attestation file
protocol (against a directory standing in for /dev/attestation). Whether every role's files
are let in: tests/component/test_gramine_manifest_files.py. Hardware path: tests/sgx,
skipped."""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from smlaas.coordinator.owner import OwnerKey
from smlaas.deploy.gramine_files import RUNTIME_STANDIN, ManifestFiles, Mount, Opened
from smlaas.deploy.gramine_manifests import write_manifests
from smlaas.deploy.gramine_sizes import (
    BASELINE,
    GRAMINE_HELPER_THREADS,
    GRAMINE_RUNTIME_MIB,
    MIB,
    MODEL_VIRTUAL_FACTOR,
    VIRTUAL_HEADROOM,
    Footprints,
    RoleFootprint,
    size_roles,
    working_set_of,
)
from smlaas.deploy.python_layout import PythonLayout
from smlaas.enclave.backends.gramine import GramineBackend
from smlaas.errors import AttestationError, ConfigError
from smlaas.export.build_dir import read_plan
from smlaas.roles import StageSpec
from tests.builds import sealed_chain_build

VENV = "/home/u/venv"
BASE = "/opt/python"


def _probe(**overrides: object) -> dict:
    """What the layout probe prints for a venv of /opt/python with smlaas installed in it."""
    probe = {"executable": f"{VENV}/bin/python3", "interpreter": f"{BASE}/bin/python3.11",
             "prefix": VENV, "base_prefix": BASE, "version": "3.11",
             "stdlib": f"{BASE}/lib/python3.11",
             "lib_dynload": f"{BASE}/lib/python3.11/lib-dynload",
             "sys_path": [f"{BASE}/lib/python3.11", f"{BASE}/lib/python3.11/lib-dynload",
                          f"{VENV}/lib/python3.11/site-packages"],
             "smlaas_origin": f"{VENV}/lib/python3.11/site-packages/smlaas/__init__.py",
             "editable": False, "libpython": f"{BASE}/lib/libpython3.11.so.1.0",
             "openssl_dir": "/usr/lib/ssl"}
    probe.update(overrides)
    return probe


def test_a_venv_runs_as_its_own_interpreter_path_and_trusts_its_pyvenv_cfg() -> None:
    layout = PythonLayout.from_probe(_probe())
    assert layout.executable == f"{VENV}/bin/python3" != layout.interpreter
    assert layout.venv_config == f"{VENV}/pyvenv.cfg"
    assert {f"{BASE}/bin/python3.11", f"{BASE}/lib/python3.11/", f"{VENV}/pyvenv.cfg",
            f"{VENV}/lib/python3.11/site-packages/", f"{BASE}/lib/libpython3.11.so.1.0",
            "/usr/lib/ssl/openssl.cnf"} <= set(layout.trusted())
    assert set(layout.mount_roots()) == {BASE, VENV, "/usr/lib/ssl"}
    assert not layout.editable
    assert PythonLayout.from_json(layout.to_json()) == layout


def test_an_editable_install_trusts_its_source_tree_and_refuses_a_repository_root(
        tmp_path: Path) -> None:
    source = tmp_path / "checkout" / "src"
    (source / "smlaas").mkdir(parents=True)
    probe = _probe(sys_path=[*_probe()["sys_path"], str(source)],
                   smlaas_origin=str(source / "smlaas" / "__init__.py"), editable=True)
    layout = PythonLayout.from_probe(probe)
    assert layout.editable and layout.package_dir == str(source)
    assert f"{source}/" in layout.trusted() and str(source) in layout.mount_roots()
    (source / ".git").mkdir()
    with pytest.raises(ConfigError, match="repository root.*install smlaas non-editable"):
        PythonLayout.from_probe(probe)


def test_the_image_layout_is_the_dockerfiles_python(repo_root: Path) -> None:
    image = PythonLayout.image()
    dockerfile = (repo_root / "deploy" / "Dockerfile").read_text()
    assert re.search(rf"^FROM python:{re.escape(image.version)}-slim$", dockerfile, re.M)
    assert image.venv_config is None and not image.editable
    assert image.executable == image.interpreter == "/usr/local/bin/python3.11"
    assert image.package_dir == "/usr/local/lib/python3.11/site-packages"


def test_sizes_cover_the_virtual_size_gramine_and_the_threads(sealed_build) -> None:
    build, _ = sealed_build
    plan = read_plan(build / "sealed")
    sizes = size_roles(plan)
    baseline_stage = BASELINE.get("stage")
    assert baseline_stage is not None
    for stage in plan.stages:
        sizing = sizes[f"stage-{stage.index}"]
        working_set, _ = working_set_of(stage)  # measured when the plan carries it
        needed = VIRTUAL_HEADROOM * (baseline_stage.vm_peak_bytes
                                     + MODEL_VIRTUAL_FACTOR * working_set) \
            + GRAMINE_RUNTIME_MIB * MIB
        assert needed <= sizing.enclave_mib * MIB < 2 * needed  # the next power of two
        assert sizing.enclave_mib & (sizing.enclave_mib - 1) == 0
        assert sizing.max_threads >= baseline_stage.threads + GRAMINE_HELPER_THREADS + 7
        assert sizing.epc_request_mib == sizing.enclave_mib
    # A stage whose (predicted) working set is 2 GiB needs more.
    stage = plan.stages[0]
    big = replace(stage, working_set_bytes=2 * 2**30,
                  **({"measured": None} if hasattr(stage, "measured") else {}))
    bigger = size_roles(replace(plan, stages=(big, *plan.stages[1:])))
    assert bigger["stage-0"].enclave_mib >= 8192 > sizes["stage-0"].enclave_mib


def test_footprints_of_this_build_size_its_stages_and_of_another_only_the_others(
        sealed_build) -> None:
    build, _ = sealed_build
    plan = read_plan(build / "sealed")
    roles = tuple(RoleFootprint(role, vm_peak_bytes=3000 * MIB, rss_peak_bytes=MIB,
                                threads=20, ort_threads=1)
                  for role in ("coordinator", "gateway", "stage-0"))
    footprints = Footprints(roles=roles, plan_sha256="aa" * 32, machine="m")
    assert Footprints.from_json(footprints.to_json()) == footprints
    same = size_roles(plan, footprints=footprints, plan_sha256="aa" * 32)
    other = size_roles(plan, footprints=footprints, plan_sha256="bb" * 32)
    assert same["stage-0"].enclave_mib == 4096 and "its model included" in same["stage-0"].basis
    assert other["stage-0"].enclave_mib < 4096  # another build's stage: the baseline
    assert same["coordinator"].enclave_mib == other["coordinator"].enclave_mib == 4096
    assert same["gateway"].max_threads >= 20 + GRAMINE_HELPER_THREADS
    with pytest.raises(ConfigError, match="no coordinator footprint"):
        Footprints.from_json(Footprints(roles=roles[1:]).to_json())


def test_file_rules_follow_gramines_semantics() -> None:
    files = ManifestFiles(
        mounts=(Mount("/lib", RUNTIME_STANDIN), Mount("/usr", "/usr"), Mount("/tmp", "", "tmpfs"),
                Mount("/app", "/srv/app"), Mount("/state", "/var/state")),
        trusted=(f"{RUNTIME_STANDIN}/", "/usr/lib/x86_64-linux-gnu/", "/srv/app/code/",
                 "/usr/bin/python3"),
        allowed=("/var/state/",))

    def why(path: str, **kind: bool) -> str | None:
        return next((r.reason for r in files.check([Opened(path, **kind)])), None)

    assert why("/usr/bin/python3") is None
    assert why("/usr/bin/python3", write=True) == "written, but trusted files are read-only"
    assert "neither trusted nor allowed" in str(why("/usr/share/zoneinfo/UTC"))
    assert why("/srv/app/code/x.py") is None  # reached as /app/code/x.py
    assert why("/var/state/s.sealed", write=True) is None
    assert why("/usr/lib/x86_64-linux-gnu/libc.so.6") is None  # Gramine's own glibc
    assert "under no fs.mounts" in str(why("/etc/hosts"))
    assert why("/proc/self/maps") is None and why("/dev/urandom") is None
    assert why("/sys/devices/system/cpu/online") is None
    assert "not emulated" in str(why("/proc/self/cgroup"))
    assert why("/tmp/k.pem", write=True) is None
    assert "starts empty" in str(why("/tmp/left-by-the-host"))
    assert files.check([Opened("/tmp/k.pem", write=True), Opened("/tmp/k.pem")]) == []
    assert why("/srv/app/x", directory=True) is None  # a mounted directory, listed
    # /usr/bin shadowed by a mount of its own: the enclave would not see the host file
    shadowed = replace(files, mounts=(*files.mounts, Mount("/usr/bin", "/elsewhere")))
    assert "shadows" in str(next(r.reason for r in shadowed.check([Opened("/usr/bin/python3")])))
    assert "neither trusted" in str(
        next(r.reason for r in files.without_trusted("/usr/bin/python3").check(
            [Opened("/usr/bin/python3")])))


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
    layout = PythonLayout.from_probe(_probe())
    first = write_manifests(build, out, owner_public_key=owner.public_key_hex,
                            coordinator_mrenclave=None, state_dir=tmp_path / "state",
                            layout=layout)
    assert [p.name for p in first] == ["coordinator.manifest.template"]
    coordinator = _toml(first[0].read_text())
    argv = coordinator["loader"]["argv"]
    assert argv[argv.index("--owner-public-key") + 1] == owner.public_key_hex
    written = write_manifests(build, out, owner_public_key=owner.public_key_hex,
                              coordinator_mrenclave="ab" * 32, state_dir=tmp_path / "state",
                              layout=layout)
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
        sizing = size_roles(plan)[f"stage-{stage.index}"]
        assert data["sgx"]["enclave_size"] == f"{sizing.enclave_mib}M"
        assert data["sgx"]["max_threads"] == sizing.max_threads
        # The venv's interpreter path as argv[0], the real binary as the entrypoint, the
        # interpreter flags, and what the venv needs trusted.
        assert argv[:5] == [f"{VENV}/bin/python3", "-I", "-B", "-m", "smlaas"]
        assert data["libos"]["entrypoint"] == f"{BASE}/bin/python3.11"
        trusted = data["sgx"]["trusted_files"]
        assert {f"file:{VENV}/pyvenv.cfg", f"file:{BASE}/lib/libpython3.11.so.1.0",
                f"file:{VENV}/lib/python3.11/site-packages/"} <= set(trusted)
        mounts = {m["path"]: m for m in data["fs"]["mounts"]}
        assert mounts["/tmp"] == {"type": "tmpfs", "path": "/tmp"}
        assert {VENV, BASE, "/smlaas/sealed"} <= set(mounts)
        assert env["LC_ALL"] == "C" and env["HOME"] == "/tmp"
        assert data["sys"]["enable_extra_runtime_domain_names_conf"] is True
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
    monkeypatch.setattr("smlaas.serving.worker_process.run_worker",
                        lambda spec: seen.update(s=spec))
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
