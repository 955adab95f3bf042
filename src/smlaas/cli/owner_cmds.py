"""``smlaas owner``: the model owner's signing identity."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console, print_json
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.private_files import is_private

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
