"""Kubernetes objects as plain dicts: the generic pieces of :mod:`smlaas.deploy.k8s`
(workloads, Services, Jobs, probes, resources, security contexts), with nothing of smlaas's
roles in them."""

from __future__ import annotations

from typing import Any

USER_ID = 10001
"""The non-root uid and gid of deploy/Dockerfile."""


def labels(component: str) -> dict[str, str]:
    """The selector labels of one component (a role, the build volume, the owner's Job)."""
    return {"app.kubernetes.io/name": "smlaas", "app.kubernetes.io/component": component}


def pod_security() -> dict[str, Any]:
    """Non-root as the image's user, the runtime's default seccomp profile."""
    return {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    """No privilege escalation, no capabilities, a read-only root (writes go to /tmp)."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}}


def resources(*, cpu: str, memory_mib: int, sgx: dict[str, str] | None = None
              ) -> dict[str, Any]:
    """Requests equal to limits: Guaranteed QoS (:mod:`smlaas.deploy.k8s`, note
    "resources"); ``sgx`` adds the Intel SGX device plugin's resources."""
    amounts = {"cpu": cpu, "memory": f"{memory_mib}Mi", **(sgx or {})}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def tcp_probe(port: int, *, period_s: int, failures: int) -> dict[str, Any]:
    """A TCP connect: all a probe can do against a (mutual) TLS-only port."""
    return {"tcpSocket": {"port": port}, "periodSeconds": period_s, "timeoutSeconds": 2,
            "failureThreshold": failures}


def http_probe(path: str, port: int, *, period_s: int, failures: int) -> dict[str, Any]:
    """A GET over HTTPS (the kubelet does not check the certificate)."""
    return {"httpGet": {"path": path, "port": port, "scheme": "HTTPS"},
            "periodSeconds": period_s, "timeoutSeconds": 2, "failureThreshold": failures}


def deployment(name: str, component: str, *, pod: dict[str, Any]) -> dict[str, Any]:
    """One pod kept running, reached through a Service."""
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels(component)},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels(component)},
                     "template": pod}}


def stateful_set(name: str, component: str, *, replicas: int, pod: dict[str, Any],
                 claims: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Pods with stable names (``NAME-R.NAME``, through the headless Service ``name``) and,
    with ``claims``, a volume of their own each that outlives them."""
    spec: dict[str, Any] = {"serviceName": name, "replicas": replicas,
                            "podManagementPolicy": "Parallel",  # replicas do not wait in turn
                            "selector": {"matchLabels": labels(component)}, "template": pod}
    if claims:
        spec["volumeClaimTemplates"] = claims
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "labels": labels(component)}, "spec": spec}


def service(name: str, component: str, ports: list[tuple[str, int]], *,
            headless: bool = False, publish_not_ready: bool = False,
            service_type: str = "ClusterIP") -> dict[str, Any]:
    """``ports``: (name, number) pairs, the same number on the pods."""
    spec: dict[str, Any] = {"type": service_type, "selector": labels(component),
                            "ports": [{"name": port_name, "port": port, "targetPort": port}
                                      for port_name, port in ports]}
    if headless:
        spec["clusterIP"] = "None"
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": labels(component)}, "spec": spec}


def job(name: str, component: str, *, containers: list[dict[str, Any]],
        volumes: list[dict[str, Any]], security: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """Runs once to success; failed pods are kept (their logs) and retried."""
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "automountServiceAccountToken": False,
                                "containers": containers, "volumes": volumes}
    if security:
        pod_spec["securityContext"] = security
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": labels(component)},
            "spec": {"backoffLimit": 10,  # the coordinator or the volume may not be ready yet
                     "template": {"metadata": {"labels": labels(component)},
                                  "spec": pod_spec}}}
