"""The Gramine manifests let every role open what it opens: each role of a 2-stage sim
deployment runs natively as its manifest runs it (argv, interpreter flags, environment;
``tests/gramine_audit.py``) under an audit hook, through start-up, registration and a few
inferences, and every file it opened, mapped or listed must lie under a trusted file, an
allowed file or a mount of the manifest, as Gramine resolves it
(:mod:`smlaas.deploy.gramine_files`).

Two layouts, one run:

- **venv**: a virtual environment made here (or the interpreter named by
  ``SMLAAS_GRAMINE_CHECK_PYTHON``, e.g. a venv with smlaas installed non-editable), whose
  ``.pth`` puts the smlaas under test (a source tree, as an editable install does) and this
  interpreter's site-packages on its path: the manifest starts the base binary with the
  venv's ``bin/python3`` as ``argv[0]`` and must trust ``pyvenv.cfg``, the source tree, the
  site-packages, the standard library and the system libraries.
- **image**: the manifests ``smlaas gramine manifest --for-image`` writes for
  ``deploy/Dockerfile``'s image (CPython in ``/usr/local``, smlaas installed into its
  site-packages, the sealed directory at ``/build``, the state at ``/state``). No image is
  built here: each file the native run opened is mapped to the path the same file has in the
  image (the interpreter, libpython, the standard library, every import path onto the image's
  site-packages, the build and state directories; system libraries and pseudo files as they
  are, the image being Debian too) and checked against those manifests.

What stands in for SGX: the sim backend, whose simulation PKI (under ``SMLAAS_CACHE_DIR``) is
what ``/dev/attestation`` (emulated by Gramine) replaces; those files are not checked. The
roles' sizes (``sgx.enclave_size``, ``sgx.max_threads``) are checked against the footprints
measured in the same run.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

import smlaas
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.gramine_files import ManifestFiles, Opened
from smlaas.deploy.gramine_manifests import (
    IMAGE_SEALED_DIR,
    IMAGE_STATE_DIR,
    SEALED_MOUNT,
    STATE_MOUNT,
    write_manifests,
)
from smlaas.deploy.gramine_sizes import (
    BASELINE,
    GRAMINE_HELPER_THREADS,
    GRAMINE_RUNTIME_MIB,
    MIB,
    Footprints,
    plan_digest,
    sample_inputs,
    size_roles,
)
from smlaas.deploy.python_layout import PythonLayout
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import sealed_directory
from smlaas.roles import CoordinatorSpec
from tests.builds import sealed_chain_build
from tests.gramine_audit import AuditLauncher, Manifest, RoleRun
from tests.integration.serving_setup import cache_env

PYTHON_ENV = "SMLAAS_GRAMINE_CHECK_PYTHON"
STRACE_ENV = "SMLAAS_GRAMINE_CHECK_STRACE"
INFERENCES = 5
ROLES = ("coordinator", "gateway", "stage-0", "stage-1")

OPTIONAL = {
    # Each: read natively, absent in the enclave (ENOENT, never EACCES), and the reader
    # carries on without it.
    r"/etc/(os-release|lsb-release)": "ONNX Runtime's distribution warning (linecache: [])",
    r"/tmp/\.ses|/tmp/\.cache/Microsoft/DeveloperTools/.*":
        "ONNX Runtime's device id and session files under HOME=/tmp (made when absent: "
        "checked with an empty HOME)",
    r"/proc/self/limits": "prometheus_client's process collector (except OSError)",
    r"/proc/(self|1)/cgroup|/sys/fs/cgroup/.*": "ONNX Runtime's CPU quota probe",
    r"/proc/sys/kernel/osrelease|/sys/bus/pci/devices(/.*)?|/\.dockerenv":
        "ONNX Runtime's device discovery",
    r"/etc/(hosts|host\.conf|nsswitch\.conf|gai\.conf|ld\.so\.cache|localtime)":
        "glibc's defaults apply (name service: DNS through the emulated /etc/resolv.conf; "
        "time zone: UTC; libraries: LD_LIBRARY_PATH)",
}
"""Files a role reads if they are there, that Gramine's enclave does not have."""


@dataclass
class Audit:
    layout: PythonLayout
    manifests: dict[str, str]
    """Role -> the venv layout's manifest template."""
    image_manifests: dict[str, str]
    runs: dict[str, RoleRun]
    sealed: Path
    state: Path
    cache: Path
    out: Path
    plan_sha256: str
    traced: bool
    """Whether strace saw the roles' own system calls (C code's opens)."""


def _make_venv(root: Path) -> str:
    """A venv of this interpreter's base whose .pth adds the smlaas under test and this
    interpreter's site-packages (their own .pth files are not run: this machine's extras
    stay out)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    python = root / "bin" / "python3"
    purelib = subprocess.run([str(python), "-I", "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    under_test = Path(smlaas.__file__).resolve().parents[1]
    (Path(purelib) / "smlaas-under-test.pth").write_text(
        "\n".join([str(under_test), *site.getsitepackages()]) + "\n")
    return str(python)


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Audit:
    root = tmp_path_factory.mktemp("gramine-files")
    build, keys, owner_key = sealed_chain_build(root / "owner", machines=2)
    owner = OwnerKey.load(owner_key)
    layout = PythonLayout.of_interpreter(os.environ.get(PYTHON_ENV) or _make_venv(root / "venv"))
    sealed = sealed_directory(build).resolve()
    state, cache = root / "state", root / "cache"
    coordinator_mr = CoordinatorSpec(backend="sim", owner_public_key=owner.public_key_hex
                                     ).sim_mrenclave()
    common = {"owner_public_key": owner.public_key_hex,
              "coordinator_mrenclave": coordinator_mr}
    written = write_manifests(build, root / "venv-manifests", state_dir=state, layout=layout,
                              **common)
    image = write_manifests(build, root / "image-manifests", layout=PythonLayout.image(),
                            sealed_host_dir=IMAGE_SEALED_DIR, state_dir=IMAGE_STATE_DIR,
                            **common)
    manifests = {p.name.split(".")[0]: p.read_text() for p in written}
    launcher = AuditLauncher({role: Manifest.parse(text) for role, text in manifests.items()},
                             root / "audit", cache_dir=cache,
                             mount_hosts={SEALED_MOUNT: str(sealed),
                                          STATE_MOUNT: str(state.resolve())},
                             strace=os.environ.get(STRACE_ENV, "1") != "0")
    settings = DeploySettings(build_dir=build, keys_path=keys, state_dir=state,
                              owner_key_path=owner_key, port=free_port(), threads=1,
                              ready_timeout_s=90)
    with cache_env(cache), Deployment(settings, launcher) as deployment:
        with deployment.client() as client:
            inputs = sample_inputs(client.metadata())
            for _ in range(INFERENCES):
                client.infer(inputs)
        launcher.snapshot()
    return Audit(layout=layout, manifests=manifests,
                 image_manifests={p.name.split(".")[0]: p.read_text() for p in image},
                 runs={run.role: run for run in launcher.runs.values()}, sealed=sealed,
                 state=state.resolve(), cache=cache.resolve(), out=root / "audit",
                 plan_sha256=plan_digest(sealed), traced=launcher.strace)


def _opened(audit: Audit, role: str) -> list[Opened]:
    """What the role opened, but the sim backend's own files and the audit's."""
    stand_ins = (audit.cache / "sim-pki", audit.out)
    return [o for o in audit.runs[role].opened()
            if not any(PurePosixPath(o.path).is_relative_to(s) for s in stand_ins)]


def _problems(files: ManifestFiles, opened: list[Opened]) -> list[str]:
    """The check's refusals, but files known to be optional that are absent in the
    enclave."""
    return sorted({r.line() for r in files.check(opened)
                   if not (r.absent and any(re.fullmatch(p, r.path) for p in OPTIONAL))})


def _to_image(audit: Audit) -> list[tuple[str, str | None]]:
    """(path here, the same file's path in the image, None: the image has none), longest
    first."""
    here, image = audit.layout, PythonLayout.image()
    site_packages = image.import_paths[0]
    table: list[tuple[str, str | None]] = [
        (here.interpreter, image.interpreter), (here.executable, image.executable),
        (here.stdlib, image.stdlib), (here.lib_dynload, image.lib_dynload),
        (str(audit.sealed), IMAGE_SEALED_DIR), (str(audit.state), IMAGE_STATE_DIR)]
    table += [(path, site_packages) for path in here.import_paths]
    if here.libpython:
        table.append((here.libpython, image.libpython))
    if here.venv_config:
        table.append((here.venv_config, None))  # the image's Python is no venv
    return sorted(table, key=lambda entry: -len(entry[0]))


def _in_image(audit: Audit, opened: list[Opened]) -> list[Opened]:
    table, mapped = _to_image(audit), []
    for item in opened:
        path = PurePosixPath(item.path)
        for here, there in table:
            if path.is_relative_to(here):
                if there is not None:
                    rest = path.relative_to(here)
                    mapped.append(Opened(str(PurePosixPath(there) / rest), item.write,
                                         item.directory, item.how))
                break
        else:
            mapped.append(item)
    return mapped


@pytest.mark.parametrize("role", ROLES)
def test_the_venv_manifest_lets_in_every_file_the_role_opens(audit: Audit, role: str) -> None:
    opened = _opened(audit, role)
    assert len(opened) > 100  # the interpreter, the standard library, smlaas, ONNX Runtime...
    assert _problems(ManifestFiles.from_toml(audit.manifests[role]), opened) == []


@pytest.mark.parametrize("role", ROLES)
def test_the_image_manifest_lets_in_every_file_the_role_opens(audit: Audit, role: str) -> None:
    files = ManifestFiles.from_toml(audit.image_manifests[role])
    assert _problems(files, _in_image(audit, _opened(audit, role))) == []


def test_the_check_reports_a_file_whose_trusted_entry_is_removed(audit: Audit) -> None:
    """Every trusted entry that some file of stage 0 needed: without it, the check names
    one of those files (the check is not vacuous)."""
    files = ManifestFiles.from_toml(audit.manifests["stage-0"])
    opened = _opened(audit, "stage-0")
    assert _problems(files, opened) == []
    used = {entry for entry in files.trusted for o in opened
            if not o.directory and _names(entry, o.path)}
    layout = audit.layout
    assert {layout.interpreter, layout.stdlib.rstrip("/") + "/"} <= used
    for entry in sorted(used):
        problems = _problems(files.without_trusted(entry), opened)
        assert problems, f"removing {entry} went unnoticed"
        assert all("neither trusted nor allowed" in p for p in problems)
        assert any(_names(entry, p.split(" (")[0]) for p in problems)


def test_what_c_code_opens_was_seen(audit: Audit) -> None:
    """strace saw what no audit hook sees: OpenSSL's configuration, the libraries the dynamic
    loader opened, ONNX Runtime's device id."""
    if not audit.traced:
        pytest.skip("strace is not installed or may not trace here: only what Python opened "
                    "and what was mapped were checked")
    native = {o.path for o in _opened(audit, "stage-0") if o.how == "native"}
    assert audit.layout.openssl_config in native
    assert any(PurePosixPath(p).name.startswith("libssl.so") for p in native)
    assert any("DeveloperTools" in p for p in native)


def test_the_venv_is_run_as_the_venv(audit: Audit) -> None:
    """argv[0] is the venv's interpreter (getpath then finds pyvenv.cfg: the venv's
    site-packages on sys.path), the real binary is the entrypoint, pyvenv.cfg is trusted and
    was read."""
    manifest = Manifest.parse(audit.manifests["stage-0"])
    layout = audit.layout
    assert manifest.argv[0] == layout.executable
    assert Path(layout.interpreter).resolve() == Path(layout.interpreter)
    if layout.venv_config:
        assert layout.executable != layout.interpreter
        opened = {o.path for o in _opened(audit, "stage-0")}
        assert layout.venv_config in opened
        assert any(p.startswith(layout.prefix + "/lib") for p in opened)  # its site-packages
        assert layout.venv_config in ManifestFiles.from_toml(audit.manifests["stage-0"]
                                                             ).trusted


def test_sizes_agree_with_the_measured_footprints(audit: Audit, tmp_path: Path) -> None:
    """The enclave holds each role's measured peak virtual size and Gramine's own part, and
    has a thread for each measured thread and Gramine's helpers; the project's baseline
    gives no smaller sizes than this run measured."""
    footprints = Footprints(roles=tuple(run.footprint for run in audit.runs.values()
                                        if run.footprint is not None),
                            plan_sha256=audit.plan_sha256, machine="this run")
    assert {f.role for f in footprints.roles} == set(ROLES)
    assert Footprints.from_json(footprints.to_json()) == footprints
    plan = read_plan(audit.sealed)
    measured = size_roles(plan, footprints=footprints, plan_sha256=audit.plan_sha256)
    baseline = size_roles(plan, plan_sha256=audit.plan_sha256)
    for footprint in footprints.roles:
        sizing = measured[footprint.role]
        assert sizing.enclave_mib * MIB >= footprint.vm_peak_bytes + GRAMINE_RUNTIME_MIB * MIB
        assert sizing.enclave_mib & (sizing.enclave_mib - 1) == 0  # a power of two
        assert sizing.max_threads >= footprint.threads + GRAMINE_HELPER_THREADS
        # The sizes written without --measured would have held this run too.
        assert baseline[footprint.role].enclave_mib * MIB >= \
            footprint.vm_peak_bytes + GRAMINE_RUNTIME_MIB * MIB, (
                f"{footprint.role} measured {footprint.vm_peak_bytes / MIB:.0f} MiB: the "
                f"baseline in gramine_sizes.py needs measuring again")
        assert baseline[footprint.role].max_threads >= footprint.threads + GRAMINE_HELPER_THREADS
    # The manifests written with --measured carry exactly these sizes.
    (tmp_path / "footprints.json").write_text(footprints.to_json())
    written = write_manifests(audit.sealed, tmp_path / "m",
                              owner_public_key=OwnerKey.load_or_create(tmp_path / "k")
                              .public_key_hex, coordinator_mrenclave="ab" * 32,
                              state_dir=audit.state, layout=audit.layout,
                              footprints=Footprints.from_json(
                                  (tmp_path / "footprints.json").read_text()))
    for path in written:
        role = path.name.split(".")[0]
        text = path.read_text()
        assert f'sgx.enclave_size = "{measured[role].enclave_mib}M"' in text
        assert f"sgx.max_threads = {measured[role].max_threads}" in text
    assert {f.role for f in BASELINE.roles} == {"coordinator", "gateway", "stage"}


def _names(entry: str, path: str) -> bool:
    """Whether the trusted entry is ``path`` or a directory holding it."""
    if entry.endswith("/"):
        return PurePosixPath(path).is_relative_to(entry)
    return PurePosixPath(entry) == PurePosixPath(path)
