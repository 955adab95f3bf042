"""Kubernetes manifests for a sealed build (``smlaas deploy --k8s-out DIR``).

Every container runs its role's typed spec (:mod:`smlaas.roles`), the same one the
local and Ray launchers run: with the sim backend its arguments are the spec's ``to_argv()``
(after the image's ``ENTRYPOINT python -m smlaas``); with gramine it runs ``gramine-sgx
<role>``, whose signed manifest fixes ``measured_argv()``, and gets ``host_env()`` as its
environment. What is measured is what runs. The image is ``deploy/Dockerfile``.

Written to DIR (``kubectl apply -f DIR`` applies the files directly in it, not ``owner/``):

- ``build.yaml``: the build volume and the Job that fills it (note "build volume");
- ``quote-provider.yaml`` (gramine only): the DCAP quote provider's configuration (note "SGX");
- ``coordinator.yaml``: a StatefulSet of one, whose volumeClaimTemplate keeps the sealed state
  (manifest, CA key, issued certificates) across restarts and moves: an emptyDir would lose
  the deployment CA with the pod; and its headless Service ``smlaas-coordinator``;
- ``stage-K.yaml``: a Deployment and a Service, or a StatefulSet and a headless Service (note
  "replicas");
- ``gateway.yaml``: a Deployment and a LoadBalancer Service (HTTPS, and gRPC when asked);
- ``owner/manifest-job.yaml``: the owner's step as a Job (note "owner step").

Note "replicas". A role links to every replica of the next stage itself (least-outstanding
routing; unanswered requests resent to another replica: :mod:`smlaas.serving.link`), so it
needs one address per replica. A Service's virtual IP would hide the replicas behind one
address (kube-proxy picks a backend per connection): the upstream could neither balance
between them nor fail over. So a stage with several replicas is a StatefulSet governed by a
headless Service, whose pods have stable DNS names ``smlaas-stage-K-R.smlaas-stage-K``; all of
them go into the upstream's ``--next`` (the gateway's ``--first-stage``), comma-separated as
:func:`~smlaas.roles.addresses_text` writes them. Each pod takes its replica number from
its ``apps.kubernetes.io/pod-index`` label (Kubernetes 1.28 and later). The headless Service
publishes pods that are not ready yet, so a restarting replica keeps its name (the upstream
retries the link; it checks the peer's role itself). A stage with one replica is a Deployment
behind a ClusterIP Service, whose one name is all its upstream needs. To change a stage's
replicas, generate again (``--replicas``) rather than ``kubectl scale``: the upstream's
address list is part of its arguments.

Note "probes". The workers and the coordinator speak (mutual or RA-) TLS only, so their
probes are ``tcpSocket`` on their port; the gateway's are ``httpGet`` over HTTPS on
``/v2/health/live`` (liveness) and ``/v2/health/ready`` (readiness: ready through every
stage). A role listens only once it has registered, which waits for the owner's manifest, so
each has a startup probe that allows ten minutes before liveness counts.

Note "resources". A stage asks for as many CPUs as its ONNX Runtime threads (requests equal
to limits: Guaranteed QoS, so a kubelet with the static CPU manager gives it whole cores, the
cluster's counterpart of ``deploy --pin``), and for memory equal to the plan's *predicted*
working set plus a runtime allowance (:data:`RUNTIME_MEMORY_MIB`): a prediction of the cost
model, not a measurement, and said so in the manifest. With gramine every role also asks the
Intel SGX device plugin for ``sgx.intel.com/epc``, ``sgx.intel.com/enclave`` and
``sgx.intel.com/provision``; the EPC request is the role's Gramine enclave size, which the
manifests commit at start (EDMM off), sized by the same rule as ``smlaas gramine manifest``
from measured footprints (:mod:`smlaas.deploy.gramine_sizes`, notes "enclave size" and "EPC
request").

Note "SGX" (gramine). Quotes come from DCAP: out of process through the node's aesmd (the
socket directory ``/var/run/aesmd`` from the host, as Intel's SGX admission webhook mounts it
for ``sgx.intel.com/quote-provider: aesmd``, which the pods also carry), or in process through
the quote provider library, configured by ``/etc/sgx_default_qcnl.conf`` from the ConfigMap
``smlaas-sgx-qcnl``, which names the PCCS (``--pccs``). The node's aesmd (Intel's sgx_aesmd
DaemonSet) needs the same PCCS in its own copy of that file.

Note "build volume". The sealed directory (sealed stages and plan.json, never the owner's
keys) is on the PersistentVolumeClaim ``smlaas-build``, ReadOnlyMany so that stage pods on
every node can mount it, sized from the sealed directory. The Job ``smlaas-build-load`` fills
it once from an image of the sealed directory (``deploy/sealed.Dockerfile``; the tag is the
start of plan.json's SHA-256, and the Job checks that hash), mounting the claim writable:
the storage class must allow that (NFS, CephFS and most file stores do; a GCE persistent disk
must be filled through a ReadWriteOnce claim first). Nothing on the volume is trusted: each
worker checks its stage's SHA-256 against the signed manifest. The Job runs non-root (the
image's uid/gid, as every pod here) and writes the volume through ``fsGroup``; a store that
ignores fsGroup (NFS) must export a directory that uid or gid 10001 can write.

Note "pod security". Every pod meets the "restricted" Pod Security Standard (non-root with a
fixed uid/gid, seccomp RuntimeDefault, no privilege escalation, every capability dropped,
only configMap/secret/emptyDir/PVC volumes), so that a namespace can enforce it; except, with
gramine, the SGX roles' hostPath of the node's aesmd socket, which even "baseline" forbids.
The Kubernetes tests check every pod spec against the profile.

Note "owner step". The owner sets the manifest on the in-cluster coordinator with
``smlaas owner set-manifest`` (:meth:`smlaas.deploy.owner_plane.OwnerPlane.set_manifest_at`).
Safest from the owner's machine, through ``kubectl port-forward svc/smlaas-coordinator
7443``: the session is RA-TLS to the attested coordinator, and the keys never enter the
cluster. ``owner/manifest-job.yaml`` runs the same command as a Job, reading the owner's
signing key and keyfile from the Secret ``smlaas-owner`` (files ``owner.key`` and
``owner-keys.json``) that the owner creates: the generated files never hold either. That puts
both keys where the cluster's administrators and nodes can read them, which the trust model
(Kubernetes is not trusted) does not allow for real deployments.

Note "image". ``deploy/Dockerfile`` builds the image for the sim backend (with its simulation
PKI baked in, so that every pod trusts the same simulated root; the owner, who attests from
its own machine, trusts exactly that root: ``docker run --rm IMAGE attest sim-root >
sim-root.pem``, then ``smlaas owner set-manifest ... --sim-root sim-root.pem``). For gramine
the image must also hold Gramine and each role's signed manifest (``<role>.manifest.sgx`` and
``.sig`` in its working directory), rendered by ``smlaas gramine manifest BUILD --for-image``:
the image's Python and the paths these pods mount (``/build``, ``/state``), since a Gramine
manifest names the host paths it maps.

The manifests are validated against the Kubernetes API's schemas in the tests; no cluster
has run them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smlaas.coordinator.manifest import GATEWAY_ROLE, stage_role
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.deploy import k8s_objects as objects
from smlaas.deploy.gramine_sizes import EnclaveSizing, Footprints, size_roles
from smlaas.deploy.k8s_objects import USER_ID
from smlaas.deploy.k8s_yaml import Document, to_yaml, write_documents
from smlaas.deploy.topology import max_inflight, stage_replicas
from smlaas.enclave.backends.gramine import DEFAULT_PCCS_URL
from smlaas.enclave.policy import Policy
from smlaas.errors import ConfigError
from smlaas.export.build_dir import PLAN_FILE, read_plan
from smlaas.export.sealed_build import ServingNote, sealed_directory
from smlaas.plan.plan import Plan
from smlaas.roles import Address, CoordinatorSpec, GatewaySpec, RoleSpec, StageSpec

__all__ = ["USER_ID", "ClusterSettings", "render_manifests", "sealed_image", "to_yaml",
           "write_manifests"]

logger = logging.getLogger(__name__)
MIB = 1024 * 1024
IMAGE = "smlaas:latest"
COORDINATOR_PORT = 7443
STAGE_PORT = 9000
BUILD_MOUNT = "/build"
STATE_MOUNT = "/state"
OWNER_MOUNT = "/owner"
OWNER_CONFIG_MOUNT = "/owner-config"
BUILD_CLAIM = "smlaas-build"
OWNER_SECRET = "smlaas-owner"
OWNER_KEY_FILE = "owner.key"
OWNER_KEYS_FILE = "owner-keys.json"
QCNL_CONFIG_MAP = "smlaas-sgx-qcnl"
QCNL_FILE = "sgx_default_qcnl.conf"
AESMD_DIR = "/var/run/aesmd"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
RUNTIME_MEMORY_MIB = 512
"""Memory for Python, ONNX Runtime and smlaas before any model (an estimate, not a
measurement)."""
ROLE_MEMORY_MIB = 1024
"""The coordinator's memory and the gateway's before its queue: the allowance and its HTTP,
gRPC and batching machinery (an estimate, not a measurement)."""
STATE_VOLUME = "64Mi"  # one sealed file of a few KiB; provisioners round up to their minimum
BUILD_VOLUME_HEADROOM = 1.25  # file-system overhead, and room to load a slightly larger build
MIN_BUILD_VOLUME_MIB = 64
STARTUP_PERIOD_S = 5
STARTUP_FAILURES = 120  # ten minutes: registration waits for the owner's manifest
QCNL_CONFIG: dict[str, Any] = {"use_secure_cert": True, "retry_times": 6, "retry_delay": 10}
"""sgx_default_qcnl.conf besides ``pccs_url`` (the keys of Intel's sample configuration)."""


@dataclass(frozen=True)
class ClusterSettings:
    """What the manifests take besides the plan: the options of ``deploy --k8s-out``."""

    backend: str
    owner_public_key: str
    measurements: dict[str, str] = field(default_factory=dict)
    """role -> MRENCLAVE (gramine: the coordinator's at least; the owner's Job needs all)."""
    port: int = 8443
    grpc_port: int = 0
    """0: no gRPC endpoint."""
    image: str = IMAGE
    threads: int = 1
    """ONNX Runtime threads per stage replica, and its CPUs."""
    replicas: dict[int, int] | None = None
    """Stage index -> replicas, over the plan's (as the local deploy's ``replicas``)."""
    pccs_url: str | None = None
    """The PCCS for the quote provider (None: Intel's default, on localhost) and, when given,
    the manifest's collateral source."""
    policy: Policy | None = None
    max_batch_size: int | None = None
    """None: what seal recorded; 0: off (as the local deploy)."""
    max_inflight: int | None = None
    """Batches in the pipeline at once; None: one per stage replica (as the local deploy)."""
    footprints: Footprints | None = None
    """Measured footprints (``smlaas gramine measure``) for the EPC requests; None: the
    baseline the manifests use too."""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"a stage needs at least 1 thread (and CPU), not {self.threads}")
        for what, port in (("port", self.port), ("gRPC port", self.grpc_port)):
            if not 0 <= port < 65536 or (what == "port" and port == 0):
                raise ConfigError(f"the gateway's {what} must be in 1..65535, not {port}")


def write_manifests(build_dir: Path, out_dir: Path, *, backend: str, port: int,
                    owner: OwnerKey, measurements: dict[str, str] | None = None,
                    image: str = IMAGE, **options: Any) -> list[Path]:
    """Writes the manifests of the sealed ``build_dir`` into ``out_dir`` (see the module
    docstring); ``options`` are further :class:`ClusterSettings` fields. Returns the paths."""
    sealed = sealed_directory(build_dir)
    plan = read_plan(sealed)
    settings = ClusterSettings(backend=backend, owner_public_key=owner.public_key_hex,
                               measurements=dict(measurements or {}), port=port, image=image,
                               **options)
    sealed_bytes = sum(p.stat().st_size for p in sealed.rglob("*") if p.is_file())
    plan_sha256 = hashlib.sha256((sealed / PLAN_FILE).read_bytes()).hexdigest()
    files = render_manifests(plan, settings, sealed_bytes=sealed_bytes, plan_sha256=plan_sha256)
    missing = _unmeasured_roles(plan, settings)
    if missing:
        logger.warning("no MRENCLAVE for %s in the measurements: the owner's Job (owner/) "
                       "will refuse to set the manifest until they are given",
                       ", ".join(missing))
    return [write_documents(out_dir / name, documents) for name, documents in files.items()]


def render_manifests(plan: Plan, settings: ClusterSettings, *, sealed_bytes: int,
                     plan_sha256: str) -> dict[str, list[Document]]:
    """File name (relative to the output directory) -> its documents, each with the comment
    written above it. Pure: the same inputs give the same manifests."""
    return _Manifests(plan, settings, sealed_bytes=sealed_bytes, plan_sha256=plan_sha256).files()


def sealed_image(image: str, plan_sha256: str) -> str:
    """The sealed directory's image beside ``image``: ``REPO:TAG`` -> ``REPO-sealed:<plan>``."""
    slash = image.rfind("/")
    colon = image.rfind(":")
    repository = image[:colon] if colon > slash else image
    return f"{repository}-sealed:{plan_sha256[:12]}"


def _unmeasured_roles(plan: Plan, settings: ClusterSettings) -> list[str]:
    if settings.backend == "sim":
        return []
    roles = [GATEWAY_ROLE, *(stage_role(stage.index) for stage in plan.stages)]
    return [role for role in roles if role not in settings.measurements]


def _name(role: str) -> str:
    return f"smlaas-{role}"


class _Manifests:
    """Builds every document of one deployment from its role specs, in small steps."""

    def __init__(self, plan: Plan, settings: ClusterSettings, *, sealed_bytes: int,
                 plan_sha256: str) -> None:
        self.plan, self.settings = plan, settings
        self.sealed_bytes, self.plan_sha256 = sealed_bytes, plan_sha256
        self.sgx = settings.backend != "sim"
        self.replicas = stage_replicas(plan, settings.replicas)
        self.coordinator = CoordinatorSpec(
            backend=settings.backend, owner_public_key=settings.owner_public_key,
            listen=("0.0.0.0", COORDINATOR_PORT), state_path=f"{STATE_MOUNT}/coordinator.sealed")
        common: dict[str, Any] = {"backend": settings.backend,
                                  "coordinator_mrenclave": self._coordinator_mrenclave(),
                                  "coordinator": (_name(COORDINATOR_ROLE), COORDINATOR_PORT)}
        count = len(plan.stages)
        # Replica 0 in every spec: a StatefulSet's pods share one template and take their
        # replica number from the environment (note "replicas").
        self.stages = [StageSpec(index=k, listen=("0.0.0.0", STAGE_PORT), sealed_dir=BUILD_MOUNT,
                                 next_stages=self.addresses(k + 1) if k + 1 < count else (),
                                 threads=settings.threads, **common) for k in range(count)]
        self.gateway = GatewaySpec(
            first_stages=self.addresses(0), listen=("0.0.0.0", settings.port),
            model_name=plan.model.name, max_batch_size=self._max_batch_size(),
            max_inflight=max_inflight(settings.max_inflight, self.replicas),
            grpc_port=settings.grpc_port, **common)
        self.sizes: dict[str, EnclaveSizing] = size_roles(
            plan, footprints=settings.footprints, plan_sha256=plan_sha256,
            gateway_max_queue=self.gateway.max_queue)

    def addresses(self, index: int) -> tuple[Address, ...]:
        """Where stage ``index``'s replicas listen: the Service, or each pod's DNS name."""
        name = _name(stage_role(index))
        if self.replicas[index] == 1:
            return ((name, STAGE_PORT),)
        return tuple((f"{name}-{r}.{name}", STAGE_PORT) for r in range(self.replicas[index]))

    def files(self) -> dict[str, list[Document]]:
        files = {"build.yaml": self._build_volume()}
        if self.sgx:
            files["quote-provider.yaml"] = [self._qcnl_config_map()]
        files["coordinator.yaml"] = self._coordinator()
        for spec in self.stages:
            files[f"{spec.role}.yaml"] = self._stage(spec)
        files[f"{GATEWAY_ROLE}.yaml"] = self._gateway()
        files["owner/manifest-job.yaml"] = self._owner_job()
        return files

    # -- the roles -----------------------------------------------------------------------
    def _coordinator(self) -> list[Document]:
        spec, name = self.coordinator, _name(COORDINATOR_ROLE)
        container = self._container(spec, COORDINATOR_PORT, cpu="1",
                                    memory_mib=ROLE_MEMORY_MIB)
        container["volumeMounts"].append({"name": "state", "mountPath": STATE_MOUNT})
        pod = self._pod(container, security={"fsGroup": USER_ID,
                                             "fsGroupChangePolicy": "OnRootMismatch"})
        claim = {"metadata": {"name": "state"},
                 "spec": {"accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": STATE_VOLUME}}}}
        workload = objects.stateful_set(name, spec.role, replicas=1, pod=pod, claims=[claim])
        return [("The coordinator: its sealed state outlives the pod (volumeClaimTemplate).",
                 workload),
                ("Workers, the gateway and the owner reach the coordinator by this name.",
                 objects.service(name, spec.role, [("ratls", COORDINATOR_PORT)], headless=True))]

    def _stage(self, spec: StageSpec) -> list[Document]:
        stage = self.plan.stages[spec.index]
        working_set_mib = math.ceil(stage.working_set_bytes / MIB)
        container = self._container(spec, STAGE_PORT, cpu=str(self.settings.threads),
                                    memory_mib=working_set_mib + RUNTIME_MEMORY_MIB)
        container["volumeMounts"].append({"name": "build", "mountPath": BUILD_MOUNT,
                                          "readOnly": True})
        volume = {"name": "build",
                  "persistentVolumeClaim": {"claimName": BUILD_CLAIM, "readOnly": True}}
        replicas = self.replicas[spec.index]
        note = (f"Memory PREDICTED, not measured: working set {working_set_mib} MiB (cost "
                f"model: weights, live activations, runtime) + {RUNTIME_MEMORY_MIB} MiB runtime "
                f"allowance"
                + (f"; EPC the enclave size: {self.sizes[spec.role].basis}" if self.sgx
                   else ""))
        pod = self._pod(container, volumes=[volume], annotations={"smlaas/resources": note},
                        spread=True)
        comment = (f"Stage {spec.index}: {replicas} replica(s) of its ONNX Runtime worker. "
                   f"Memory is the plan's PREDICTED working set\n"
                   f"({working_set_mib} MiB) plus a runtime allowance, not a measurement"
                   + (f"; EPC its Gramine enclave size\n({self.sizes[spec.role].enclave_mib} "
                      f"MiB, committed at start: see smlaas/deploy/gramine_sizes.py)."
                      if self.sgx else "."))
        if replicas == 1:
            return [(comment, objects.deployment(_name(spec.role), spec.role, pod=pod)),
                    ("The upstream links to this stage through its Service.",
                     objects.service(_name(spec.role), spec.role, [("mtls", STAGE_PORT)]))]
        container["env"].append({"name": "SMLAAS_REPLICA", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}})
        return [(comment + "\nA StatefulSet: the upstream links to every replica by its DNS "
                 "name (stable pod names).",
                 objects.stateful_set(_name(spec.role), spec.role, replicas=replicas, pod=pod)),
                ("Headless: one DNS name per replica, ready or not (the upstream retries).",
                 objects.service(_name(spec.role), spec.role, [("mtls", STAGE_PORT)],
                                 headless=True, publish_not_ready=True))]

    def _gateway(self) -> list[Document]:
        spec, settings = self.gateway, self.settings
        first, last = self.plan.stages[0], self.plan.stages[-1]
        # Its queue holds at most max_queue requests, each an input and an output.
        queue_mib = math.ceil(spec.max_queue * (first.input_bytes + last.output_bytes) / MIB)
        ports = [("https", settings.port)] + ([("grpc", settings.grpc_port)]
                                              if settings.grpc_port else [])
        container = self._container(spec, settings.port, cpu="1",
                                    memory_mib=ROLE_MEMORY_MIB + queue_mib, ports=ports)
        container["livenessProbe"] = objects.http_probe("/v2/health/live", settings.port,
                                                        period_s=10, failures=3)
        container["readinessProbe"] = objects.http_probe("/v2/health/ready", settings.port,
                                                         period_s=5, failures=2)
        container["startupProbe"] = objects.http_probe("/v2/health/live", settings.port,
                                                       period_s=STARTUP_PERIOD_S,
                                                       failures=STARTUP_FAILURES)
        return [("The gateway: HTTPS (Open Inference Protocol) in front of stage 0.",
                 objects.deployment(_name(GATEWAY_ROLE), GATEWAY_ROLE,
                                    pod=self._pod(container))),
                ("Clients reach the gateway here; they pin the deployment CA and attest it.",
                 objects.service(_name(GATEWAY_ROLE), GATEWAY_ROLE, ports,
                                 service_type="LoadBalancer"))]

    # -- the build volume, the quote provider, the owner's step -----------------------------
    def _build_volume(self) -> list[Document]:
        size_mib = max(MIN_BUILD_VOLUME_MIB,
                       math.ceil(self.sealed_bytes * BUILD_VOLUME_HEADROOM / MIB))
        claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                 "metadata": {"name": BUILD_CLAIM, "labels": objects.labels("build")},
                 "spec": {"accessModes": ["ReadOnlyMany"],
                          "resources": {"requests": {"storage": f"{size_mib}Mi"}}}}
        image = sealed_image(self.settings.image, self.plan_sha256)
        script = ("set -eu\n"
                  "rm -f /build/plan.json /build/stage_*.sealed\n"
                  "cp -R /sealed/* /build/\n"  # entries only: /build is not ours to chmod
                  f"echo '{self.plan_sha256}  /build/plan.json' | sha256sum -c -\n")
        container = {"name": "load", "image": image, "command": ["sh", "-c", script],
                     "securityContext": objects.container_security(),
                     "resources": objects.resources(cpu="100m", memory_mib=64),
                     "volumeMounts": [{"name": "build", "mountPath": BUILD_MOUNT}]}
        # Non-root like every pod here: the volume is made writable for the image's group by
        # fsGroup (the kubelet chowns a new volume's root to it, setgid, group-writable); the
        # sealed image's files are world-readable.
        job = objects.job("smlaas-build-load", "build", containers=[container], volumes=[
            {"name": "build", "persistentVolumeClaim": {"claimName": BUILD_CLAIM}}],
            security={**objects.pod_security(), "fsGroup": USER_ID,
                      "fsGroupChangePolicy": "OnRootMismatch"})
        return [(f"The sealed directory ({self.sealed_bytes} bytes: sealed stages and plan.json, "
                 f"never the owner's keys),\nread-only to the stages.", claim),
                (f"Fills the volume once from the image of the sealed directory: build it with\n"
                 f"  docker build -f deploy/sealed.Dockerfile -t {image} build/sealed\n"
                 f"It mounts the claim writable, which the storage class must allow. It runs as "
                 f"uid/gid {USER_ID}, like\nevery pod here; fsGroup {USER_ID} makes the volume "
                 f"writable to it where the volume type applies fsGroup\n(block volumes, most "
                 f"CSI drivers). A store that ignores fsGroup (NFS) must export a directory that"
                 f"\nuid or gid {USER_ID} can write. {self._pod_security_note()}", job)]

    def _pod_security_note(self) -> str:
        if not self.sgx:
            return ("Every pod of these files meets the 'restricted' Pod Security Standard:\n"
                    "  kubectl label namespace NAMESPACE "
                    "pod-security.kubernetes.io/enforce=restricted")
        return (f"Every pod of these files meets the 'restricted' Pod Security Standard but for "
                f"the SGX roles'\nhostPath volume {AESMD_DIR} (the node's aesmd socket, for "
                f"out-of-process quotes), which even\n'baseline' forbids: such a namespace "
                f"cannot enforce either (warn=restricted shows the rest)")

    def _qcnl_config_map(self) -> Document:
        qcnl = {"pccs_url": self.settings.pccs_url or DEFAULT_PCCS_URL, **QCNL_CONFIG}
        config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": QCNL_CONFIG_MAP,
                                   "labels": objects.labels("quote-provider")},
                      "data": {QCNL_FILE: json.dumps(qcnl, indent=2) + "\n"}}
        return ("DCAP quote provider library configuration (in-process quotes): the PCCS that\n"
                "serves PCK certificates. The node's aesmd needs the same PCCS in its copy.",
                config_map)

    def _owner_job(self) -> list[Document]:
        settings = self.settings
        args = ["owner", "set-manifest", BUILD_MOUNT,
                "--keys", f"{OWNER_MOUNT}/{OWNER_KEYS_FILE}",
                "--key", f"{OWNER_MOUNT}/{OWNER_KEY_FILE}",
                "--coordinator", f"{_name(COORDINATOR_ROLE)}:{COORDINATOR_PORT}",
                # the names the gateway's certificate may carry: its Service's (the owner
                # adds a LoadBalancer's name with --gateway-host when run by hand)
                "--gateway-host", _name(GATEWAY_ROLE),
                "--coordinator-address", f"{_name(COORDINATOR_ROLE)}:{COORDINATOR_PORT}",
                "--backend", settings.backend, "--state-dir", "/tmp/owner", "--print-ca"]
        config: dict[str, str] = {}
        if self.sgx:
            config["measurements.json"] = json.dumps(settings.measurements, indent=2,
                                                     sort_keys=True) + "\n"
            args += ["--measurements", f"{OWNER_CONFIG_MOUNT}/measurements.json"]
        if settings.policy is not None:
            config["policy.toml"] = settings.policy.to_toml()
            args += ["--policy", f"{OWNER_CONFIG_MOUNT}/policy.toml"]
        if settings.pccs_url:
            args += ["--pccs", settings.pccs_url]
        if settings.max_batch_size is not None:
            args += ["--max-batch-size", str(settings.max_batch_size)]
        mounts = [{"name": "owner", "mountPath": OWNER_MOUNT, "readOnly": True},
                  {"name": "build", "mountPath": BUILD_MOUNT, "readOnly": True},
                  {"name": "tmp", "mountPath": "/tmp"}]
        volumes: list[dict[str, Any]] = [
            {"name": "owner", "secret": {"secretName": OWNER_SECRET, "defaultMode": 0o440}},
            {"name": "build", "persistentVolumeClaim": {"claimName": BUILD_CLAIM,
                                                        "readOnly": True}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}]
        documents: list[Document] = []
        if config:
            mounts.append({"name": "config", "mountPath": OWNER_CONFIG_MOUNT, "readOnly": True})
            volumes.append({"name": "config", "configMap": {"name": "smlaas-owner-config"}})
            documents.append(("What the owner's Job reads besides the keys: public values.", {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "smlaas-owner-config", "labels": objects.labels("owner")},
                "data": config}))
        container = {"name": "owner", "image": settings.image, "args": args,
                     "securityContext": objects.container_security(),
                     "resources": objects.resources(cpu="500m", memory_mib=ROLE_MEMORY_MIB),
                     "volumeMounts": mounts}
        job = objects.job("smlaas-owner-manifest", "owner", containers=[container],
                          volumes=volumes, security={**objects.pod_security(), "fsGroup": USER_ID})
        documents.append((
            f"The owner's step (`smlaas owner set-manifest`) against the coordinator. Create the\n"
            f"Secret first; this file never holds the keys:\n"
            f"  kubectl create secret generic {OWNER_SECRET} --from-file={OWNER_KEY_FILE}=OWNER_KEY"
            f" --from-file={OWNER_KEYS_FILE}=KEYFILE\n"
            f"That gives the owner's signing key and every stage key to whoever administers the\n"
            f"cluster. Safer: run the same command from the owner's machine through\n"
            f"  kubectl port-forward svc/{_name(COORDINATOR_ROLE)} {COORDINATOR_PORT}"
            + ("" if self.sgx else
               f"\nand, with the sim backend, trusting exactly the simulation root baked in the "
               f"image:\n  docker run --rm {settings.image} attest sim-root > sim-root.pem\n"
               f"  smlaas owner set-manifest ... --sim-root sim-root.pem"), job))
        return documents

    # -- pieces ----------------------------------------------------------------------------
    def _container(self, spec: RoleSpec, port: int, *, cpu: str, memory_mib: int,
                   ports: list[tuple[str, int]] | None = None) -> dict[str, Any]:
        epc_mib = self.sizes[spec.role].epc_request_mib  # note "resources"
        container: dict[str, Any] = {
            "name": spec.role, "image": self.settings.image,
            "ports": [{"name": name, "containerPort": number}
                      for name, number in ports or [("tls", port)]],
            "securityContext": objects.container_security(),
            "resources": objects.resources(
                cpu=cpu, memory_mib=memory_mib,
                sgx={"sgx.intel.com/epc": f"{epc_mib}Mi", "sgx.intel.com/enclave": "1",
                     "sgx.intel.com/provision": "1"} if self.sgx else None),
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            "env": []}
        if self.sgx:  # the signed manifest fixes the arguments; the host passes env only
            container["command"] = ["gramine-sgx", spec.role]
            container["env"] = [{"name": key, "value": value}
                                for key, value in sorted(spec.host_env().items())]
            container["env"].append({"name": "SGX_AESM_ADDR", "value": "1"})
            container["volumeMounts"] += [
                {"name": "aesmd-socket", "mountPath": AESMD_DIR},
                {"name": "qcnl", "mountPath": f"/etc/{QCNL_FILE}", "subPath": QCNL_FILE,
                 "readOnly": True}]
        else:
            container["args"] = spec.to_argv()
        container["startupProbe"] = objects.tcp_probe(port, period_s=STARTUP_PERIOD_S,
                                                      failures=STARTUP_FAILURES)
        container["readinessProbe"] = objects.tcp_probe(port, period_s=5, failures=2)
        container["livenessProbe"] = objects.tcp_probe(port, period_s=10, failures=3)
        return container

    def _pod(self, container: dict[str, Any], *, volumes: list[dict[str, Any]] | None = None,
             annotations: dict[str, str] | None = None, security: dict[str, Any] | None = None,
             spread: bool = False) -> dict[str, Any]:
        role = container["name"]
        all_volumes = [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
                       *(volumes or [])]
        annotations = dict(annotations or {})
        if self.sgx:
            annotations["sgx.intel.com/quote-provider"] = "aesmd"
            all_volumes += [
                {"name": "aesmd-socket", "hostPath": {"path": AESMD_DIR,
                                                      "type": "DirectoryOrCreate"}},
                {"name": "qcnl", "configMap": {"name": QCNL_CONFIG_MAP}}]
        spec: dict[str, Any] = {"automountServiceAccountToken": False,
                                "securityContext": {**objects.pod_security(), **(security or {})},
                                "containers": [container], "volumes": all_volumes}
        if spread:  # the plan assumed one machine per enclave: prefer stages apart
            spec["affinity"] = {"podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100, "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchExpressions": [{
                            "key": "app.kubernetes.io/component", "operator": "In",
                            "values": [stage_role(s.index) for s in self.plan.stages]}]}}}]}}
        metadata: dict[str, Any] = {"labels": objects.labels(role)}
        if annotations:
            metadata["annotations"] = annotations
        return {"metadata": metadata, "spec": spec}

    def _coordinator_mrenclave(self) -> str:
        if not self.sgx:
            return self.coordinator.sim_mrenclave()
        try:
            return self.settings.measurements[COORDINATOR_ROLE].lower()
        except KeyError:
            raise ConfigError("the gramine backend needs the coordinator's MRENCLAVE "
                              "(--measurements FILE, from gramine-sgx-sign)") from None

    def _max_batch_size(self) -> int:
        """As the local deploy decides it: 0 off, else what seal recorded unless asked."""
        recorded = ServingNote.of(self.plan).max_batch_size
        requested = self.settings.max_batch_size
        if requested == 0:
            return 0
        return recorded if recorded == 0 or requested is None else requested
