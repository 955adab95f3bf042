"""Pure planning: cost model, segment costs, planners and the Plan data type."""

from __future__ import annotations

from smlaas.plan.cost_model import PRESETS, CostModel, preset, to_toml_text
from smlaas.plan.costs import SegmentCosts, segment_costs
from smlaas.plan.machines import MAX_CLASSES, MachineClass, MachinePool
from smlaas.plan.plan import MeasuredMemory, ModelRef, Plan, StagePlan, build_plan
from smlaas.plan.planners import (
    MACHINE_FILE_PLANNERS,
    Planner,
    check_feasible,
    choose_cuts,
    choose_layout,
    plan_greedy_epc,
    plan_max_throughput,
    plan_min_latency,
    plan_seed_rule,
)
from smlaas.plan.replicas import StageLayout, plan_on_machines, plan_replicas

__all__ = [
    "MACHINE_FILE_PLANNERS",
    "MAX_CLASSES",
    "PRESETS",
    "CostModel",
    "MachineClass",
    "MachinePool",
    "MeasuredMemory",
    "ModelRef",
    "Plan",
    "Planner",
    "SegmentCosts",
    "StageLayout",
    "StagePlan",
    "build_plan",
    "check_feasible",
    "choose_cuts",
    "choose_layout",
    "plan_greedy_epc",
    "plan_max_throughput",
    "plan_min_latency",
    "plan_on_machines",
    "plan_replicas",
    "plan_seed_rule",
    "preset",
    "segment_costs",
    "to_toml_text",
]
