"""Decoders that Hugging Face optimum exported with their KV cache (tests/data/hf_decoder),
through the partition job for generation: planned for the decode step with full caches, the
prefill's memory counted although ONNX's shape inference cannot follow the exports' reshapes
(the shapes are measured), and the chain verified against the whole model."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest

from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.plan.generation import GenerationSizes
from smlaas.profile import ProfileSettings

OPTIMUM_DECODER = Path(__file__).parents[1] / "data" / "hf_decoder" / "gpt2_tiny_optimum.onnx"


@pytest.mark.parametrize(("architecture", "half"), [
    ("gpt2", False), ("gpt2", True), ("llama", False), ("phi3", False), ("gemma", False),
    ("gpt_neox", False), ("opt", False), ("llama_genai", False)],
    ids=["gpt2", "gpt2-float16", "llama", "phi3", "gemma", "gpt_neox", "opt", "llama_genai"])
def test_an_optimum_export_partitions_for_generation_with_its_prefill_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, architecture: str,
        half: bool) -> None:
    """Each architecture, and GPT-2 in float16 throughout too (verified within the tolerance
    derived from the whole model's own spread)."""
    caplog.set_level(logging.WARNING)
    model_path = OPTIMUM_DECODER.with_name(
        "llama_tiny_genai.onnx" if architecture == "llama_genai"
        else f"{architecture}_tiny_optimum.onnx")
    if half:
        from onnxruntime.transformers.onnx_model import OnnxModel

        converted = OnnxModel(onnx.load(str(model_path)))
        converted.convert_float_to_float16(keep_io_types=False)
        model_path = tmp_path / "gpt2_tiny_fp16.onnx"
        onnx.save(converted.model, str(model_path))
    result = partition(str(model_path), tmp_path / "build", cost_model=preset("sgx1"),
                       options=PlanOptions(Planner.DP_THROUGHPUT, 3, True),
                       settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=2),
                       verify=True, measure_memory=False,
                       generation=GenerationSizes(128, 4))
    assert result.plan.generation is not None and len(result.plan.stages) == 3
    assert result.verification is not None and result.verification.ok
    assert not [r for r in caplog.records if "not counted" in r.getMessage()]
    # every stage keeps the caches of the layers it holds: 2 layers, 4 sequences of 128
    assert sorted(p for stage in result.plan.stages for p in stage.kv_cache) == [
        f"past_key_values.{layer}.{kind}" for layer in (0, 1) for kind in ("key", "value")]
    assert all(stage.kv_cache_bytes > 0 for stage in result.plan.stages if stage.kv_cache)
