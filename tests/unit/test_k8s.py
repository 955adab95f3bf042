"""Kubernetes manifests: valid against the API schemas, the role specs' own command lines,
replicas as StatefulSets, probes, resources, the build volume, the owner's Job, the image."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from smlaas.coordinator.owner import OwnerKey
from smlaas.deploy.gramine_sizes import size_roles
from smlaas.deploy.k8s import (
    RUNTIME_MEMORY_MIB,
    USER_ID,
    ClusterSettings,
    render_manifests,
    sealed_image,
    to_yaml,
    write_manifests,
)
from smlaas.enclave.sealing import OwnerKeys
from smlaas.errors import ConfigError
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import ServingNote, sealed_directory
from smlaas.roles import CoordinatorSpec, GatewaySpec, StageSpec, addresses_text
from tests.builds import sealed_chain_build

KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
PCCS = "https://pccs.example:8081/sgx/certification/v4/"
REPLICAS = {1: 2}
THREADS = 2
MR = "ab" * 32


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return sealed_chain_build(tmp_path_factory.mktemp("k8s"))


def _generate(build: tuple[Path, Path, Path], out: Path, backend: str,
              **options: Any) -> dict[str, list[dict[str, Any]]]:
    build_dir, _, owner_path = build
    measurements = {"coordinator": MR, "gateway": "01" * 32,
                    **{f"stage-{k}": f"{k:02x}" * 32 for k in range(8)}}
    written = write_manifests(build_dir, out, backend=backend, port=8443,
                              owner=OwnerKey.load(owner_path), measurements=measurements,
                              **{"replicas": REPLICAS, "threads": THREADS, "pccs_url": PCCS,
                                 **options})
    return {str(path.relative_to(out)): list(yaml.safe_load_all(path.read_text()))
            for path in written}


@pytest.fixture(scope="module", params=["sim", "gramine"])
def generated(request: pytest.FixtureRequest, build: tuple[Path, Path, Path],
              tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    backend = request.param
    return backend, _generate(build, tmp_path_factory.mktemp(f"out-{backend}"), backend,
                              grpc_port=8001)


def _find(files: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    for documents in files.values():
        for document in documents:
            if document["kind"] == kind and document["metadata"]["name"] == name:
                return document
    raise AssertionError(f"no {kind} {name}")


def _workload(files: dict[str, list[dict[str, Any]]], role: str) -> dict[str, Any]:
    return next(d for d in files[f"{role}.yaml"] if d["kind"] in ("Deployment", "StatefulSet"))


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _expected_stage(build: tuple[Path, Path, Path], index: int, backend: str) -> StageSpec:
    """The StageSpec a stage pod must run, built here independently of the generator."""
    plan = read_plan(sealed_directory(build[0]))
    owner = OwnerKey.load(build[2])
    mrenclave = MR if backend == "gramine" else CoordinatorSpec(
        backend="sim", owner_public_key=owner.public_key_hex).sim_mrenclave()
    following = index + 1
    if following == len(plan.stages):
        next_stages: tuple[tuple[str, int], ...] = ()
    elif REPLICAS.get(following, 1) > 1:
        next_stages = tuple((f"smlaas-stage-{following}-{r}.smlaas-stage-{following}", 9000)
                            for r in range(REPLICAS[following]))
    else:
        next_stages = ((f"smlaas-stage-{following}", 9000),)
    return StageSpec(index=index, backend=backend, coordinator_mrenclave=mrenclave,
                     coordinator=("smlaas-coordinator", 7443), listen=("0.0.0.0", 9000),
                     sealed_dir="/build", next_stages=next_stages, threads=THREADS)


def test_yaml_emitter_round_trips() -> None:
    value = {"a": [1, {"b": "x: y", "c": [True, "q\"uote"]}], "d": {}, "e": [], "f": {"g": 2},
             "script": "set -eu\necho 'a  b'\n", "no_newline": "one\ntwo", "on": "yes",
             "n": None, "odd key": " lead\n", "number": "1e3", "tabs": "\tx\ny"}
    assert yaml.safe_load(to_yaml(value)) == value
    assert "script: |\n" in to_yaml(value)  # several lines stay readable


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_document_is_valid_kubernetes(
        generated: tuple[str, dict[str, list[dict[str, Any]]]], version: str) -> None:
    _, files = generated
    kinds = set()
    for documents in files.values():
        for document in documents:
            # strict: no field the API does not know (a typo would pass a lax schema)
            kubernetes_validate.validate(document, version, strict=True)
            kinds.add(document["kind"])
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim",
            "Job"} <= kinds


def test_validation_catches_a_bad_document() -> None:
    """The schema check is not vacuous: an unknown field and a wrong type are refused."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {},
                    "template": {"spec": {"containers": [{"name": "a", "imag": "b"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30", strict=True)


def test_files_and_their_kinds(generated: tuple[str, dict[str, list[dict[str, Any]]]],
                               build: tuple[Path, Path, Path]) -> None:
    backend, files = generated
    plan = read_plan(sealed_directory(build[0]))
    stages = [f"stage-{s.index}.yaml" for s in plan.stages]
    expected = {"build.yaml", "coordinator.yaml", "gateway.yaml", "owner/manifest-job.yaml",
                *stages} | ({"quote-provider.yaml"} if backend == "gramine" else set())
    assert set(files) == expected
    assert [d["kind"] for d in files["build.yaml"]] == ["PersistentVolumeClaim", "Job"]
    assert [d["kind"] for d in files["coordinator.yaml"]] == ["StatefulSet", "Service"]
    assert [d["kind"] for d in files["gateway.yaml"]] == ["Deployment", "Service"]


def test_stage_pods_run_their_spec(generated: tuple[str, dict[str, list[dict[str, Any]]]],
                                   build: tuple[Path, Path, Path]) -> None:
    backend, files = generated
    plan = read_plan(sealed_directory(build[0]))
    for stage in plan.stages:
        spec = _expected_stage(build, stage.index, backend)
        container = _container(_workload(files, spec.role))
        replicated = REPLICAS.get(stage.index, 1) > 1
        replica_env = {"name": "SMLAAS_REPLICA", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}}
        assert (replica_env in container["env"]) == replicated
        if backend == "sim":  # the image's ENTRYPOINT is `python -m smlaas`
            assert "command" not in container
            assert container["args"] == spec.to_argv()
        else:  # the signed Gramine manifest fixes measured_argv(); the host passes env
            assert container["command"] == ["gramine-sgx", spec.role]
            assert "args" not in container
            values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            assert {k: v for k, v in values.items() if k.startswith("SMLAAS_")} == \
                spec.host_env()
            assert values["SGX_AESM_ADDR"] == "1"


def test_gateway_and_coordinator_run_their_specs(
        generated: tuple[str, dict[str, list[dict[str, Any]]]],
        build: tuple[Path, Path, Path]) -> None:
    backend, files = generated
    owner = OwnerKey.load(build[2])
    coordinator = CoordinatorSpec(backend=backend, owner_public_key=owner.public_key_hex,
                                  listen=("0.0.0.0", 7443),
                                  state_path="/state/coordinator.sealed")
    stage = _expected_stage(build, 0, backend)
    plan = read_plan(sealed_directory(build[0]))
    gateway = GatewaySpec(backend=backend, coordinator_mrenclave=stage.coordinator_mrenclave,
                          coordinator=stage.coordinator, first_stages=(("smlaas-stage-0", 9000),),
                          listen=("0.0.0.0", 8443), model_name=plan.model.name,
                          max_batch_size=ServingNote.of(plan).max_batch_size,
                          max_inflight=len(plan.stages) - len(REPLICAS) + sum(REPLICAS.values()),
                          grpc_port=8001)  # one per stage replica
    for spec in (coordinator, gateway):
        container = _container(_workload(files, spec.role))
        if backend == "sim":
            assert container["args"] == spec.to_argv()
        else:
            values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            assert {k: v for k, v in values.items() if k.startswith("SMLAAS_")} == \
                spec.host_env()


def test_replicated_stage_is_a_stateful_set_every_upstream_links_to(
        build: tuple[Path, Path, Path], tmp_path: Path) -> None:
    files = _generate(build, tmp_path, "sim", replicas={0: 3, 1: 2})
    gateway = _container(_workload(files, "gateway"))
    first = gateway["args"][gateway["args"].index("--first-stage") + 1]
    assert first == addresses_text(tuple((f"smlaas-stage-0-{r}.smlaas-stage-0", 9000)
                                         for r in range(3)))
    stage0 = _container(_workload(files, "stage-0"))
    assert stage0["args"][stage0["args"].index("--next") + 1] == \
        "smlaas-stage-1-0.smlaas-stage-1:9000,smlaas-stage-1-1.smlaas-stage-1:9000"
    stage1 = _container(_workload(files, "stage-1"))
    assert stage1["args"][stage1["args"].index("--next") + 1] == "smlaas-stage-2:9000"
    for role, count in (("stage-0", 3), ("stage-1", 2)):
        workload, service = files[f"{role}.yaml"]
        assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == count
        assert workload["spec"]["serviceName"] == service["metadata"]["name"] == f"smlaas-{role}"
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]
    workload, service = files["stage-2.yaml"]
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == 1
    assert "clusterIP" not in service["spec"]


def test_plan_replicas_are_read_and_overridden(build: tuple[Path, Path, Path]) -> None:
    """A plan whose stages carry ``replicas`` (planner dp-replicas) gets them; the override
    wins, as with the local deploy."""
    plan = read_plan(sealed_directory(build[0]))
    object.__setattr__(plan.stages[2], "replicas", 3)  # the field another branch adds
    owner = OwnerKey.load(build[2])
    settings = ClusterSettings(backend="sim", owner_public_key=owner.public_key_hex)
    files = render_manifests(plan, settings, sealed_bytes=1, plan_sha256="0" * 64)
    assert files["stage-2.yaml"][0][1]["kind"] == "StatefulSet"
    assert files["stage-2.yaml"][0][1]["spec"]["replicas"] == 3
    override = ClusterSettings(backend="sim", owner_public_key=owner.public_key_hex,
                               replicas={2: 1})
    files = render_manifests(plan, override, sealed_bytes=1, plan_sha256="0" * 64)
    assert files["stage-2.yaml"][0][1]["kind"] == "Deployment"
    with pytest.raises(ConfigError, match="names stage 9"):
        render_manifests(plan, ClusterSettings(backend="sim",
                                               owner_public_key=owner.public_key_hex,
                                               replicas={9: 2}),
                         sealed_bytes=1, plan_sha256="0" * 64)


def test_probes(generated: tuple[str, dict[str, list[dict[str, Any]]]],
                build: tuple[Path, Path, Path]) -> None:
    _, files = generated
    plan = read_plan(sealed_directory(build[0]))
    for role, port in [("coordinator", 7443), *((f"stage-{s.index}", 9000)
                                                for s in plan.stages)]:
        container = _container(_workload(files, role))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # mutual TLS only: a TCP connect is all a probe can do
            assert container[probe]["tcpSocket"] == {"port": port}, (role, probe)
        assert container["startupProbe"]["failureThreshold"] * \
            container["startupProbe"]["periodSeconds"] >= 300  # waits for the owner's step
    gateway = _container(_workload(files, "gateway"))
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8443,
                                                   "scheme": "HTTPS"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8443,
                                                    "scheme": "HTTPS"}
    service = files["gateway.yaml"][1]
    assert service["spec"]["type"] == "LoadBalancer"
    assert {p["port"] for p in service["spec"]["ports"]} == {8443, 8001}


def test_resources(generated: tuple[str, dict[str, list[dict[str, Any]]]],
                   build: tuple[Path, Path, Path]) -> None:
    backend, files = generated
    plan = read_plan(sealed_directory(build[0]))
    for stage in plan.stages:
        workload = _workload(files, f"stage-{stage.index}")
        resources = _container(workload)["resources"]
        assert resources["requests"] == resources["limits"]  # Guaranteed QoS
        working_set_mib = math.ceil(stage.working_set_bytes / 2**20)
        assert resources["limits"]["cpu"] == str(THREADS)  # = its ONNX Runtime threads
        assert resources["limits"]["memory"] == f"{working_set_mib + RUNTIME_MEMORY_MIB}Mi"
        assert "PREDICTED" in workload["spec"]["template"]["metadata"]["annotations"][
            "smlaas/resources"]
        sgx = {k: v for k, v in resources["limits"].items() if k.startswith("sgx.intel.com/")}
        if backend == "gramine":
            # EPC: the stage's Gramine enclave size, committed at start (gramine_sizes)
            enclave_mib = size_roles(plan)[f"stage-{stage.index}"].enclave_mib
            assert sgx == {"sgx.intel.com/epc": f"{enclave_mib}Mi",
                           "sgx.intel.com/enclave": "1", "sgx.intel.com/provision": "1"}
        else:
            assert sgx == {}
    for role in ("coordinator", "gateway"):
        resources = _container(_workload(files, role))["resources"]
        assert resources["requests"] == resources["limits"]
        assert ("sgx.intel.com/epc" in resources["limits"]) == (backend == "gramine")


def test_quote_provider(generated: tuple[str, dict[str, list[dict[str, Any]]]]) -> None:
    backend, files = generated
    roles = [name[:-5] for name in files if name.startswith(("stage-", "coordinator",
                                                               "gateway"))]
    if backend == "sim":
        assert "quote-provider.yaml" not in files
        for role in roles:
            pod = _workload(files, role)["spec"]["template"]
            assert not any("hostPath" in v for v in pod["spec"]["volumes"])
        return
    (config_map,) = files["quote-provider.yaml"]
    assert json.loads(config_map["data"]["sgx_default_qcnl.conf"])["pccs_url"] == PCCS
    for role in roles:
        pod = _workload(files, role)["spec"]["template"]
        assert pod["metadata"]["annotations"]["sgx.intel.com/quote-provider"] == "aesmd"
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["aesmd-socket"]["hostPath"]["path"] == "/var/run/aesmd"
        assert volumes["qcnl"]["configMap"]["name"] == config_map["metadata"]["name"]
        mounts = {m["mountPath"]: m for m in _container({"spec": {"template": pod}})[
            "volumeMounts"]}
        assert mounts["/var/run/aesmd"]["name"] == "aesmd-socket"
        assert mounts["/etc/sgx_default_qcnl.conf"]["subPath"] == "sgx_default_qcnl.conf"


def test_build_volume(generated: tuple[str, dict[str, list[dict[str, Any]]]],
                      build: tuple[Path, Path, Path]) -> None:
    _, files = generated
    sealed = sealed_directory(build[0])
    claim, job = files["build.yaml"]
    assert claim["metadata"]["name"] == "smlaas-build"
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    size = sum(p.stat().st_size for p in sealed.rglob("*") if p.is_file())
    assert int(claim["spec"]["resources"]["requests"]["storage"][:-2]) >= size / 2**20
    plan_sha = hashlib.sha256((sealed / "plan.json").read_bytes()).hexdigest()
    (loader,) = job["spec"]["template"]["spec"]["containers"]
    assert loader["image"] == sealed_image("smlaas:latest", plan_sha)
    assert f"{plan_sha}  /build/plan.json" in loader["command"][-1]  # the right build
    for role in (name[:-5] for name in files if name.startswith("stage-")):
        pod = _workload(files, role)["spec"]["template"]["spec"]
        claims = [v["persistentVolumeClaim"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [{"claimName": "smlaas-build", "readOnly": True}]
        mount = next(m for m in _container({"spec": {"template": {"spec": pod}}})[
            "volumeMounts"] if m["name"] == "build")
        assert mount == {"name": "build", "mountPath": "/build", "readOnly": True}


def test_build_volume_size_follows_the_sealed_directory(build: tuple[Path, Path, Path]) -> None:
    plan = read_plan(sealed_directory(build[0]))
    settings = ClusterSettings(backend="sim",
                               owner_public_key=OwnerKey.load(build[2]).public_key_hex)
    files = render_manifests(plan, settings, sealed_bytes=10 * 2**30, plan_sha256="0" * 64)
    claim = files["build.yaml"][0][1]
    assert claim["spec"]["resources"]["requests"]["storage"] == f"{10 * 1024 * 5 // 4}Mi"


def test_coordinator_keeps_its_state_on_a_claim(
        generated: tuple[str, dict[str, list[dict[str, Any]]]],
        build: tuple[Path, Path, Path]) -> None:
    backend, files = generated
    workload, service = files["coordinator.yaml"]
    assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == 1
    (claim,) = workload["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = workload["spec"]["template"]["spec"]
    assert not any(v["name"] == "state" for v in pod["volumes"])  # no emptyDir for it
    mounts = {m["name"]: m["mountPath"] for m in _container(workload)["volumeMounts"]}
    assert mounts["state"] == "/state"
    assert service["metadata"]["name"] == "smlaas-coordinator"
    if backend == "sim":
        args = _container(workload)["args"]
        assert args[args.index("--state") + 1] == "/state/coordinator.sealed"
        assert OwnerKey.load(build[2]).public_key_hex in args


def test_owner_job_reads_the_keys_from_a_secret_only(
        generated: tuple[str, dict[str, list[dict[str, Any]]]],
        build: tuple[Path, Path, Path]) -> None:
    from smlaas.cli.owner_cmds import owner_set_manifest

    backend, files = generated
    _, keys_path, owner_path = build
    job = _find(files, "Job", "smlaas-owner-manifest")
    pod = job["spec"]["template"]["spec"]
    secret = next(v["secret"] for v in pod["volumes"] if "secret" in v)
    assert secret["secretName"] == "smlaas-owner"
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:2] == ["owner", "set-manifest"]
    assert args[args.index("--key") + 1] == "/owner/owner.key"
    assert args[args.index("--keys") + 1] == "/owner/owner-keys.json"
    assert args[args.index("--coordinator") + 1] == "smlaas-coordinator:7443"
    assert args[args.index("--backend") + 1] == backend
    known = {opt for param in owner_set_manifest.params for opt in param.opts}
    assert {a for a in args if a.startswith("--")} <= known  # the command takes them all
    # Neither key is written anywhere: not the signing key, not a stage key.
    text = json.dumps(files)
    private = OwnerKey.load(owner_path).private_key
    scalar = private.private_numbers().private_value
    assert f"{scalar:x}" not in text and str(scalar) not in text
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    assert pem.splitlines()[1] not in text
    stage_keys = OwnerKeys.load(keys_path).stage_keys
    assert stage_keys
    for key in stage_keys.values():
        assert key.hex() not in text and base64.b64encode(key).decode() not in text


# -- the "restricted" Pod Security Standard --------------------------------------------------
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec breaks the "restricted" Pod Security Standard (its baseline checks
    included), as Kubernetes' pod-security admission checks it at the latest version:
    https://kubernetes.io/docs/concepts/security/pod-security-standards/"""
    found: list[str] = []
    pod_context = pod.get("securityContext", {})
    containers = [*pod.get("containers", []), *pod.get("initContainers", []),
                  *pod.get("ephemeralContainers", [])]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"pod: {field}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {', '.join(sorted(kinds))}")
    for sysctl in pod_context.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"pod: sysctl {sysctl['name']}")

    def either(container: dict[str, Any], field: str) -> Any:
        context = container.get("securityContext", {})
        return context[field] if field in context else pod_context.get(field)

    for context_owner, context in [("pod", pod_context), *(
            (c["name"], c.get("securityContext", {})) for c in containers)]:
        if context.get("runAsUser") == 0:
            found.append(f"{context_owner}: runAsUser 0")
        if context.get("windowsOptions", {}).get("hostProcess"):
            found.append(f"{context_owner}: hostProcess")
        selinux = context.get("seLinuxOptions", {})
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or \
                selinux.get("role"):
            found.append(f"{context_owner}: seLinuxOptions {selinux}")
        for profile_field in ("seccompProfile", "appArmorProfile"):
            if context.get(profile_field, {}).get("type") == "Unconfined":
                found.append(f"{context_owner}: {profile_field} Unconfined")
    for container in containers:
        name, context = container["name"], container.get("securityContext", {})
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if either(container, "runAsNonRoot") is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if either(container, "seccompProfile") is None or either(
                container, "seccompProfile").get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: no seccompProfile RuntimeDefault or Localhost")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add {capabilities['add']}")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {context['procMount']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


def _pod_specs(files: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """'KIND NAME' -> its pod spec, for every document that makes pods."""
    specs = {}
    for documents in files.values():
        for document in documents:
            if document["kind"] == "Pod":
                specs[f"Pod {document['metadata']['name']}"] = document["spec"]
            elif "template" in document.get("spec", {}):
                specs[f"{document['kind']} {document['metadata']['name']}"] = \
                    document["spec"]["template"]["spec"]
    return specs


def test_every_pod_meets_the_restricted_pod_security_standard(
        generated: tuple[str, dict[str, list[dict[str, Any]]]]) -> None:
    backend, files = generated
    pods = _pod_specs(files)
    assert {"Job smlaas-build-load", "Job smlaas-owner-manifest", "StatefulSet "
            "smlaas-coordinator", "Deployment smlaas-gateway"} <= set(pods)
    for name, pod in pods.items():
        violations = restricted_violations(pod)
        if backend == "gramine" and not name.startswith("Job "):
            # the node's aesmd socket for out-of-process quotes: a documented exception
            assert violations == ["volume aesmd-socket: hostPath"], (name, violations)
        else:
            assert violations == [], (name, violations)


def test_the_restricted_checker_is_not_vacuous() -> None:
    """The build Job as it was (busybox's root, no pod securityContext), and worse, fail."""
    old_job = {"restartPolicy": "Never", "containers": [{
        "name": "load", "image": "busybox", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "build", "persistentVolumeClaim": {"claimName": "b"}}]}
    assert restricted_violations(old_job) == [
        "load: runAsNonRoot is not true", "load: no seccompProfile RuntimeDefault or Localhost"]
    worse = {"hostNetwork": True, "securityContext": {
        "runAsNonRoot": True, "runAsUser": 0, "seccompProfile": {"type": "Unconfined"},
        "sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
        "containers": [{"name": "c", "ports": [{"containerPort": 1, "hostPort": 1}],
                        "securityContext": {"privileged": True, "procMount": "Unmasked",
                                            "capabilities": {"add": ["SYS_ADMIN"]}}}],
        "initContainers": [{"name": "i", "securityContext": {"runAsNonRoot": False}}],
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    found = restricted_violations(worse)
    for expected in ("pod: hostNetwork", "volume h: hostPath", "pod: sysctl kernel.msgmax",
                     "pod: runAsUser 0", "pod: seccompProfile Unconfined", "c: privileged",
                     "c: allowPrivilegeEscalation is not false",
                     "c: capabilities do not drop ALL", "c: capabilities add ['SYS_ADMIN']",
                     "c: procMount Unmasked", "c: hostPort", "i: runAsNonRoot is not true",
                     "c: no seccompProfile RuntimeDefault or Localhost"):
        assert expected in found, (expected, found)


def test_build_job_runs_non_root_and_can_write_its_volume(
        generated: tuple[str, dict[str, list[dict[str, Any]]]], tmp_path: Path) -> None:
    backend, files = generated
    pod = _find(files, "Job", "smlaas-build-load")["spec"]["template"]["spec"]
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    for field in ("runAsUser", "runAsGroup", "fsGroup"):  # fsGroup: the volume is writable
        assert context[field] == USER_ID != 0, field
    (loader,) = pod["containers"]
    assert loader["securityContext"]["allowPrivilegeEscalation"] is False
    assert loader["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert loader["volumeMounts"] == [{"name": "build", "mountPath": "/build"}]  # writable
    claim = next(v for v in pod["volumes"] if v["name"] == "build")
    assert "readOnly" not in claim["persistentVolumeClaim"]
    # The script only writes inside the volume, never chmods its root: run it as uid/gid
    # 10001 against a directory as fsGroup leaves a volume (root's, group 10001, setgid,
    # group-writable), holding a stage file of an earlier load, from root's read-only files.
    as_user = os.geteuid() == 0 and shutil.which("setpriv") is not None
    # pytest's directories are root's alone: the user needs one it can reach
    root = Path(tempfile.mkdtemp(prefix="smlaas-k8s-")) if as_user else tmp_path
    try:
        sealed, volume = root / "sealed", root / "volume"
        sealed.mkdir()
        volume.mkdir()
        (sealed / "plan.json").write_text("{}")
        (sealed / "stage_0.sealed").write_bytes(b"x")
        (volume / "stage_0.sealed").write_bytes(b"old")
        script = re.sub(r"[0-9a-f]{64}", hashlib.sha256(b"{}").hexdigest(),
                        loader["command"][-1])
        script = script.replace("/sealed", str(sealed)).replace("/build/", f"{volume}/")
        command = ["sh", "-c", script]
        if as_user:
            root.chmod(0o755)
            os.chown(volume, 0, USER_ID)
            volume.chmod(0o2775)
            command = ["setpriv", f"--reuid={USER_ID}", f"--regid={USER_ID}",
                       "--clear-groups", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert (volume / "stage_0.sealed").read_bytes() == b"x"
        assert (volume / "plan.json").stat().st_uid == (USER_ID if as_user else os.geteuid())
    finally:
        if as_user:
            shutil.rmtree(root)
    text = (Path(__file__).parents[2] / "deploy" / "sealed.Dockerfile").read_text()
    assert f"USER {USER_ID}:{USER_ID}" in text


@pytest.mark.parametrize("backend", ["sim", "gramine"])
def test_the_files_say_how_to_enforce_the_profile_and_get_the_sim_root(
        build: tuple[Path, Path, Path], backend: str) -> None:
    plan = read_plan(sealed_directory(build[0]))
    settings = ClusterSettings(backend=backend, measurements={"coordinator": MR},
                               owner_public_key=OwnerKey.load(build[2]).public_key_hex,
                               image="registry.example/smlaas:1")
    files = render_manifests(plan, settings, sealed_bytes=1, plan_sha256="0" * 64)
    loader_comment = files["build.yaml"][1][0]
    owner_comment = files["owner/manifest-job.yaml"][-1][0]
    enforce = "kubectl label namespace NAMESPACE pod-security.kubernetes.io/enforce=restricted"
    sim_root = "docker run --rm registry.example/smlaas:1 attest sim-root > sim-root.pem"
    if backend == "sim":
        assert enforce in loader_comment
        assert sim_root in owner_comment and "--sim-root sim-root.pem" in owner_comment
    else:
        assert enforce not in loader_comment and "hostPath volume /var/run/aesmd" in \
            loader_comment
        assert "sim-root" not in owner_comment


def test_gramine_needs_the_coordinator_measurement(build: tuple[Path, Path, Path],
                                                   tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="coordinator's MRENCLAVE"):
        write_manifests(build[0], tmp_path, backend="gramine", port=8443,
                        owner=OwnerKey.load(build[2]), measurements={})


def test_sealed_image_name() -> None:
    sha = "1d53a4638a75" + "0" * 52
    assert sealed_image("smlaas:latest", sha) == "smlaas-sealed:1d53a4638a75"
    assert sealed_image("registry:5000/team/smlaas:1.0", sha) == \
        "registry:5000/team/smlaas-sealed:1d53a4638a75"
    assert sealed_image("registry:5000/smlaas", sha) == "registry:5000/smlaas-sealed:1d53a4638a75"


def test_deploy_k8s_out_passes_its_options(build: tuple[Path, Path, Path],
                                           tmp_path: Path) -> None:
    from click.testing import CliRunner

    from smlaas.cli.main import cli

    build_dir, _, owner_path = build
    result = CliRunner().invoke(cli, [
        "deploy", str(build_dir), "--owner-key", str(owner_path), "--k8s-out",
        str(tmp_path / "k8s"), "--replicas", "1=2", "--threads", "3",
        "--k8s-image", "registry.example/smlaas:1"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "k8s" / "stage-1.yaml").read_text()
    assert any(line.startswith("#") and "PREDICTED" in line for line in text.splitlines())
    stage1 = next(yaml.safe_load_all(text))
    assert stage1["kind"] == "StatefulSet" and stage1["spec"]["replicas"] == 2
    container = _container(stage1)
    assert container["image"] == "registry.example/smlaas:1"
    assert container["resources"]["limits"]["cpu"] == "3"
    assert "owner/manifest-job.yaml" in result.output


def test_dockerfile(repo_root: Path) -> None:
    text = (repo_root / "deploy" / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                            if not line.startswith("#")))
    instructions = [line.split(None, 1) for line in logical.splitlines() if line.strip()]
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1] == f"{USER_ID}:{USER_ID}"  # the manifests' runAsUser
    assert instructions[-1] == ["ENTRYPOINT", '["python", "-m", "smlaas"]']
    for op, rest in instructions:
        if op == "COPY":  # only the package's own files, and they exist
            for source in rest.split()[:-1]:
                assert (repo_root / source).exists(), source
    sealed = (repo_root / "deploy" / "sealed.Dockerfile").read_text()
    assert "COPY . /sealed/" in sealed
