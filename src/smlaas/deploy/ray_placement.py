"""Whether a Ray cluster can hold a deployment's placement group, decided before booking it:
a bundle per stage replica (1 ``sgx`` and its CPUs) and the control bundle (coordinator and
gateway), spread one per node or packed; a refusal names what is missing. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SGX_RESOURCE = "sgx"
CPU_RESOURCE = "CPU"
PLACEMENTS = ("spread", "pack")
RAY_STRATEGIES = {"spread": "STRICT_SPREAD", "pack": "PACK"}
PLACEMENT_TIMEOUT_S = 60.0
_SEARCH_LIMIT = 100_000  # packing steps before the check gives up and lets Ray decide


@dataclass(frozen=True)
class Bundle:
    """One bundle of the placement group: what it hosts and what it books."""

    name: str
    sgx: int
    cpus: int

    def resources(self) -> dict[str, float]:
        return {SGX_RESOURCE: float(self.sgx), CPU_RESOURCE: float(self.cpus)}

    def describe(self) -> str:
        return f"{self.name} ({amount(self.sgx, SGX_RESOURCE)}, {amount(self.cpus, 'CPU')})"


@dataclass(frozen=True)
class NodeCapacity:
    """A node's resources (totals, less what this deployment already holds there)."""

    name: str
    sgx: float
    cpus: float

    def holds(self, bundle: Bundle) -> bool:
        return self.sgx >= bundle.sgx and self.cpus >= bundle.cpus

    def describe(self) -> str:
        return f"{self.name}: {amount(self.sgx, SGX_RESOURCE)}, {amount(self.cpus, 'CPU')}"


def amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}"


def placement_problem(bundles: Sequence[Bundle], nodes: Sequence[NodeCapacity], *,
                      placement: str) -> str | None:
    """Why ``bundles`` can never be placed on ``nodes`` with ``placement`` ("spread": each on
    a node of its own; "pack": anywhere, several to a node), or None when they can. Pure."""
    if placement == "spread":
        problem = _spread_problem(bundles, nodes)
    elif placement == "pack":
        problem = _pack_problem(bundles, nodes)
    else:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if problem is None:
        return None
    have = "; ".join(node.describe() for node in nodes) or "no live node"
    text = (f"the Ray cluster cannot hold this deployment with placement {placement!r} "
            f"({RAY_STRATEGIES[placement]}): {problem}. It asks for "
            f"{', '.join(b.describe() for b in bundles)}; the cluster has {have}")
    if placement == "spread" and _pack_problem(bundles, nodes) is None:
        text += ". Placement 'pack' would fit (enclaves then share nodes)"
    return text + "."


def _totals(items: Sequence[Bundle] | Sequence[NodeCapacity]) -> tuple[float, float]:
    return sum(i.sgx for i in items), sum(i.cpus for i in items)


def _spread_problem(bundles: Sequence[Bundle], nodes: Sequence[NodeCapacity]) -> str | None:
    placed = _max_one_per_node(bundles, nodes)
    if placed == len(bundles):
        return None
    return (f"each bundle needs a node of its own that holds it, {len(bundles)} nodes in all, "
            f"and this cluster has such nodes for {placed} of them: "
            f"{len(bundles) - placed} more node(s) needed")


def _max_one_per_node(bundles: Sequence[Bundle], nodes: Sequence[NodeCapacity]) -> int:
    """The most bundles placed on distinct nodes that hold them (bipartite matching)."""
    owner: dict[int, int] = {}  # node -> bundle

    def augment(bundle: int, seen: set[int]) -> bool:
        for node, capacity in enumerate(nodes):
            if node in seen or not capacity.holds(bundles[bundle]):
                continue
            seen.add(node)
            if node not in owner or augment(owner[node], seen):
                owner[node] = bundle
                return True
        return False

    return sum(augment(index, set()) for index in range(len(bundles)))


def _pack_problem(bundles: Sequence[Bundle], nodes: Sequence[NodeCapacity]) -> str | None:
    need_sgx, need_cpus = _totals(bundles)
    have_sgx, have_cpus = _totals(nodes)
    short = [f"{need - have:g} {unit} more ({need:g} needed in all, {have:g} in the cluster)"
             for unit, need, have in ((SGX_RESOURCE, need_sgx, have_sgx),
                                      ("CPU", need_cpus, have_cpus)) if need > have]
    if short:
        return "it needs " + " and ".join(short)
    for bundle in bundles:
        if not any(node.holds(bundle) for node in nodes):
            return f"no node can hold the bundle {bundle.describe()}"
    if _packs(bundles, nodes) is False:
        return "the cluster has enough in all, but its nodes' sizes do not fit the bundles"
    return None


def _packs(bundles: Sequence[Bundle], nodes: Sequence[NodeCapacity]) -> bool | None:
    """Whether the bundles fit the nodes (several to a node); None when the search ran too
    long to tell (Ray then decides)."""
    order = sorted(bundles, key=lambda b: (b.cpus, b.sgx), reverse=True)
    free = [[node.sgx, node.cpus] for node in nodes]
    steps = 0

    def place(index: int) -> bool | None:
        nonlocal steps
        if index == len(order):
            return True
        bundle, tried = order[index], set()
        for room in free:
            key = tuple(room)
            if key in tried or room[0] < bundle.sgx or room[1] < bundle.cpus:
                continue
            tried.add(key)  # nodes with the same room left are interchangeable
            steps += 1
            if steps > _SEARCH_LIMIT:
                return None
            room[0] -= bundle.sgx
            room[1] -= bundle.cpus
            found = place(index + 1)
            room[0] += bundle.sgx
            room[1] += bundle.cpus
            if found is not False:
                return found
        return False

    return place(0)


