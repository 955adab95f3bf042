"""Small sealed builds for tests: a chain model partitioned into stages, sealed, with an
owner key beside it."""

from __future__ import annotations

from pathlib import Path

import onnx

from smlaas.coordinator.owner import OwnerKey
from smlaas.export.sealed_build import seal_build
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import NodeProfile, ProfileCache, ProfileSettings
from tests.models import chain_model

SETTINGS = ProfileSettings(threads=1, warmup_runs=1, measured_runs=1)


class EvenProfile(ProfileCache):
    """A cache that holds, for any key, a profile of 1 ms per node of ``model``: the plan then
    depends on the graph, not on how fast one run of a microsecond-sized node happened to be
    (a measured profile gave the chain 2 stages instead of 3 now and then)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.names = [node.name for node in model.graph.node]

    def get(self, key: str) -> NodeProfile | None:
        return NodeProfile(node_ms=dict.fromkeys(self.names, 1.0),
                           whole_model_ms=float(len(self.names)), session_overhead_ms=0.0,
                           settings=SETTINGS)

    def put(self, key: str, profile: NodeProfile) -> None:
        pass


def chain_build(root: Path, *, width: int = 64, depth: int = 6, machines: int = 3) -> Path:
    """A plaintext build of the chain model in ``machines`` stages (at most ``depth``)."""
    root.mkdir(parents=True, exist_ok=True)
    model = chain_model(width=width, depth=depth)
    onnx.save(model, str(root / "m.onnx"))
    build = root / "build"
    partition(str(root / "m.onnx"), build, input_size_specs=[f"1,{width}"],
              cost_model=preset("sgx1"),
              options=PlanOptions(Planner.DP_THROUGHPUT, machines, False),
              settings=SETTINGS, cache=EvenProfile(model), verify=False)
    return build


def sealed_chain_build(root: Path, **kwargs: int) -> tuple[Path, Path, Path]:
    """(build dir, owner keyfile, owner signing key) of a sealed chain build."""
    build = chain_build(root, **kwargs)
    keys, owner = root / "owner-keys.json", root / "owner.key"
    seal_build(build, keys)
    OwnerKey.load_or_create(owner)
    return build, keys, owner
