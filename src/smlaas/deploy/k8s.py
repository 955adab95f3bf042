"""Kubernetes manifests for a build (``smlaas deploy --k8s-out DIR``).

One Deployment and Service per role. Stage pods ask the Intel SGX device plugin for
``sgx.intel.com/epc`` equal to the plan's predicted working set of that stage (rounded up to
a MiB; the cost model's figure, not a measurement), plus ``sgx.intel.com/enclave`` and
``sgx.intel.com/provision`` (DCAP quotes). Every container runs its role's spec
(:mod:`smlaas.deploy.roles`): its arguments for sim, or, for gramine, the role's measured
manifest with the host options in the environment. The sealed directory (sealed stages and
plan.json; never the owner keys) comes from a read-only PersistentVolumeClaim
``smlaas-build``. The owner still sets the manifest from outside the cluster (see
docs/DEPLOYING.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from smlaas.coordinator.manifest import GATEWAY_ROLE, stage_role
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.deploy.roles import CoordinatorSpec, GatewaySpec, RoleSpec, StageSpec
from smlaas.errors import ConfigError
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import ServingNote, sealed_directory

MIB = 1024 * 1024
IMAGE = "smlaas:latest"
COORDINATOR_PORT = 7443
STAGE_PORT = 9000
RUNTIME_EPC_MIB = 16
"""EPC for the runtime itself on top of the stage's working set (Python, ORT, TLS buffers)."""


def write_manifests(build_dir: Path, out_dir: Path, *, backend: str, port: int,
                    owner: OwnerKey, measurements: dict[str, str] | None = None,
                    image: str = IMAGE) -> list[Path]:
    """One Deployment and Service per role, from the same role specs as every launcher."""
    sealed = sealed_directory(build_dir)
    plan = read_plan(sealed)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(plan.stages)
    coordinator = CoordinatorSpec(backend=backend, owner_public_key=owner.public_key_hex,
                                  listen=("0.0.0.0", COORDINATOR_PORT),
                                  state_path="/state/coordinator.sealed")
    if backend == "sim":
        coordinator_mr = coordinator.sim_mrenclave()
    elif measurements and COORDINATOR_ROLE in measurements:
        coordinator_mr = measurements[COORDINATOR_ROLE]
    else:
        raise ConfigError("the gramine backend needs the coordinator's MRENCLAVE "
                          "(--measurements FILE, from gramine-sgx-sign)")
    common: dict[str, Any] = {"backend": backend, "coordinator_mrenclave": coordinator_mr,
                              "coordinator": (f"smlaas-{COORDINATOR_ROLE}", COORDINATOR_PORT)}
    documents = {COORDINATOR_ROLE: _role(coordinator, image, COORDINATOR_PORT,
                                         epc_mib=RUNTIME_EPC_MIB, state=True)}
    for stage in plan.stages:
        spec = StageSpec(index=stage.index, listen=("0.0.0.0", STAGE_PORT), sealed_dir="/build",
                         next_stages=((f"smlaas-{stage_role(stage.index + 1)}", STAGE_PORT),)
                         if stage.index + 1 < count else (), **common)
        documents[spec.role] = _role(spec, image, STAGE_PORT, epc_mib=math.ceil(
            stage.working_set_bytes / MIB) + RUNTIME_EPC_MIB, build=True)
    gateway = GatewaySpec(first_stages=((f"smlaas-{stage_role(0)}", STAGE_PORT),),
                          listen=("0.0.0.0", port), model_name=plan.model.name,
                          max_batch_size=ServingNote.of(plan).max_batch_size, **common)
    documents[GATEWAY_ROLE] = _role(gateway, image, port, epc_mib=RUNTIME_EPC_MIB,
                                    service_type="LoadBalancer")
    written = []
    for role, docs in documents.items():
        path = out_dir / f"{role}.yaml"
        path.write_text("---\n".join(to_yaml(d) for d in docs))
        written.append(path)
    return written


def _role(spec: RoleSpec, image: str, port: int, *, epc_mib: int, build: bool = False,
          state: bool = False, service_type: str = "ClusterIP") -> list[dict[str, Any]]:
    role, backend = spec.role, spec.backend
    name = f"smlaas-{role}"
    labels = {"app.kubernetes.io/name": "smlaas", "app.kubernetes.io/component": role}
    sgx = {"sgx.intel.com/epc": f"{epc_mib}Mi", "sgx.intel.com/enclave": 1,
           "sgx.intel.com/provision": 1} if backend != "sim" else {}
    mounts, volumes = [], []
    if build:
        mounts.append({"name": "build", "mountPath": "/build", "readOnly": True})
        volumes.append({"name": "build", "persistentVolumeClaim": {
            "claimName": "smlaas-build", "readOnly": True}})
    if state:
        mounts.append({"name": "state", "mountPath": "/state"})
        volumes.append({"name": "state", "emptyDir": {}})
    container: dict[str, Any] = {"name": role, "image": image, "ports": [{"containerPort": port}],
                                 "resources": {"limits": sgx, "requests": sgx} if sgx else {},
                                 "volumeMounts": mounts}
    if backend == "gramine":  # the measured manifest fixes the arguments; the host passes env
        container["command"] = ["gramine-sgx", role]
        container["env"] = [{"name": k, "value": v} for k, v in sorted(spec.host_env().items())]
    else:
        container["command"] = ["smlaas"]
        container["args"] = spec.to_argv()
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [container], "volumes": volumes}}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name,
                                                                   "labels": labels},
               "spec": {"type": service_type, "selector": labels,
                        "ports": [{"port": port, "targetPort": port}]}}
    return [deployment, service]


def to_yaml(value: Any, indent: int = 0) -> str:
    """YAML for dicts, lists and scalars (all Kubernetes manifests need)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}\n"
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}\n")
        return "".join(lines)
    if isinstance(value, list):
        if not value:
            return "[]\n"
        lines = []
        for item in value:
            if isinstance(item, dict | list) and item:
                body = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {body[indent + 2:]}")
            else:
                lines.append(f"{pad}- {_scalar(item)}\n")
        return "".join(lines)
    return f"{pad}{_scalar(value)}\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
