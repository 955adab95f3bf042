"""String (BYTES) and bfloat16 tensors through a deployed pipeline: in from the client, across
every stage boundary, back out, batched by the gateway, over REST binary, REST JSON and gRPC
(tritonclient) — equal to the whole model."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest

from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.server import free_port
from smlaas.export.sealed_build import seal_build
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileSettings
from smlaas.profile.session import create_session, run_session
from tests.integration.serving_setup import cache_env, deployment
from tests.models import text_and_bf16_model

WIDTH = 32
grpc = pytest.importorskip("tritonclient.grpc")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("strings")
    with cache_env(root / "cache"):
        onnx.save(text_and_bf16_model(WIDTH), str(root / "m.onnx"))
        build, keys = root / "build", root / "owner-keys.json"
        partition(str(root / "m.onnx"), build, input_size_specs=["text:1", f"h:1,{WIDTH}"],
                  cost_model=preset("sgx1"), options=PlanOptions(Planner.DP_THROUGHPUT, 3, False),
                  settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=1))
        assert len(list(build.glob("stage_*.onnx"))) == 3
        seal_build(build, keys)
        OwnerKey.load_or_create(root / "owner.key")
        with deployment(root, build, keys, max_batch_size=4, grpc_port=free_port()) as running:
            yield running, root / "m.onnx"


def inputs(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    text = np.array([f"caf\u00e9 {n}".encode() for n in range(rows)], dtype=object)
    hidden = rng.standard_normal((rows, WIDTH)).astype(ml_dtypes.bfloat16)
    return {"text": text, "h": hidden}


def expected(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = create_session(model, threads=1)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, run_session(session, feeds, names)))
    outputs["text_out"] = np.array([s.encode() for s in outputs["text_out"]], dtype=object)
    return outputs  # ONNX Runtime's strings are str; the V2 protocol's are bytes


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got["y"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got["y"].astype(np.float32), want["y"].astype(np.float32))
    assert got["text_out"].tolist() == want["text_out"].tolist()
    assert all(item.startswith(b"CAF") for item in got["text_out"].ravel())  # C locale


def test_bytes_and_bf16_cross_every_stage_over_rest(served) -> None:
    running, model = served
    with running.client() as client:
        metadata = client.metadata()
    datatypes = {t["name"]: t["datatype"] for t in metadata["inputs"] + metadata["outputs"]}
    assert datatypes == {"text": "BYTES", "h": "BF16", "y": "BF16", "text_out": "BYTES"}
    with running.client() as client:
        for rows, binary in ((1, True), (3, True), (2, False)):
            feeds = inputs(rows, seed=rows)
            assert_same(client.infer(feeds, binary=binary), expected(model, feeds))


def test_concurrent_string_requests_are_batched_and_answered_each_their_own(served) -> None:
    import concurrent.futures

    running, model = served
    feeds = [inputs(1, seed=n) for n in range(8)]
    with running.client() as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(client.infer, feeds))
    for feed, answer in zip(feeds, answers):
        assert_same(answer, expected(model, feed))


def test_tritonclient_grpc_sends_bytes_and_bf16(served) -> None:
    running, model = served
    feeds = inputs(2, seed=7)
    client = grpc.InferenceServerClient(running.grpc_address, ssl=True,
                                        root_certificates=str(running.ca_path))
    text = grpc.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(feeds["text"])
    hidden = grpc.InferInput("h", [2, WIDTH], "BF16")
    hidden.set_data_from_numpy(feeds["h"])  # ml_dtypes.bfloat16, as tritonclient takes it
    result = client.infer(running.model_name, [text, hidden])
    want = expected(model, feeds)
    assert result.as_numpy("text_out").tolist() == want["text_out"].tolist()  # bytes
    got_y = result.as_numpy("y")
    np.testing.assert_array_equal(got_y.astype(np.float32), want["y"].astype(np.float32))
