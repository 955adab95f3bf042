"""Kubernetes manifests: valid YAML, EPC requests from the plan, the pipeline wired in order."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import pytest

from smlaas.deploy.k8s import RUNTIME_EPC_MIB, to_yaml, write_manifests
from smlaas.export.build_dir import read_plan
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileSettings
from tests.models import chain_model

yaml = pytest.importorskip("yaml")


def test_yaml_emitter_round_trips() -> None:
    value = {"a": [1, {"b": "x: y", "c": [True, "q\"uote"]}], "d": {}, "e": [], "f": {"g": 2}}
    assert yaml.safe_load(to_yaml(value)) == value


def test_manifests_request_epc_per_stage(tmp_path: Path) -> None:
    onnx.save(chain_model(width=64, depth=6), str(tmp_path / "m.onnx"))
    build = tmp_path / "build"
    partition(str(tmp_path / "m.onnx"), build, input_size_specs=["1,64"],
              cost_model=preset("sgx1"), options=PlanOptions(Planner.GREEDY_EPC, None, False),
              settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=1),
              verify=False)
    plan = read_plan(build)
    written = write_manifests(build, tmp_path / "k8s", backend="gramine", port=8443)
    assert len(written) == len(plan.stages) + 2
    for stage in plan.stages:
        docs = list(yaml.safe_load_all((tmp_path / "k8s" / f"stage-{stage.index}.yaml")
                                       .read_text()))
        container = docs[0]["spec"]["template"]["spec"]["containers"][0]
        expected = math.ceil(stage.working_set_bytes / 2**20) + RUNTIME_EPC_MIB
        assert container["resources"]["limits"]["sgx.intel.com/epc"] == f"{expected}Mi"
        assert docs[1]["kind"] == "Service"
        last = stage.index == len(plan.stages) - 1
        assert ("--next" in container["args"]) != last
