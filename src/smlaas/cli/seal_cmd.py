"""``smlaas seal``: encrypt a build's stages into a sealed-only deploy directory."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import DEFAULT_MAX_BATCH, SEALED_DIR, ServingNote, seal_build
from smlaas.private_files import is_private


@click.command()
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--keys", "keys_path", required=True, type=click.Path(dir_okay=False),
              help="Owner keyfile to write (mode 0600); keep it secret.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help=f"The sealed directory to write (default: BUILD_DIR/{SEALED_DIR}).")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=DEFAULT_MAX_BATCH,
              show_default=True, help="Largest dynamic batch to allow if the stages batch "
              "correctly (checked now, on the plaintext); 0: never batch.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, exists=True),
              help="A decoder's tokenizer.json, bound into the sealed plan for the gateway's "
                   "text endpoints (default: BUILD_DIR/tokenizer.json if there is one).")
def seal(build_dir: str, keys_path: str, out_dir: str | None, max_batch_size: int,
         tokenizer: str | None) -> int:
    """Seal every stage of BUILD_DIR with its own AES-256-GCM key.

    Writes the keyfile first, then a directory holding plan.json and the sealed stages
    only: deploy that directory; the plaintext build never leaves your machine."""
    out = Path(out_dir) if out_dir else Path(build_dir) / SEALED_DIR
    keys = seal_build(Path(build_dir), Path(keys_path), out_dir=out,
                      max_batch_size=max_batch_size,
                      tokenizer=Path(tokenizer) if tokenizer else None)
    mode = "mode 0600" if is_private(Path(keys_path)) else "WARNING: not mode 0600"
    console.print(f"sealed {len(keys.stage_keys)} stage(s) into {out} (plan.json and sealed "
                  f"stages only; {ServingNote.of(read_plan(out)).batching}); keys in "
                  f"{keys_path} ({mode})")
    return 0
