"""No key, nonce or plaintext weight appears in any log line of the whole trust flow."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from smlaas.coordinator.client import CoordinatorClient
from smlaas.coordinator.manifest import Manifest
from smlaas.coordinator.server import CoordinatorServer
from smlaas.enclave import INTEL_ROOT, Policy
from smlaas.enclave.backends.sim import SimBackend
from smlaas.export.sealed_build import seal_build, unseal_stage
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileSettings
from tests.models import chain_model


def test_trust_flow_logs_no_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    onnx.save(chain_model(), str(tmp_path / "chain.onnx"))
    partition(str(tmp_path / "chain.onnx"), tmp_path / "B", input_size_specs=["1,8"],
              cost_model=preset("sgx1"), options=PlanOptions(Planner.DP_LATENCY, None, False),
              settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=1))
    keys = seal_build(tmp_path / "B", tmp_path / "owner.keys")

    pki = tmp_path / "pki"
    coordinator = SimBackend("coordinator", pki_dir=pki)
    stage = SimBackend("stage-0", pki_dir=pki)
    server = CoordinatorServer(coordinator, tmp_path / "state.sealed").start()
    nonces: list[str] = []
    try:
        owner = CoordinatorClient(*server.address, roots=[INTEL_ROOT, coordinator.trusted_root],
                                  policy=Policy.from_dict({
                                      "allow_simulation_insecure": True, "roles": {
                                          "coordinator": {"mrenclave": [
                                              coordinator.measurement.mrenclave.hex()]}}}))
        owner.set_manifest(Manifest(
            policy={"allow_simulation_insecure": True, "roles": {"stage-0": {
                "mrenclave": [stage.measurement.mrenclave.hex()]}}},
            stage_keys={0: base64.b64encode(keys.stage_keys[0]).decode()},
            topology=["stage-0"]))
        nonces.append(owner.call({"op": "nonce"})["nonce"])
        registration = owner.register(stage, role="stage-0")
        assert registration.stage_key is not None
        plaintext = unseal_stage(tmp_path / "B", 0, registration.stage_key)
    finally:
        server.stop()

    weights = [numpy_helper.to_array(t).tobytes()[:16]
               for t in onnx.load_from_string(plaintext).graph.initializer]
    secrets = [k.hex() for k in keys.stage_keys.values()]
    secrets += [base64.b64encode(k).decode() for k in keys.stage_keys.values()]
    secrets += nonces + ["PRIVATE KEY"]
    secrets += [w.hex() for w in weights] + [repr(w)[2:-1] for w in weights]
    lines = [record.getMessage() for record in caplog.records]
    assert lines, "the flow logged nothing: the test would prove nothing"
    for line in lines:
        for secret in secrets:
            assert secret not in line, f"secret material in a log line: {line!r}"
