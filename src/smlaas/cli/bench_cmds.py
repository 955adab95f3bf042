"""``smlaas bench``: evidence anyone can rerun."""

from __future__ import annotations

import json
from pathlib import Path

import click

from smlaas.cli.console import console, progress_bar, table


@click.group("bench")
def bench() -> None:
    """Benchmarks and the conformance suite."""


@bench.command()
@click.option("--pattern", help="Only tests whose name matches this regular expression.")
@click.option("--cut-mode", type=click.Choice(["every", "middle"]), default="every",
              show_default=True, help="every: a stage per node; middle: two stages.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def conformance(pattern: str | None, cut_mode: str, out: str | None) -> int:
    """ONNX's backend test suite: plain ONNX Runtime against the partitioned chain."""
    import onnxruntime as ort
    import onnxruntime.backend as ort_backend

    from smlaas.conformance.backend import chain_backend
    from smlaas.conformance.report import KNOWN_LIMITS, explain
    from smlaas.conformance.suite import CATEGORIES, compare, list_tests

    ort.set_default_logger_severity(3)
    names = list_tests(pattern)
    console.print(f"{len(names)} tests of the suite shipped with onnx ({', '.join(CATEGORIES)};"
                  f" the Real models need downloads), chain cut mode '{cut_mode}'")
    with progress_bar() as progress:
        result = compare(ort_backend, chain_backend(cut_mode), names, progress=progress)
    grouped, unexplained = explain(result)
    console.print(f"plain onnxruntime passed {result.reference_passed} of {result.tests}; "
                  f"the partitioned chain passed {result.chain_passed} of {result.tests}")
    limits = {k.key: k.explanation for k in KNOWN_LIMITS}
    if grouped:
        console.print(table("passed by onnxruntime, not by the chain: known limits",
                            ["limit", "tests", "why"],
                            [[key, f"{len(tests)}: " + ", ".join(tests[:4]) +
                              (", ..." if len(tests) > 4 else ""), limits[key]]
                             for key, tests in grouped.items()]))
    if unexplained:
        console.print(table("passed by onnxruntime, not by the chain: NOT explained",
                            ["test", "reason"],
                            [[n, o.message] for n, o in unexplained.items()]))
    if out:
        data = result.to_dict()
        data.update(cut_mode=cut_mode, pattern=pattern, known_limits=grouped,
                    unexplained=list(unexplained))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2))
        console.print(f"wrote {out}")
    return 1 if unexplained else 0
