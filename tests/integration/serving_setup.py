"""A real deployment for serving tests: resnet18 in 3 stages, sealed, deployed with the local
launcher and the sim backend over 127.0.0.1 (real processes, TLS, quotes)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import Launcher, LocalLauncher
from smlaas.export.sealed_build import seal_build
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileSettings
from smlaas.profile.session import create_session
from smlaas.zoo import build_model

MODEL = "resnet18"


@contextlib.contextmanager
def cache_env(root: Path) -> Iterator[None]:
    """Child processes and this one share one isolated smlaas cache (sim PKI included)."""
    previous = os.environ.get("SMLAAS_CACHE_DIR")
    os.environ["SMLAAS_CACHE_DIR"] = str(root)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SMLAAS_CACHE_DIR", None)
        else:
            os.environ["SMLAAS_CACHE_DIR"] = previous


def sealed_build(root: Path, *, machines: int = 3) -> tuple[Path, Path]:
    build, keys = root / "build", root / "owner-keys.json"
    partition(MODEL, build, cost_model=preset("sgx1"),
              options=PlanOptions(Planner.DP_THROUGHPUT, machines, True),
              settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=2), verify=False)
    seal_build(build, keys)
    OwnerKey.load_or_create(owner_key_path(root))
    return build, keys


def owner_key_path(root: Path) -> Path:
    return root / "owner.key"


def deployment(root: Path, build: Path, keys: Path, *, launcher: Launcher | None = None,
               max_batch_size: int | None = None, state: Path | None = None,
               **overrides: Any) -> Deployment:
    state = state or root / f"state-{free_port()}"
    settings = DeploySettings(build_dir=build, keys_path=keys, state_dir=state,
                              owner_key_path=owner_key_path(root), port=free_port(),
                              threads=1, max_batch_size=max_batch_size,
                              max_queue_delay_us=2000, ready_timeout_s=90, **overrides)
    return Deployment(settings, launcher or LocalLauncher(state / "logs"))


def whole_model_outputs(x: np.ndarray) -> np.ndarray:
    session = create_session(build_model(MODEL), threads=1)
    return np.asarray(session.run(None, {"input": x})[0])


def random_image(seed: int = 0, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)


def stage_count(build: Path) -> int:
    return len(list(build.glob("stage_*.onnx")))


def load_stage(build: Path, index: int) -> onnx.ModelProto:
    return onnx.load(str(build / f"stage_{index}.onnx"))


def stage_metrics(url: str, ca: Path, name: str) -> dict[str, float]:
    """``name`` per stage label, from the gateway's /metrics."""
    import ssl

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", verify=ssl.create_default_context(cafile=str(ca)),
                     timeout=10).text
    return {sample.labels.get("stage", sample.labels.get("role", "")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name}


def wait_for_stage_metrics(url: str, ca: Path, name: str, predicate: Any, *,
                           timeout_s: float = 15.0) -> dict[str, float]:
    """The metric once ``predicate`` holds for it (the gateway probes every few seconds)."""
    import time

    end = time.monotonic() + timeout_s
    while True:
        values = stage_metrics(url, ca, name)
        if predicate(values) or time.monotonic() > end:
            return values
        time.sleep(0.5)


DECODER_CONTEXT, DECODER_SEQUENCES = 512, 4


@contextlib.contextmanager
def decoder_deployment(root: Path, *, source: Path | None = None, context: int | None = None,
                       **overrides: Any) -> Iterator[Deployment]:
    """A small GPT-2-style decoder (the zoo's layout, 3 layers; or the model file ``source``)
    partitioned into 3 stages for DECODER_SEQUENCES sequences of DECODER_CONTEXT (or
    ``context``) tokens, sealed with the byte-level tokenizer and deployed; the deployment's
    ``model_path`` is the whole model's file."""
    from smlaas.plan.generation import GenerationSizes
    from smlaas.zoo.gpt2 import GPT2Config
    from smlaas.zoo.gpt2_kv import build_gpt2_kv
    from smlaas.zoo.tokenizer import tokenizer_json

    if source is None:
        model_path = root / "tiny_kv.onnx"
        onnx.save(build_gpt2_kv("tiny_kv", GPT2Config(layers=3, d_model=64, heads=4,
                                                      vocab_size=257,
                                                      max_positions=DECODER_CONTEXT)),
                  str(model_path))
    else:
        model_path = root / source.name
        model_path.write_bytes(source.read_bytes())
    (root / "tokenizer.json").write_text(tokenizer_json())
    build, keys = root / "build", root / "owner-keys.json"
    result = partition(str(model_path), build, cost_model=preset("sgx1"),
                       options=PlanOptions(Planner.DP_THROUGHPUT, 3, True),
                       settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=2),
                       verify=True, measure_memory=False,
                       generation=GenerationSizes(context or DECODER_CONTEXT,
                                                  DECODER_SEQUENCES))
    assert result.plan.generation is not None and len(result.plan.stages) == 3
    seal_build(build, keys, tokenizer=root / "tokenizer.json")
    OwnerKey.load_or_create(owner_key_path(root))
    with deployment(root, build, keys, **overrides) as running:
        running.model_path = model_path  # type: ignore[attr-defined]
        yield running
