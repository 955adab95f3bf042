"""Sealing a build for deployment: a directory with the plan and the sealed stages only.

Layout (``smlaas seal BUILD --keys KEYFILE`` writes ``BUILD/sealed``)::

    SEALED/plan.json          the build's plan, with the serving decisions recorded in
                              ``notes.serving`` (whether the stages batch, and up to what size)
    SEALED/stage_<k>.sealed   one AES-256-GCM sealed sub-model per stage

No plaintext stage is ever in it: the deployment (and every launcher, disk and host it
touches) gets this directory, never the build. Dynamic batching is decided here, while the
plaintext is at hand, by running the stages at batch 2 against two requests alone
(:func:`smlaas.export.batching.batching_problem`).

Order of writing: the owner keyfile first (atomically, 0600), then the sealed files, so that a
crash never leaves sealed files whose keys are lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from tokenizers import Tokenizer

from smlaas.enclave.sealing import KEY_BYTES, OwnerKeys, seal
from smlaas.errors import BuildDirError
from smlaas.export.batching import batching_problem
from smlaas.export.build_dir import PLAN_FILE, TOKENIZER_FILE, read_plan, stage_paths
from smlaas.plan.generation import TOKENIZER_NOTE
from smlaas.plan.plan import Plan
from smlaas.profile.inputs import random_inputs
from smlaas.runtime.sealed_stage import sealed_path, unseal_stage

__all__ = ["SEALED_DIR", "ServingNote", "plaintext_stages", "seal_build", "sealed_directory",
           "sealed_path", "unseal_stage"]

logger = logging.getLogger(__name__)
SEALED_DIR = "sealed"
DEFAULT_MAX_BATCH = 8
SERVING_NOTE = "serving"


@dataclass(frozen=True)
class ServingNote:
    """What seal decided for serving, recorded in plan.json's ``notes.serving``."""

    max_batch_size: int
    """0: no batching."""
    batching: str

    @classmethod
    def of(cls, plan: Plan) -> ServingNote:
        raw = plan.notes.get(SERVING_NOTE)
        if not isinstance(raw, dict):
            return cls(0, "dynamic batching off: the plan records no serving decision (seal "
                          "it again)")
        return cls(int(raw.get("max_batch_size", 0)), str(raw.get("batching", "")))


def seal_build(build_dir: Path, keys_path: Path, *, out_dir: Path | None = None,
               max_batch_size: int = DEFAULT_MAX_BATCH,
               tokenizer: Path | None = None) -> OwnerKeys:
    """Seals every stage of ``build_dir`` with a fresh random key into a sealed-only
    directory (default ``BUILD/sealed``); writes the keyfile first. A decoder's
    ``tokenizer`` (default: the build's tokenizer.json, if any) goes into plan.json, which
    the owner's manifest binds (see NOTE_TOKENIZER)."""
    build_dir = Path(build_dir)
    out = Path(out_dir) if out_dir else build_dir / SEALED_DIR
    plan = read_plan(build_dir)
    if tokenizer is None and (build_dir / TOKENIZER_FILE).is_file():
        tokenizer = build_dir / TOKENIZER_FILE
    paths = stage_paths(build_dir, plan)
    if any(p.with_name(p.name + ".data").exists() for p in paths):
        raise BuildDirError("stages with external weight files cannot be sealed yet")
    plaintexts = [p.read_bytes() for p in paths]
    note = _serving_note(plan, plaintexts, max_batch_size)
    plan_json = _plan_with_note(build_dir, note, _tokenizer_note(plan, tokenizer))
    keys = OwnerKeys(
        hashlib.sha256(plan_json).hexdigest(),
        {s.index: os.urandom(KEY_BYTES) for s in plan.stages},
        {s.index: hashlib.sha256(data).hexdigest() for s, data in zip(plan.stages, plaintexts)})
    keys.save(Path(keys_path))
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (staging / PLAN_FILE).write_bytes(plan_json)
        for stage, data in zip(plan.stages, plaintexts):
            sealed_path(staging, stage.index).write_bytes(
                seal(data, key=keys.stage_keys[stage.index], stage=stage.index))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("sealed %d stage(s) of %s into %s (%s)", len(plan.stages), build_dir, out,
                note.batching)
    return keys


def sealed_directory(path: Path) -> Path:
    """The sealed-only directory to deploy: ``path`` itself, or ``path/sealed`` for a build.

    Raises:
        BuildDirError: neither holds a plan and sealed stages.
    """
    path = Path(path)
    for candidate in (path, path / SEALED_DIR):
        if (candidate / PLAN_FILE).is_file() and any(candidate.glob("stage_*.sealed")):
            return candidate
    raise BuildDirError(f"{path} holds no sealed build; run `smlaas seal {path} --keys "
                        f"KEYFILE` first")


def plaintext_stages(directory: Path) -> list[Path]:
    """Plaintext sub-models in ``directory`` (there must be none in a deploy directory)."""
    return sorted(p for p in Path(directory).iterdir() if p.suffix in (".onnx", ".data"))


def _serving_note(plan: Plan, plaintexts: list[bytes], max_batch_size: int) -> ServingNote:
    if max_batch_size == 0:
        return ServingNote(0, "dynamic batching off (--max-batch-size 0)")
    if plan.generation is not None:
        return ServingNote(0, "dynamic batching off: a decoder is served by generation steps, "
                              "which batch its sequences")
    models = [onnx.load_model_from_string(data) for data in plaintexts]
    shapes = {k: tuple(v) for k, v in plan.model.input_shapes.items()}
    problem = batching_problem(models, random_inputs(models[0], shapes))
    if problem is not None:
        return ServingNote(0, f"dynamic batching off: {problem}")
    return ServingNote(max_batch_size, f"dynamic batching up to {max_batch_size} (checked at "
                                       f"seal time: batch 2 equals 2 requests)")


NOTE_TOKENIZER = """A decoder's tokenizer is bound, not encrypted: its text goes into
plan.json, whose SHA-256 the owner's signed manifest names, so stage 0 (which reads it from
there and checks that hash) hands the gateway exactly the owner's tokenizer, and a host that
swaps it stops the deployment. It is not secret: it is the model's public interface, which a
client sending token ids must know anyway."""

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


def _tokenizer_note(plan: Plan, path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    if plan.generation is None:
        raise BuildDirError(f"--tokenizer {path}: the build is not a decoder's (partition a "
                            f"model with a KV cache)")
    try:
        text = Path(path).read_text()
        tokenizer = Tokenizer.from_str(text)
    except (OSError, UnicodeDecodeError, Exception) as err:  # noqa: BLE001 - its parser's
        raise BuildDirError(f"--tokenizer {path} is not a tokenizer.json the tokenizers "
                            f"library reads: {err}") from err
    eos = next((tokenizer.token_to_id(name) for name in EOS_NAMES
                if tokenizer.token_to_id(name) is not None), None)
    return {"json": text, "eos_token_id": eos,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _plan_with_note(build_dir: Path, note: ServingNote,
                    tokenizer: dict[str, Any] | None = None) -> bytes:
    data: dict[str, Any] = json.loads((build_dir / PLAN_FILE).read_text())
    data.setdefault("notes", {})[SERVING_NOTE] = {"max_batch_size": note.max_batch_size,
                                                  "batching": note.batching}
    if tokenizer is not None:
        data["notes"][TOKENIZER_NOTE] = tokenizer
    return (json.dumps(data, indent=2) + "\n").encode()
