from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from smlaas.enclave.sealing import OwnerKeys
from smlaas.errors import SealError
from smlaas.export.sealed_build import seal_build, sealed_path, unseal_stage
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileSettings
from tests.models import chain_model


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OwnerKeys]:
    root = tmp_path_factory.mktemp("sealed")
    onnx.save(chain_model(), str(root / "chain.onnx"))
    partition(str(root / "chain.onnx"), root / "B", input_size_specs=["1,8"],
              cost_model=preset("sgx1"), options=PlanOptions(Planner.GREEDY_EPC, None, False),
              settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=1))
    # Force two stages regardless of the plan: seal what the build has.
    keys = seal_build(root / "B", root / "owner.keys")
    return root / "B", keys


def test_unsealed_stage_equals_the_exported_file(sealed) -> None:
    build, keys = sealed
    assert unseal_stage(build, 0, keys.stage_keys[0]) == (build / "stage_0.onnx").read_bytes()


def test_one_changed_byte_is_refused(sealed, tmp_path: Path) -> None:
    build, keys = sealed
    path = sealed_path(build, 0)
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    try:
        with pytest.raises(SealError, match="modified"):
            unseal_stage(build, 0, keys.stage_keys[0])
    finally:
        path.write_bytes(original)


def test_another_stage_offered_is_refused(sealed) -> None:
    build, keys = sealed
    other = OwnerKeys(keys.build_sha256, {0: keys.stage_keys[0], 1: keys.stage_keys[0]})
    sealed_path(build, 1).write_bytes(sealed_path(build, 0).read_bytes())
    with pytest.raises(SealError, match="is stage 0, expected stage 1"):
        unseal_stage(build, 1, other.stage_keys[1])
