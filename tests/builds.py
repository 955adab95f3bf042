"""Small sealed builds for tests: a chain model partitioned into stages, sealed, with an
owner key beside it."""

from __future__ import annotations

from pathlib import Path

import onnx

from smlaas.coordinator.owner import OwnerKey
from smlaas.export.sealed_build import seal_build
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileSettings
from tests.models import chain_model


def chain_build(root: Path, *, width: int = 64, depth: int = 6, machines: int = 3) -> Path:
    """A plaintext build of the chain model in (up to) ``machines`` stages."""
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(chain_model(width=width, depth=depth), str(root / "m.onnx"))
    build = root / "build"
    partition(str(root / "m.onnx"), build, input_size_specs=[f"1,{width}"],
              cost_model=preset("sgx1"),
              options=PlanOptions(Planner.DP_THROUGHPUT, machines, False),
              settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=1),
              verify=False)
    return build


def sealed_chain_build(root: Path, **kwargs: int) -> tuple[Path, Path, Path]:
    """(build dir, owner keyfile, owner signing key) of a sealed chain build."""
    build = chain_build(root, **kwargs)
    keys, owner = root / "owner-keys.json", root / "owner.key"
    seal_build(build, keys)
    OwnerKey.load_or_create(owner)
    return build, keys, owner
