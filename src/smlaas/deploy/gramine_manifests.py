"""Writing one Gramine manifest per role of a sealed build (``smlaas gramine manifest``).

Each manifest fixes its role's measured command line (:mod:`smlaas.roles`) in
``loader.argv`` and lets the host pass only the host options, as environment variables. The
coordinator's manifest carries the owner's public key; the others carry the coordinator's
MRENCLAVE, which exists only once the coordinator's manifest is signed: so the first run
(without ``coordinator_mrenclave``) writes the coordinator's manifest only, and a second run,
given the MRENCLAVE gramine-sgx-sign printed, writes the gateway's and the stages'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smlaas.enclave.backends.gramine import MIN_ENCLAVE_MIB, enclave_size_mib, render_manifest
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import sealed_directory
from smlaas.plan.plan import Plan
from smlaas.roles import CoordinatorSpec, GatewaySpec, RoleSpec, StageSpec

SEALED_MOUNT = "/smlaas/sealed"
STATE_MOUNT = "/smlaas/state"
_ANY = ("0.0.0.0", 0)  # placement is not measured: any value stands for the host's choice


def write_manifests(directory: Path, out_dir: Path, *, owner_public_key: str,
                    coordinator_mrenclave: str | None, state_dir: Path,
                    debug: bool = False) -> list[Path]:
    """Writes ``<role>.manifest.template`` files into ``out_dir``; returns their paths."""
    sealed = sealed_directory(directory)
    plan = read_plan(sealed)
    out_dir.mkdir(parents=True, exist_ok=True)
    coordinator = CoordinatorSpec(backend="gramine", owner_public_key=owner_public_key,
                                  listen=_ANY, state_path=f"{STATE_MOUNT}/coordinator.sealed")
    written = [_write(out_dir, coordinator, MIN_ENCLAVE_MIB, {STATE_MOUNT: state_dir},
                      fixed_env={"SMLAAS_STATE": coordinator.state_path}, debug=debug)]
    if coordinator_mrenclave is None:
        return written
    for spec in role_specs(plan, coordinator_mrenclave):
        size = MIN_ENCLAVE_MIB if not isinstance(spec, StageSpec) else \
            enclave_size_mib(plan.stages[spec.index].working_set_bytes)
        fixed = {"SMLAAS_BUILD": SEALED_MOUNT} if isinstance(spec, StageSpec) else {}
        written.append(_write(out_dir, spec, size, {SEALED_MOUNT: sealed}, fixed_env=fixed,
                              debug=debug))
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


def _write(out_dir: Path, spec: RoleSpec, enclave_mib: int, mounts: dict[str, Path], *,
           fixed_env: dict[str, str], debug: bool) -> Path:
    text = render_manifest(role=spec.role, argv=spec.measured_argv(),
                           enclave_size_mib=enclave_mib, mounts=mounts,
                           passthrough_env=sorted(spec.host_env()), fixed_env=fixed_env,
                           debug=debug)
    path = out_dir / f"{spec.role}.manifest.template"
    path.write_text(text)
    return path
