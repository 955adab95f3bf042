"""``smlaas owner``: the model owner's signing identity."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console, print_json
from smlaas.coordinator.client import CoordinatorClient
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.deploy.roles import CoordinatorSpec
from smlaas.enclave.backends.sim import known_roots
from smlaas.errors import CheckFailed
from smlaas.private_files import is_private
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
