"""The build directory: written whole or not at all, read back with clear errors.

Layout::

    BUILD/plan.json         the Plan (smlaas.plan.Plan.to_json)
    BUILD/stage_<k>.onnx    one sub-model per stage, holding only its own weights
    BUILD/report.md         the human-readable report
    BUILD/report.png        per-node time and memory, cuts, the EPC line
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import onnx

from smlaas.errors import BuildDirError, ExportError
from smlaas.plan.plan import Plan

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
TOKENIZER_FILE = "tokenizer.json"
"""A decoder's tokenizer, when the build has one (`smlaas seal` puts it in plan.json)."""
# Protobuf's 2 GiB limit; larger sub-models keep their weights in a side file.
_EXTERNAL_DATA_BYTES = 1 << 30


class BuildWriter:
    """Writes a build into a hidden sibling directory and renames it into place on success.

    Use as a context manager: if the body raises, the partial directory is removed and any
    previous build at the target is left untouched.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self._check_target()
        try:
            self.directory = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-",
                                                   dir=self.target.parent))
        except OSError as err:
            raise BuildDirError(f"cannot create build dir {self.target}: {err.strerror}") \
                from err

    def _check_target(self) -> None:
        parent = self.target.parent
        if self.target.exists() and not self.target.is_dir():
            raise BuildDirError(f"build dir {self.target} exists and is not a directory")
        if self.target.is_dir() and any(self.target.iterdir()) and \
                not (self.target / PLAN_FILE).is_file():
            raise BuildDirError(f"build dir {self.target} exists and is not an smlaas build; "
                                f"choose another --build-dir or empty it")
        if not parent.is_dir():
            raise BuildDirError(f"cannot create build dir {self.target}: {parent} does not "
                                f"exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise BuildDirError(f"cannot create build dir {self.target}: {parent} is not "
                                f"writable")

    def __enter__(self) -> BuildWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        self._commit()

    def save_model(self, model: onnx.ModelProto, file_name: str) -> Path:
        path = self.directory / file_name
        try:
            if model.ByteSize() > _EXTERNAL_DATA_BYTES:
                onnx.save(model, str(path), save_as_external_data=True,
                          location=f"{file_name}.data")
            else:
                onnx.save(model, str(path))
        except (OSError, ValueError) as err:
            raise ExportError(f"cannot write {file_name}: {err}") from err
        return path

    def write_text(self, file_name: str, text: str) -> Path:
        path = self.directory / file_name
        path.write_text(text)
        return path

    def _commit(self) -> None:
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            self.target.rename(old)
        try:
            self.directory.rename(self.target)
        except OSError as err:
            if old is not None:
                old.rename(self.target)
            shutil.rmtree(self.directory, ignore_errors=True)
            raise BuildDirError(f"cannot move the build into {self.target}: {err}") from err
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("build written to %s", self.target)


def read_plan(build_dir: Path) -> Plan:
    """The plan of a build directory, validated."""
    path = Path(build_dir) / PLAN_FILE
    if not Path(build_dir).is_dir():
        raise BuildDirError(f"build dir {build_dir} does not exist")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BuildDirError(f"{build_dir} is not an smlaas build: {PLAN_FILE} is missing") \
            from None
    plan = Plan.from_json(text)
    plan.check()
    return plan


def stage_paths(build_dir: Path, plan: Plan) -> list[Path]:
    paths = [Path(build_dir) / s.file_name for s in plan.stages]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise BuildDirError(f"build {build_dir} is incomplete: {', '.join(missing)} missing")
    return paths
