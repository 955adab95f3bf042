"""Measuring models with ONNX Runtime: node profiles, whole-model and stage timings."""

from __future__ import annotations

from smlaas.profile.cache import ProfileCache, machine_id, model_digest, profile_key
from smlaas.profile.inputs import random_inputs
from smlaas.profile.profiler import (
    NodeProfile,
    ProfileSettings,
    ProgressCallback,
    profile_nodes,
    run_times_ms,
    session_overhead_ms,
    time_model,
    time_session,
)
from smlaas.profile.session import Optimization, create_session, run_session
from smlaas.profile.shapes import observe_tensors

__all__ = [
    "NodeProfile",
    "Optimization",
    "ProfileCache",
    "ProfileSettings",
    "ProgressCallback",
    "create_session",
    "machine_id",
    "model_digest",
    "observe_tensors",
    "profile_key",
    "profile_nodes",
    "random_inputs",
    "run_session",
    "session_overhead_ms",
    "run_times_ms",
    "time_model",
    "time_session",
]
