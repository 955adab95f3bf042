"""Writing one Gramine manifest per role of a sealed build (``smlaas gramine manifest``).

Each manifest fixes its role's measured command line (:mod:`smlaas.roles`) in
``loader.argv`` and lets the host pass only the host options, as environment variables. The
coordinator's manifest carries the owner's public key; the others carry the coordinator's
MRENCLAVE, which exists only once the coordinator's manifest is signed: so the first run
(without ``coordinator_mrenclave``) writes the coordinator's manifest only, and a second run,
given the MRENCLAVE gramine-sgx-sign printed, writes the gateway's and the stages'.

What a manifest runs, mounts and trusts comes from the Python installation that will run the
role (:class:`~smlaas.deploy.python_layout.PythonLayout`: this interpreter's, another one's,
or the image's); its sizes from measured footprints (:mod:`smlaas.deploy.gramine_sizes`).
Whether the result lets every role open what it opens is checked by running each role under
an audit hook (:mod:`smlaas.deploy.gramine_files`, ``tests/component/
test_gramine_manifest_files.py``).

Note "interpreter flags". ``-I`` (isolated: no working directory, ``PYTHON*`` variables or
user site on ``sys.path``; ``pyvenv.cfg`` still honoured, see
:mod:`smlaas.deploy.python_layout`) and ``-B`` (no ``.pyc`` writes: trusted directories are
read-only inside the enclave, and ``PYTHONDONTWRITEBYTECODE`` is ignored under ``-I``).

Note "what else the manifest sets". ``HOME=/tmp``: ONNX Runtime 1.32 writes a device id and
a SQLite file under ``$HOME/.cache/Microsoft/DeveloperTools`` when it creates a session (and
reads ``/tmp/.ses``), looking its home up in ``/etc/passwd`` without ``HOME``; with ``HOME`` in
the in-memory ``/tmp`` it writes there (and makes them when absent).
``LC_ALL=C``: without it Python coerces the C locale to C.UTF-8 and glibc reads
``/usr/lib/locale`` and ``/usr/share/locale/locale.alias`` (untrusted: refused); in the C
locale it reads nothing and Python runs in UTF-8 mode, as it would after coercing.
``sys.enable_extra_runtime_domain_names_conf``: Gramine writes ``/etc/resolv.conf`` from
the host's, so roles resolve the names they are given (Kubernetes Services). OpenSSL's
``openssl.cnf``, which ``ssl`` reads at start, is trusted (a file it cannot open for another
reason than its absence fails OpenSSL's initialisation).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from smlaas.deploy.gramine_sizes import (
    DEFAULT_MAX_STAGE_THREADS,
    EnclaveSizing,
    Footprints,
    plan_digest,
    size_roles,
)
from smlaas.deploy.python_layout import PythonLayout
from smlaas.errors import ConfigError
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import sealed_directory
from smlaas.plan.plan import Plan
from smlaas.roles import CoordinatorSpec, GatewaySpec, RoleSpec, StageSpec

SEALED_MOUNT = "/smlaas/sealed"
STATE_MOUNT = "/smlaas/state"
IMAGE_SEALED_DIR = "/build"
"""Where the Kubernetes pods mount the sealed directory (``smlaas.deploy.k8s``)."""
IMAGE_STATE_DIR = "/state"
INTERPRETER_FLAGS = ("-I", "-B")
"""Note "interpreter flags"."""
SYSTEM_LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")
FIXED_MOUNTS = (("/lib", "{{ gramine.runtimedir() }}"),
                ("/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"), ("/usr", "/usr"))
"""Gramine's glibc at /lib (its examples' layout), the system's libraries over it, /usr."""
TMP = "/tmp"
_ANY = ("0.0.0.0", 0)  # placement is not measured: any value stands for the host's choice


def write_manifests(directory: Path, out_dir: Path, *, owner_public_key: str,
                    coordinator_mrenclave: str | None, state_dir: Path | str,
                    debug: bool = False, layout: PythonLayout | None = None,
                    sealed_host_dir: Path | str | None = None,
                    footprints: Footprints | None = None,
                    max_stage_threads: int = DEFAULT_MAX_STAGE_THREADS) -> list[Path]:
    """Writes ``<role>.manifest.template`` files into ``out_dir``; returns their paths.

    ``layout`` is the Python that will run the roles (default: this interpreter's);
    ``sealed_host_dir`` where the sealed directory will be on that host (default: the one
    read here); ``footprints`` size the enclaves (default: :data:`~smlaas.deploy.
    gramine_sizes.BASELINE` plus each stage's working set).
    """
    sealed = sealed_directory(directory)
    plan = read_plan(sealed)
    layout = layout or PythonLayout.of_interpreter()
    sealed_host = str(sealed_host_dir) if sealed_host_dir is not None else str(sealed.resolve())
    state_host = str(Path(state_dir).resolve())
    sizes = size_roles(plan, footprints=footprints, plan_sha256=plan_digest(sealed),
                       max_stage_threads=max_stage_threads,
                       gateway_max_queue=GatewaySpec.max_queue)
    out_dir.mkdir(parents=True, exist_ok=True)
    coordinator = CoordinatorSpec(backend="gramine", owner_public_key=owner_public_key,
                                  listen=_ANY, state_path=f"{STATE_MOUNT}/coordinator.sealed")
    written = [_write(out_dir, render_role(coordinator, layout, sizes[coordinator.role],
                                           {STATE_MOUNT: state_host}, debug=debug))]
    if coordinator_mrenclave is None:
        return written
    for spec in role_specs(plan, coordinator_mrenclave):
        mounts = {SEALED_MOUNT: sealed_host} if isinstance(spec, StageSpec) else {}
        written.append(_write(out_dir, render_role(spec, layout, sizes[spec.role], mounts,
                                                   debug=debug)))
    return written


def role_specs(plan: Plan, coordinator_mrenclave: str) -> list[RoleSpec]:
    """The gateway and stage specs of ``plan`` under gramine, placement left to the host."""
    count = len(plan.stages)
    common: dict[str, Any] = {"backend": "gramine",
                              "coordinator_mrenclave": coordinator_mrenclave,
                              "coordinator": _ANY}
    specs: list[RoleSpec] = [GatewaySpec(first_stages=(_ANY,), listen=_ANY,
                                         model_name=plan.model.name, **common)]
    # replica=1 stands for any replica number: it is host-chosen (a Kubernetes StatefulSet
    # pod sets SMLAAS_REPLICA from its ordinal), and replica 0 would leave it out.
    specs += [StageSpec(index=k, listen=_ANY, sealed_dir=SEALED_MOUNT, replica=1,
                        next_stages=(_ANY,) if k + 1 < count else (), **common)
              for k in range(count)]
    return specs


def render_role(spec: RoleSpec, layout: PythonLayout, sizing: EnclaveSizing,
                mounts: dict[str, str], *, debug: bool = False) -> tuple[str, str]:
    """``(role, manifest template)`` for one role: its measured argv fixed, its host options
    passed through, except those the mounts fix (the sealed directory, the state file)."""
    fixed = {"SMLAAS_BUILD": SEALED_MOUNT} if isinstance(spec, StageSpec) else {}
    if isinstance(spec, CoordinatorSpec):
        fixed["SMLAAS_STATE"] = spec.state_path
    return spec.role, render_manifest(role=spec.role, argv=spec.measured_argv(),
                                      layout=layout, sizing=sizing, mounts=mounts,
                                      passthrough_env=sorted(spec.host_env()),
                                      fixed_env=fixed, debug=debug)


def render_manifest(*, role: str, argv: list[str], layout: PythonLayout,
                    sizing: EnclaveSizing, mounts: dict[str, str],
                    passthrough_env: list[str], fixed_env: dict[str, str] | None = None,
                    debug: bool = False) -> str:
    """A Gramine manifest template (``gramine-manifest`` fills ``{{ gramine.* }}``).

    ``argv`` is the role's measured command line (``loader.argv``: fixed by the measurement,
    never taken from the host) after ``python -I -B -m smlaas``; ``passthrough_env`` names the
    host-chosen settings (addresses, threads) the host may pass in, ``fixed_env`` values the
    manifest fixes. Trusted files: the interpreter, its standard library, every import path
    (smlaas, ONNX Runtime, ...; an editable install's source tree) and the system libraries,
    so the measurement covers the code. ``mounts`` (enclave path -> host directory: the
    sealed stages, the coordinator's sealed state) are ``allowed``, not trusted: smlaas
    authenticates what it reads there itself (AES-GCM under keys only this measurement
    obtains).
    """
    if role.startswith("-") or not role:
        raise ConfigError(f"bad role {role!r}")
    fixed_env = dict(fixed_env or {})
    command = [layout.executable, *INTERPRETER_FLAGS, "-m", "smlaas", *argv]
    env = {"LD_LIBRARY_PATH": ":".join(_library_path(layout)), "OMP_NUM_THREADS": "1",
           "HOME": TMP, "LC_ALL": "C", **fixed_env, "SMLAAS_ROLE": role}
    env_lines = [f"loader.env.{name} = {_toml_string(value)}" for name, value in env.items()]
    env_lines += [f"loader.env.{name} = {{ passthrough = true }}"
                  for name in passthrough_env if name not in env]
    mount_lines = [f'  {{ type = "tmpfs", path = "{inside}" }},' if outside is None
                   else f'  {{ path = "{inside}", uri = "file:{outside}" }},'
                   for inside, outside in _mounts(layout, mounts)]
    trusted = _trusted(layout)
    allowed = [f'  "file:{outside.rstrip("/")}/",' for outside in mounts.values()]
    return f"""# smlaas {role}: Gramine manifest template (render with gramine-manifest, sign with
# gramine-sgx-sign). Generated by `smlaas gramine manifest`. NOT VERIFIED ON SGX HARDWARE.
# loader.argv is this role's measured configuration; the host may set only the passthrough
# variables below (where the role runs, not what it trusts).
# Python: {layout.describe()}
# Size: {sizing.basis}
libos.entrypoint = "{layout.interpreter}"
loader.entrypoint.uri = "file:{{{{ gramine.libos }}}}"
loader.log_level = "error"
loader.argv = [{", ".join(_toml_string(a) for a in command)}]
{chr(10).join(env_lines)}

fs.mounts = [
{chr(10).join(mount_lines)}
]

sys.enable_extra_runtime_domain_names_conf = true

sgx.debug = {"true" if debug else "false"}
sgx.edmm_enable = false
sgx.enclave_size = "{sizing.enclave_mib}M"
sgx.max_threads = {sizing.max_threads}
sgx.remote_attestation = "dcap"
sgx.isvprodid = 1
sgx.isvsvn = 1

sgx.trusted_files = [
{chr(10).join(f'  "file:{path}",' for path in trusted)}
]
sgx.allowed_files = [
{chr(10).join(allowed)}
]
"""


def _library_path(layout: PythonLayout) -> list[str]:
    """Gramine's glibc first (``/lib``), then a shared build's libpython, the system's."""
    dirs = ["/lib"]
    if layout.libpython:
        dirs.append(str(PurePosixPath(layout.libpython).parent))
    return _dedupe([*dirs, *SYSTEM_LIBRARY_DIRS])


def _mounts(layout: PythonLayout, mounts: dict[str, str]) -> list[tuple[str, str | None]]:
    """Every mount in order, parents first (host ``None``: in memory): Gramine's glibc, the
    system libraries, ``/usr``, the in-memory ``/tmp``, the Python installation's
    directories the others do not hold (same path inside as outside), and ``mounts``."""
    covered = [inside for inside, _ in FIXED_MOUNTS if inside != "/lib"]
    own = [(root, root) for root in layout.mount_roots()
           if not any(_under(root, c) for c in covered)]
    ordered: list[tuple[str, str | None]] = [*FIXED_MOUNTS, (TMP, None), *own]
    return ordered + list(mounts.items())


def _trusted(layout: PythonLayout) -> list[str]:
    """The trusted URIs' paths, none inside another directory entry."""
    entries = ["{{ gramine.libos }}", "{{ gramine.runtimedir() }}/", *layout.trusted(),
               *(d + "/" for d in SYSTEM_LIBRARY_DIRS)]
    kept: list[str] = []
    for entry in _dedupe(entries):
        if not any(other.endswith("/") and other != entry and _under(entry, other)
                   for other in entries):
            kept.append(entry)
    return kept


def _write(out_dir: Path, rendered: tuple[str, str]) -> Path:
    role, text = rendered
    path = out_dir / f"{role}.manifest.template"
    path.write_text(text)
    return path


def _under(path: str, root: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(root.rstrip("/") or "/"))


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
