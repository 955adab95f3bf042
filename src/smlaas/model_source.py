"""Opening the model a user names (an ONNX file, or a zoo entry) at its input sizes, and
reopening the one a plan was made from (checked against the plan's hash)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from smlaas import zoo
from smlaas.errors import ConfigError, ModelError
from smlaas.graph import InputSizes, check_model, load_model, parse_input_sizes, resolve_input_sizes
from smlaas.graph.kv_cache import find_kv_pairs
from smlaas.plan import ModelRef
from smlaas.plan.generation import GenerationSizes, decoder_input_sizes
from smlaas.profile import model_digest

__all__ = ["ModelSource", "open_model", "reopen_model"]


@dataclass(frozen=True)
class ModelSource:
    """A model as the user named it: a file or a zoo entry."""

    name: str
    source: str
    sha256: str
    model: onnx.ModelProto


def open_model(spec: str, input_size_specs: Sequence[str] = (), *,
               sample_shapes: Mapping[str, tuple[int, ...]] | None = None,
               generation: GenerationSizes | None = None
               ) -> tuple[ModelSource, InputSizes]:
    """Opens ``spec`` (a file path, or a zoo name when no such file exists) and resolves the
    ``--input-size`` specs against its inputs; an input without one takes the shape of its
    sample (``sample_shapes``), if any. A decoder takes the sizes of its decode step at
    ``generation``'s sizes instead (:func:`decoder_input_sizes`)."""
    if generation is not None and input_size_specs:
        raise ConfigError("--max-context/--max-sequences size a decoder's inputs; drop "
                          "--input-size")
    sizes = parse_input_sizes(input_size_specs)
    if sample_shapes and "" not in sizes:
        sizes = {**{k: tuple(v) for k, v in sample_shapes.items()}, **sizes}
    path = Path(spec)
    if path.exists() or spec.endswith(".onnx") or os.sep in spec:
        model = load_model(path)
        check_model(model, source=str(path))
        source = ModelSource(name=path.stem, source=str(path.resolve()),
                             sha256=_file_sha256(path), model=model)
    else:
        entry = zoo.get(spec.removeprefix(zoo.ZOO_PREFIX))
        size = sizes.get("") or (next(iter(sizes.values())) if sizes else None)
        model = entry.build(None if generation is not None else size)
        source = ModelSource(name=entry.name, source=zoo.ZOO_PREFIX + entry.name,
                             sha256=model_digest(model), model=model)
        if not sizes and not entry.is_decoder:
            sizes = {"": entry.default_input_size}
    if find_kv_pairs(source.model):
        sizes = decoder_input_sizes(source.model, generation or GenerationSizes())
    elif generation is not None:
        raise ConfigError(f"{spec} is not a decoder with a KV cache (no past_key_values.N / "
                          f"present.N pairs): --max-context/--max-sequences do not apply")
    return source, resolve_input_sizes(source.model, sizes)


def reopen_model(ref: ModelRef) -> onnx.ModelProto:
    """The model a plan was made from, checked against the plan's hash."""
    if ref.source.startswith(zoo.ZOO_PREFIX):
        first_shape = next(iter(ref.input_shapes.values()))
        entry = zoo.get(ref.source.removeprefix(zoo.ZOO_PREFIX))
        model = entry.build(None if entry.is_decoder else first_shape)
        digest = model_digest(model)
    else:
        model = load_model(ref.source)
        digest = _file_sha256(Path(ref.source))
    if digest != ref.sha256:
        raise ModelError(f"{ref.source} has changed since it was partitioned (sha256 "
                         f"{digest[:12]}... != {ref.sha256[:12]}...); partition it again")
    return model


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


