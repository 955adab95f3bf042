"""``smlaas gramine manifest``: Gramine manifests for every role of a build."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console
from smlaas.export.gramine_manifests import write_manifests


@click.group()
def gramine() -> None:
    """Real SGX with Gramine (manifests; not yet verified on hardware)."""


@gramine.command("manifest")
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--coordinator", default="127.0.0.1:7443", show_default=True,
              help="Address the enclaves register with.")
@click.option("--debug-enclave", is_flag=True, help="sgx.debug = true (INSECURE).")
def gramine_manifest(build_dir: str, coordinator: str, debug_enclave: bool) -> int:
    """Write BUILD_DIR/gramine/<role>.manifest.template for every role."""
    for path in write_manifests(Path(build_dir), coordinator=coordinator,
                                debug=debug_enclave):
        console.print(f"wrote {path}")
    console.print("render with gramine-manifest and sign with gramine-sgx-sign; the hardware "
                  "path is not yet verified (no SGX machine available to this project)")
    return 0
