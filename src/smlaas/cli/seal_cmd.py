"""``smlaas seal``: encrypt a build's stages for deployment."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console
from smlaas.export.sealed_build import SEALED_DIR, seal_build


@click.command()
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--keys", "keys_path", required=True, type=click.Path(dir_okay=False),
              help="Owner keyfile to write (mode 0600); keep it secret.")
def seal(build_dir: str, keys_path: str) -> int:
    """Seal every stage of BUILD_DIR with its own AES-256-GCM key."""
    keys = seal_build(Path(build_dir), Path(keys_path))
    console.print(f"sealed {len(keys.stage_keys)} stage(s) into {Path(build_dir) / SEALED_DIR}"
                  f"; keys in {keys_path} (mode 0600)")
    return 0
