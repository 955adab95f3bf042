"""Kubernetes manifests: valid YAML, EPC requests from the plan, the pipeline wired in order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from smlaas.coordinator.owner import OwnerKey
from smlaas.deploy.k8s import RUNTIME_EPC_MIB, to_yaml, write_manifests
from smlaas.deploy.roles import CoordinatorSpec
from smlaas.export.build_dir import read_plan
from tests.builds import sealed_chain_build

yaml = pytest.importorskip("yaml")


def test_yaml_emitter_round_trips() -> None:
    value = {"a": [1, {"b": "x: y", "c": [True, "q\"uote"]}], "d": {}, "e": [], "f": {"g": 2}}
    assert yaml.safe_load(to_yaml(value)) == value


@pytest.mark.parametrize("backend", ["gramine", "sim"])
def test_manifests_request_epc_per_stage(tmp_path: Path, backend: str) -> None:
    build, _, owner_path = sealed_chain_build(tmp_path)
    owner = OwnerKey.load(owner_path)
    plan = read_plan(build)
    written = write_manifests(build, tmp_path / "k8s", backend=backend, port=8443,
                              owner=owner, measurements={"coordinator": "ab" * 32})
    assert len(written) == len(plan.stages) + 2
    for stage in plan.stages:
        docs = list(yaml.safe_load_all((tmp_path / "k8s" / f"stage-{stage.index}.yaml")
                                       .read_text()))
        container = docs[0]["spec"]["template"]["spec"]["containers"][0]
        assert docs[1]["kind"] == "Service"
        last = stage.index == len(plan.stages) - 1
        if backend == "gramine":
            expected = math.ceil(stage.working_set_bytes / 2**20) + RUNTIME_EPC_MIB
            assert container["resources"]["limits"]["sgx.intel.com/epc"] == f"{expected}Mi"
            # The measured manifest fixes the arguments; the pod passes placement only.
            assert container["command"] == ["gramine-sgx", f"stage-{stage.index}"]
            names = {item["name"] for item in container["env"]}
            assert ("SMLAAS_NEXT" in names) != last
            assert not names & {"SMLAAS_COORDINATOR_MRENCLAVE", "SMLAAS_ROLE"}
        else:
            args = container["args"]
            assert ("--next" in args) != last
            assert args[args.index("--coordinator-mrenclave") + 1] == CoordinatorSpec(
                backend="sim", owner_public_key=owner.public_key_hex).sim_mrenclave()
    coordinator = next(yaml.safe_load_all((tmp_path / "k8s" / "coordinator.yaml").read_text()))
    container = coordinator["spec"]["template"]["spec"]["containers"][0]
    if backend == "sim":
        assert owner.public_key_hex in container["args"]
