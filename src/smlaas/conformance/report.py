"""Explaining why a test that plain ONNX Runtime passes does not pass through the chain."""

from __future__ import annotations

from dataclasses import dataclass

from smlaas.conformance.backend import RANDOM_INPUT_LIMIT
from smlaas.conformance.suite import Comparison, Outcome


@dataclass(frozen=True)
class KnownLimit:
    key: str
    explanation: str
    markers: tuple[str, ...]

    def matches(self, name: str, outcome: Outcome) -> bool:
        return any(m in outcome.message or m in name for m in self.markers)


KNOWN_LIMITS = (
    KnownLimit("profiling needs runnable random inputs",
               "planner mode profiles each model on seeded random inputs (as `smlaas "
               "partition` does); models whose shapes depend on input values (AffineGrid's "
               "size, Reshape targets given as inputs) cannot run on them",
               (RANDOM_INPUT_LIMIT,)),
    KnownLimit("non-tensor values",
               "sequence, map and optional values are not supported between or inside stages "
               "(smlaas partitions tensor graphs; stage messages carry tensors only)",
               ("sequence/map/optional values are not supported",
                "stages exchange tensors only",
                "sequence, map and optional inputs are not supported")),
    KnownLimit("fp16 rounding at every cut",
               "with a cut after every node, each fp16 intermediate is rounded to fp16 at the "
               "stage boundary, where ONNX Runtime keeps fused/upcast fp32 inside one session; "
               "as one stage the test passes",
               ("fp16",)),
    KnownLimit("If branch typed against a fixed stage input",
               "a stage input read by both branches of an If gets its fixed shape, and ONNX "
               "Runtime type-checks the branch not taken against it (affine_grid 3-D "
               "expansions); as one stage the test passes",
               ("test_affine_grid_3d",)),
)


def explain(comparison: Comparison) -> tuple[dict[str, list[str]], dict[str, Outcome]]:
    """Regressions grouped by known limit, and those no known limit explains."""
    grouped: dict[str, list[str]] = {}
    unexplained: dict[str, Outcome] = {}
    for name, outcome in comparison.regressions.items():
        limit = next((k for k in KNOWN_LIMITS if k.matches(name, outcome)), None)
        if limit is None:
            unexplained[name] = outcome
        else:
            grouped.setdefault(limit.key, []).append(name)
    return grouped, unexplained
