"""Export: sub-model extraction, the build directory, verification and the report."""

from __future__ import annotations

from smlaas.export.build_dir import PLAN_FILE, BuildWriter, read_plan, stage_paths
from smlaas.export.chain import Chain, StageRunner
from smlaas.export.extract import StageExtractor
from smlaas.export.report import prediction_errors, render_markdown, render_plot
from smlaas.export.verify import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    OutputComparison,
    VerificationReport,
    compare_outputs,
    verify_chain,
)

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "PLAN_FILE",
    "BuildWriter",
    "Chain",
    "OutputComparison",
    "StageExtractor",
    "StageRunner",
    "VerificationReport",
    "compare_outputs",
    "prediction_errors",
    "read_plan",
    "render_markdown",
    "render_plot",
    "stage_paths",
    "verify_chain",
]
