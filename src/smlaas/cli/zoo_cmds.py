"""``smlaas zoo list`` and ``smlaas zoo export``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import click
import onnx

from smlaas import zoo as zoo_models
from smlaas.cli.console import console, print_json, table
from smlaas.errors import BuildDirError, ZooError
from smlaas.graph import fix_input_sizes, parse_input_sizes, resolve_input_sizes


@click.group("zoo")
def zoo_group() -> None:
    """The research prototype's models, built as ONNX with seeded weights."""


@zoo_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def zoo_list(as_json: bool) -> int:
    """List the zoo's models."""
    entries = zoo_models.list_models()
    if as_json:
        print_json([{"name": e.name, "description": e.description,
                     "default_input_size": list(e.default_input_size),
                     "kv_cache": e.is_decoder} for e in entries])
        return 0
    console.print(table("smlaas zoo", ["name", "default input", "description"],
                        [[e.name, _default_input(e), e.description] for e in entries]))
    return 0


def _default_input(entry: zoo_models.ZooModel) -> str:
    if entry.is_decoder:
        return "symbolic"
    return ",".join(map(str, entry.default_input_size))


@zoo_group.command("export")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the .onnx file.")
@click.option("--input-size", "--input_size", "input_size", default=None,
              help="Fix the input shape, e.g. 1,3,224,224 (default: symbolic batch).")
def zoo_export(name: str, output: str, input_size: str | None) -> int:
    """Write zoo model NAME as an ONNX file (byte-identical on every run); a text generator's
    tokenizer.json goes next to it."""
    entry = zoo_models.get(name)
    if entry.is_decoder and input_size:
        raise ZooError(f"{name} is a KV-cache decoder whose batch and sequence axes stay "
                       f"symbolic; export it without --input-size")
    sizes = parse_input_sizes([input_size]) if input_size else {}
    model = entry.build(sizes.get("") if sizes else None)
    if sizes:
        model = fix_input_sizes(model, resolve_input_sizes(model, sizes))
    path = Path(output)
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise BuildDirError(f"cannot write {path}: {path.parent} is not a writable directory")
    _write_atomically(path, lambda tmp: onnx.save(model, str(tmp)))
    also = ""
    if entry.tokenizer_json is not None:
        text = entry.tokenizer_json()
        tokenizer_path = path.with_name("tokenizer.json")
        _write_atomically(tokenizer_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        also = f" and its tokenizer {tokenizer_path}"
    console.print(f"wrote {path} ({zoo_models.count_parameters(model):,} parameters, "
                  f"{path.stat().st_size / 2**20:.1f} MiB){also}")
    return 0


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
