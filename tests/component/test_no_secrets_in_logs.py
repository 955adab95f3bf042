"""No key, nonce or plaintext weight appears in any log line of the whole trust flow."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from smlaas.enclave.sealing import OwnerKeys
from smlaas.export.sealed_build import sealed_directory, unseal_stage
from tests.builds import sealed_chain_build
from tests.coordinator_setup import Ceremony


def test_trust_flow_logs_no_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    build, keyfile, _ = sealed_chain_build(tmp_path / "build")
    keys = OwnerKeys.load(keyfile)
    ceremony = Ceremony(tmp_path / "pki", stage_keys=keys.stage_keys,
                        stage_sha256=keys.stage_sha256)
    server = ceremony.start(tmp_path / "state.sealed")
    nonces: list[str] = []
    try:
        owner = ceremony.client(server)
        ceremony.set_manifest(owner)
        nonces.append(owner.call({"op": "nonce"})["nonce"])
        registration = owner.register(ceremony.enclave("stage-0"), role="stage-0")
        assert registration.stage is not None
        plaintext = unseal_stage(sealed_directory(build), 0, registration.stage.key,
                                 expected_sha256=registration.stage.sha256)
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
