"""Running ONNX's backend test suite (shipped in the onnx package) against a backend and
comparing two backends' results test by test."""

from __future__ import annotations

import re
import time
import unittest
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from onnx.backend.base import Backend
from onnx.backend.test.runner import Runner

# "Real" needs model downloads (no network here); the rest ships inside the onnx package.
CATEGORIES = ("Node", "Simple", "PyTorchConverted", "PyTorchOperator")


@dataclass(frozen=True)
class Outcome:
    status: str
    """passed, failed (wrong outputs), error (raised), or skipped."""
    message: str = ""


class _Collector(unittest.TestResult):
    def __init__(self) -> None:
        super().__init__()
        self.outcome = Outcome("passed")

    def addFailure(self, test: Any, err: Any) -> None:  # noqa: N802 - unittest's API
        self.outcome = Outcome("failed", _first_line(err))

    def addError(self, test: Any, err: Any) -> None:  # noqa: N802
        self.outcome = Outcome("error", _first_line(err))

    def addSkip(self, test: Any, reason: str) -> None:  # noqa: N802
        self.outcome = Outcome("skipped", reason)


def _first_line(err: Any) -> str:
    value = err[1]
    text = str(value).strip().splitlines()
    return f"{type(value).__name__}: {text[0] if text else ''}"[:300]


def list_tests(pattern: str | None = None) -> list[str]:
    """Every test of the shipped suite in CATEGORIES (optionally matching ``pattern``)."""
    runner = _runner(Backend)
    names = []
    for category, case in runner.test_cases.items():
        if category.removeprefix("OnnxBackend").removesuffix("ModelTest") in CATEGORIES:
            names += [n for n in dir(case) if n.startswith("test_") and n.endswith("_cpu")]
    regex = re.compile(pattern) if pattern else None
    return sorted(n for n in names if regex is None or regex.search(n))


def run_suite(backend: type[Backend], names: list[str], *,
              progress: Callable[[int, int], None] | None = None) -> dict[str, Outcome]:
    """Runs the named tests against ``backend``; one outcome per test."""
    runner = _runner(backend)
    cases = {name: case for label, case in runner.test_cases.items()
             if label.removeprefix("OnnxBackend").removesuffix("ModelTest") in CATEGORIES
             for name in dir(case) if name.startswith("test_") and name.endswith("_cpu")}
    outcomes: dict[str, Outcome] = {}
    for done, name in enumerate(names, start=1):
        collector = _Collector()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases[name](name).run(collector)
        outcomes[name] = collector.outcome
        if progress is not None:
            progress(done, len(names))
    return outcomes


def _runner(backend: type[Backend]) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Runner(backend, __name__)


@dataclass
class Comparison:
    """Plain ONNX Runtime against the partitioned chain over the same tests."""

    tests: int
    reference_passed: int
    chain_passed: int
    regressions: dict[str, Outcome]
    """Tests the reference passes and the chain does not, with the chain's reason."""
    chain_only: list[str]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["regressions"] = {k: asdict(v) for k, v in self.regressions.items()}
        return data


def compare(reference: type[Backend], chain: type[Backend], names: list[str], *,
            progress: Callable[[str, int, int], None] | None = None) -> Comparison:
    seconds = {}
    results = {}
    for label, backend in (("onnxruntime", reference), ("chain", chain)):
        started = time.perf_counter()
        results[label] = run_suite(backend, names, progress=_labelled(progress, label))
        seconds[label] = time.perf_counter() - started
    plain, ours = results["onnxruntime"], results["chain"]
    return Comparison(
        tests=len(names),
        reference_passed=sum(o.status == "passed" for o in plain.values()),
        chain_passed=sum(o.status == "passed" for o in ours.values()),
        regressions={n: ours[n] for n in names
                     if plain[n].status == "passed" and ours[n].status != "passed"},
        chain_only=[n for n in names
                    if ours[n].status == "passed" and plain[n].status != "passed"],
        seconds=seconds)


def _labelled(progress: Callable[[str, int, int], None] | None, label: str
              ) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(label, done, total)
