"""``smlaas gramine manifest``: Gramine manifests for every role of a sealed build."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.deploy.gramine_manifests import write_manifests


@click.group()
def gramine() -> None:
    """Real SGX with Gramine (manifests; not yet verified on hardware)."""


@gramine.command("manifest")
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--owner-key", "key_path", type=click.Path(dir_okay=False),
              help="The owner key the coordinator will obey (default: `smlaas owner`'s).")
@click.option("--coordinator-mrenclave", metavar="HEX",
              help="The signed coordinator's MRENCLAVE (from gramine-sgx-sign): needed to "
                   "write the gateway's and the stages' manifests.")
@click.option("--state-dir", type=click.Path(file_okay=False), default="/var/lib/smlaas",
              show_default=True, help="Host directory for the coordinator's sealed state.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where to write (default: BUILD_DIR/gramine).")
@click.option("--debug-enclave", is_flag=True, help="sgx.debug = true (INSECURE).")
def gramine_manifest(build_dir: str, key_path: str | None, coordinator_mrenclave: str | None,
                     state_dir: str, out_dir: str | None, debug_enclave: bool) -> int:
    """Write <role>.manifest.template for every role of the sealed BUILD_DIR."""
    owner = OwnerKey.load(Path(key_path) if key_path else default_owner_key_path())
    out = Path(out_dir) if out_dir else Path(build_dir) / "gramine"
    written = write_manifests(Path(build_dir), out, owner_public_key=owner.public_key_hex,
                              coordinator_mrenclave=coordinator_mrenclave,
                              state_dir=Path(state_dir), debug=debug_enclave)
    for path in written:
        console.print(f"wrote {path}")
    if coordinator_mrenclave is None:
        console.print("next: render and sign the coordinator's manifest (gramine-manifest, "
                      "gramine-sgx-sign), then run again with --coordinator-mrenclave HEX for "
                      "the gateway's and the stages'")
    console.print("the hardware path is not yet verified (no SGX machine available to this "
                  "project)")
    return 0
