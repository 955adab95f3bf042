"""``smlaas owner``: the model owner's signing identity."""

from __future__ import annotations

import time
from pathlib import Path

import click

from smlaas.cli.console import console, print_json
from smlaas.coordinator.client import CoordinatorClient
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.deploy.roles import CoordinatorSpec
from smlaas.enclave.backends.sim import known_roots
from smlaas.enclave.policy import Policy
from smlaas.errors import CheckFailed
from smlaas.private_files import is_private
from smlaas.profile.cache import cache_dir
from smlaas.serving.enrol import BACKENDS, coordinator_policy, parse_address

_key = click.option("--key", "key_path", type=click.Path(dir_okay=False),
                    help="The owner key file (default: $SMLAAS_OWNER_KEY or "
                         "~/.config/smlaas/owner.key).")


@click.group()
def owner() -> None:
    """The owner's signing key: coordinators obey the owner whose public key they measure."""


@owner.command("init")
@_key
@click.option("--force", is_flag=True, help="Replace an existing key (every coordinator "
              "configured with the old one stops accepting your manifests).")
def owner_init(key_path: str | None, force: bool) -> int:
    """Create the owner signing key (ECDSA P-256, mode 0600)."""
    path = Path(key_path) if key_path else default_owner_key_path()
    key = OwnerKey.create()
    key.save(path, overwrite=force)
    mode = "0600" if is_private(path) else "NOT 0600: check the file system"
    console.print(f"owner key written to {path} (mode {mode}); fingerprint {key.fingerprint}")
    console.print("keep it secret: whoever holds it decides what your coordinators run")
    return 0


@owner.command("show")
@_key
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def owner_show(key_path: str | None, as_json: bool) -> int:
    """Print the owner's public key (what `smlaas coordinator --owner-public-key` takes)."""
    path = Path(key_path) if key_path else default_owner_key_path()
    key = OwnerKey.load(path)
    if as_json:
        print_json({"path": str(path), "public_key": key.public_key_hex,
                    "fingerprint": key.fingerprint})
    else:
        console.print(f"owner key {path}\n  fingerprint {key.fingerprint}\n  public key  "
                      f"{key.public_key_hex}")
    return 0


@owner.command("status")
@_key
@click.option("--coordinator", "address", required=True, metavar="HOST:PORT")
@click.option("--backend", type=click.Choice(BACKENDS), default="sim", show_default=True)
@click.option("--coordinator-mrenclave", metavar="HEX",
              help="The coordinator's MRENCLAVE (gramine; for sim it is computed from the "
                   "owner key).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def owner_status(key_path: str | None, address: str, backend: str,
                 coordinator_mrenclave: str | None, as_json: bool) -> int:
    """Attest a coordinator and print the manifest it holds (digest, version): compare with
    the last version you signed to see a rolled-back state."""
    key = OwnerKey.load(Path(key_path) if key_path else default_owner_key_path())
    if coordinator_mrenclave is None:
        if backend != "sim":
            raise click.UsageError("--coordinator-mrenclave is required with this backend")
        coordinator_mrenclave = CoordinatorSpec(
            backend="sim", owner_public_key=key.public_key_hex).sim_mrenclave()
    client = CoordinatorClient(*parse_address(address, what="--coordinator"),
                               policy=coordinator_policy(coordinator_mrenclave,
                                                         simulated=backend == "sim"),
                               roots=known_roots())
    status = client.status()
    if status.owner != key.fingerprint:
        raise CheckFailed(f"the coordinator obeys owner {status.owner}, not {key.fingerprint}")
    data = {"instance": status.instance, "owner": status.owner,
            "manifest_digest": status.manifest_digest,
            "manifest_version": status.manifest_version, "topology": list(status.topology)}
    if as_json:
        print_json(data)
    else:
        console.print(f"coordinator {address} attested (MRENCLAVE "
                      f"{coordinator_mrenclave[:16]}..., owner {status.owner})")
        console.print(f"  instance {status.instance}")
        console.print("  manifest " + (f"v{status.manifest_version} {status.manifest_digest}"
                                      if status.manifest_digest else "none set"))
    return 0


@owner.command("set-manifest")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@_key
@click.option("--keys", "keys_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The owner keyfile written by `smlaas seal` (the stage keys).")
@click.option("--coordinator", "address", required=True, metavar="HOST:PORT",
              help="The running coordinator (e.g. `kubectl port-forward "
                   "svc/smlaas-coordinator 7443` -> 127.0.0.1:7443).")
@click.option("--backend", type=click.Choice(BACKENDS), default="sim", show_default=True)
@click.option("--measurements", type=click.Path(exists=True, dir_okay=False),
              help="JSON role -> MRENCLAVE (gramine backend: every role's).")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML policy the manifest starts from; role measurements are added.")
@click.option("--pccs", "pccs_url", metavar="URL",
              help="The PCCS the coordinator must fetch registrants' collateral from.")
@click.option("--max-batch-size", type=click.IntRange(min=0),
              help="Dynamic batching limit (default: what `smlaas seal` recorded; 0 off).")
@click.option("--replace-manifest", is_flag=True,
              help="Replace another manifest the coordinator holds (next signed version).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where the CA and the gateway policy are written (default: a new "
                   "directory in the cache).")
@click.option("--print-ca", is_flag=True, help="Also print the deployment CA (PEM).")
def owner_set_manifest(build_dir: str, key_path: str | None, keys_path: str, address: str,
                       backend: str, measurements: str | None, policy_path: str | None,
                       pccs_url: str | None, max_batch_size: int | None,
                       replace_manifest: bool, state_dir: str | None, print_ca: bool) -> int:
    """Attest a coordinator that runs elsewhere (Kubernetes) and set the manifest of the
    sealed BUILD_DIR on it, with the stage keys; the roles then register on their own."""
    from smlaas.deploy.deployment import Deployment, DeploySettings, read_measurements
    from smlaas.deploy.launchers import ExternalLauncher

    state = Path(state_dir) if state_dir else \
        cache_dir() / "deployments" / time.strftime("%Y%m%d-%H%M%S")
    settings = DeploySettings(
        build_dir=Path(build_dir), keys_path=Path(keys_path), state_dir=state,
        owner_key_path=Path(key_path) if key_path else default_owner_key_path(),
        backend=backend, max_batch_size=max_batch_size,
        measurements=read_measurements(Path(measurements)) if measurements else None,
        policy=Policy.from_toml(policy_path).to_dict() if policy_path else None,
        collateral={"pccs_url": pccs_url} if pccs_url else {},
        replace_manifest=replace_manifest)
    deployment = Deployment(settings, ExternalLauncher(),
                            progress=lambda line: console.print(f"  {line}"))
    manifest = deployment.set_manifest_at(parse_address(address, what="--coordinator"))
    console.print(f"coordinator {address} holds {manifest.describe()} ({manifest.digest()})\n"
                  f"  CA     {deployment.ca_path}\n"
                  f"  policy {deployment.gateway_policy_path} (clients attest the gateway "
                  f"with it)")
    if print_ca:
        console.print(deployment.ca_path.read_text(), end="", markup=False, highlight=False)
    return 0
