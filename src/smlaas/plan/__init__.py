"""Pure planning: cost model, segment costs, planners and the Plan data type."""

from __future__ import annotations

from smlaas.plan.cost_model import PRESETS, CostModel, preset, to_toml_text
from smlaas.plan.costs import SegmentCosts, segment_costs
from smlaas.plan.plan import ModelRef, Plan, StagePlan, build_plan
from smlaas.plan.planners import (
    Planner,
    check_feasible,
    choose_cuts,
    plan_greedy_epc,
    plan_max_throughput,
    plan_min_latency,
    plan_seed_rule,
)

__all__ = [
    "PRESETS",
    "CostModel",
    "ModelRef",
    "Plan",
    "Planner",
    "SegmentCosts",
    "StagePlan",
    "build_plan",
    "check_feasible",
    "choose_cuts",
    "plan_greedy_epc",
    "plan_max_throughput",
    "plan_min_latency",
    "plan_seed_rule",
    "preset",
    "segment_costs",
    "to_toml_text",
]
