"""``smlaas deploy``: run a sealed build as an attested inference service on one machine.

This process is the owner plane (it loads the keys, attests, signs); the launcher runs in a
child process, the operator plane, with a minimal environment and no keys
(:class:`~smlaas.deploy.operator.OperatorProcess`). With ``--launcher ray`` that child is the
Ray driver: this process never imports Ray.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from smlaas.cli.console import console, stop_on_ctrl_c_and_sigterm
from smlaas.cli.owner_cmds import parse_duration
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.coordinator.release import DEFAULT_VALIDITY_S
from smlaas.deploy.deployment import Deployment, DeploySettings, read_measurements
from smlaas.deploy.operator import wait_forever
from smlaas.deploy.topology import parse_replicas
from smlaas.enclave.backends import BACKENDS
from smlaas.enclave.policy import Policy
from smlaas.paths import cache_dir


@click.command()
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--keys", "keys_path", type=click.Path(exists=True, dir_okay=False),
              help="The owner keyfile written by `smlaas seal` (required unless --k8s-out).")
@click.option("--owner-key", "owner_key_path", type=click.Path(dir_okay=False),
              help="The owner signing key (default: $SMLAAS_OWNER_KEY or "
                   "~/.config/smlaas/owner.key; create it with `smlaas owner init`).")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML policy the manifest starts from (TCB statuses, advisories, "
                   "evaluation number, collateral age); role measurements are added.")
@click.option("--pccs", "pccs_url", metavar="URL",
              help="The PCCS the coordinator must fetch registrants' collateral from.")
@click.option("--replace-manifest", is_flag=True,
              help="If the coordinator's state holds another manifest, replace it with this "
                   "one signed as the next version (default: refuse).")
@click.option("--launcher", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="local: processes here; ray: actors on `sgx` nodes.")
@click.option("--backend", type=click.Choice(BACKENDS), default="sim", show_default=True,
              help="Enclave backend (sim: SIMULATED, INSECURE; for development).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Gateway address.")
@click.option("--port", default=8443, show_default=True, type=click.IntRange(1, 65535),
              help="Gateway HTTPS port.")
@click.option("--grpc-port", type=click.IntRange(1, 65535),
              help="Also serve the KServe V2 gRPC API on this port (TLS, same CA).")
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False),
              help="Class labels, one per line, for the classification extension (the file's "
                   "SHA-256 goes in the signed manifest).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Coordinator state, CA and logs (default: a new directory in the cache).")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime threads per stage "
              "replica (default: this machine's cores divided among the stage replicas and "
              "the gateway; with --launcher ray: 1; with --k8s-out: 1, and as many CPUs).")
@click.option("--max-batch-size", type=click.IntRange(min=0),
              help="Dynamic batching limit (default: what `smlaas seal` checked and "
                   "recorded; 0 off).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=500,
              show_default=True)
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=30.0,
              show_default=True, help="Seconds the gateway gives a request (a request's V2 "
              "`timeout` parameter may ask for less, never more).")
@click.option("--max-inflight", type=click.IntRange(min=1),
              help="Batches in the pipeline at once (default: the number of stage replicas).")
@click.option("--measurements", type=click.Path(exists=True, dir_okay=False),
              help="JSON role -> MRENCLAVE (gramine backend).")
@click.option("--ray-address", help="Ray cluster to join (default: start a local one).")
@click.option("--placement", type=click.Choice(["spread", "pack"]),
              help="Ray: one stage enclave per node (spread, STRICT_SPREAD) or packed "
                   "(default: spread on a joined cluster, pack on a local one).")
@click.option("--k8s-out", type=click.Path(file_okay=False),
              help="Write Kubernetes manifests for this build to DIR and exit.")
@click.option("--k8s-image", default="smlaas:latest", show_default=True, metavar="IMAGE",
              help="With --k8s-out: the image built from deploy/Dockerfile.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=120.0, show_default=True)
@click.option("--replicas", "replica_specs", multiple=True, metavar="STAGE=COUNT",
              help="Serve stage STAGE with COUNT replicas, over the plan's (repeatable).")
@click.option("--pin", is_flag=True,
              help="Give each stage replica its own cores (and as many ONNX Runtime threads): "
                   "one machine per enclave, in miniature.")
@click.option("--gateway-host", "gateway_hosts", multiple=True, metavar="NAME",
              help="A further host name the gateway's certificate may carry (repeatable; "
                   "localhost, 127.0.0.1 and a non-wildcard --host always): the owner names "
                   "them in the manifest, the host cannot add any.")
@click.option("--release-validity", default=f"{DEFAULT_VALIDITY_S // 3600}h",
              show_default=True, callback=lambda _c, _p, v: parse_duration(v),
              help="How long the owner's release is valid (at most 24h; renew with `smlaas "
                   "owner release --refresh`).")
def deploy(build_dir: str, keys_path: str | None, owner_key_path: str | None,
           policy_path: str | None, pccs_url: str | None, replace_manifest: bool,
           launcher: str, backend: str, host: str, port: int, grpc_port: int | None,
           labels_path: str | None,
           state_dir: str | None,
           threads: int | None, max_batch_size: int | None, max_queue_delay_us: int,
           request_timeout: float, max_inflight: int | None, measurements: str | None,
           ray_address: str | None, placement: str | None,
           k8s_out: str | None, k8s_image: str, ready_timeout: float,
           replica_specs: tuple[str, ...], pin: bool, gateway_hosts: tuple[str, ...],
           release_validity: int) -> int:
    """Serve the sealed BUILD_DIR (the directory `smlaas seal` wrote, or the build holding
    it): coordinator, one worker per stage, gateway; Ctrl-C stops all."""
    owner_key = Path(owner_key_path) if owner_key_path else default_owner_key_path()
    if k8s_out:
        from smlaas.deploy.k8s import write_manifests

        written = write_manifests(
            Path(build_dir), Path(k8s_out), backend=backend, port=port,
            owner=OwnerKey.load(owner_key), image=k8s_image,
            measurements=read_measurements(Path(measurements)) if measurements else None,
            grpc_port=grpc_port or 0, threads=threads or 1,
            replicas=parse_replicas(replica_specs) or None, pccs_url=pccs_url,
            policy=Policy.from_toml(policy_path) if policy_path else None,
            max_batch_size=max_batch_size, max_inflight=max_inflight)
        console.print(f"wrote {len(written)} Kubernetes manifest files to {k8s_out}:")
        for path in written:
            console.print(f"  {path}")
        console.print(f"build and push the images (deploy/Dockerfile, deploy/sealed.Dockerfile: "
                      f"see build.yaml), `kubectl apply -f {k8s_out}`, then the owner's step "
                      f"(owner/manifest-job.yaml, or `smlaas owner set-manifest` through a "
                      f"port-forward); docs/DEPLOYING.md" + ("" if backend == "sim" else
                      "; the stage pods need the Intel SGX device plugin"))
        if backend != "sim" and not pccs_url:
            console.print("[yellow]no --pccs: the quote provider configuration names Intel's "
                          "default PCCS on localhost[/]")
        return 0
    if not keys_path:
        raise click.UsageError("--keys is required (the keyfile `smlaas seal` wrote)")
    if launcher == "local":  # the gateway listens here: a port in use fails now, in one line
        from smlaas.serving.gateway_process import check_port_free

        check_port_free(host, port, flag="--port")
        if grpc_port:
            check_port_free(host, grpc_port, flag="--grpc-port")
    if launcher == "ray" and ray_address and not _is_loopback(ray_address):
        raise click.UsageError(
            f"--ray-address {ray_address} is another machine's cluster. `smlaas deploy` runs "
            f"the owner plane and the operator plane on this machine as one user, so code the "
            f"cluster runs in the operator could read the owner's files here. Run the operator "
            f"plane on the cluster (`smlaas operator up SEALED --owner-public-key owner.pub "
            f"--launcher ray --ray-address {ray_address}`) and the owner's step here (`smlaas "
            f"owner set-manifest SEALED --keys KEYS --coordinator HOST:PORT`): "
            f"docs/DEPLOYING.md")
    state = Path(state_dir) if state_dir else \
        cache_dir() / "deployments" / time.strftime("%Y%m%d-%H%M%S")
    settings = DeploySettings(
        build_dir=Path(build_dir), keys_path=Path(keys_path), state_dir=state,
        owner_key_path=owner_key, backend=backend, host=host, port=port, grpc_port=grpc_port,
        labels_path=Path(labels_path) if labels_path else None,
        max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
        max_inflight=max_inflight, ready_timeout_s=ready_timeout,
        measurements=read_measurements(Path(measurements)) if measurements else None,
        policy=Policy.from_toml(policy_path).to_dict() if policy_path else None,
        collateral={"pccs_url": pccs_url} if pccs_url else {},
        replace_manifest=replace_manifest, replicas=parse_replicas(replica_specs) or None,
        pin=pin, gateway_hosts=gateway_hosts, release_validity_s=release_validity,
        threads=threads, gateway_options={"request_timeout_s": request_timeout})
    if backend == "sim":
        console.print("[bold yellow]sim backend: SIMULATED SGX, INSECURE[/] (no hardware "
                      "protection; for development and tests)")
    stop_on_ctrl_c_and_sigterm()
    deployment = Deployment.on_this_machine(settings, launcher=launcher,
                                            ray_address=ray_address, placement=placement,
                                            progress=lambda line: console.print(f"  {line}"))
    with deployment:
        console.print(f"[bold green]serving {deployment.model_name}[/] "
                      f"({deployment.stage_count} stages, replicas "
                      f"{'/'.join(map(str, deployment.replicas))}, "
                      f"{deployment.batching_note})\n"
                      f"  URL  {deployment.url}\n"
                      + (f"  gRPC {deployment.grpc_address}\n" if deployment.grpc_address
                         else "")
                      + f"  CA   {deployment.ca_path}\n"
                      f"  try  smlaas {_try(deployment)} --url {deployment.url} "
                      f"--ca {deployment.ca_path} (attests the gateway with "
                      f"{deployment.gateway_policy_path.name} and accepts only the owner's "
                      f"current release, checked with {deployment.owner_public_key_path.name})\n"
                      f"  Ctrl-C to stop")
        console.file.flush()  # whoever reads a pipe needs the URL now, not at exit
        try:
            wait_forever(deployment.launcher)
        except KeyboardInterrupt:
            console.print("stopping...")
    console.print("stopped")
    return 0


def _is_loopback(address: str) -> bool:
    """Whether a Ray address (HOST:PORT, ray://HOST:PORT, or 'auto'/'local') is this
    machine's loopback."""
    import ipaddress

    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "auto", "local"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _try(deployment: Deployment) -> str:
    """What to try on the deployment: a generation for a decoder, an inference otherwise."""
    if deployment.owner_plane.plan.generation is not None:
        return 'generate "Hello"'
    return "infer --input x.npy"
