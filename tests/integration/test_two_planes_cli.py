"""The two planes as two people run them (docs/DEPLOYING.md): the operator starts a sealed
build with `smlaas operator up` and the owner's *public* key only; the owner attests the
coordinator and sets the manifest with `smlaas owner set-manifest`, renews the release with
`smlaas owner release`, and a client's `smlaas infer` accepts the gateway under it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.server import free_port
from smlaas.export.sealed_build import sealed_directory
from tests.builds import sealed_chain_build
from tests.conftest import cli_env
from tests.integration.test_cli import smlaas
from tests.integration.test_deploy_cli import read_until


def test_operator_up_then_the_owners_step_from_elsewhere(tmp_path: Path) -> None:
    build, keys, owner_key = sealed_chain_build(tmp_path / "owner")
    sealed = sealed_directory(build)
    (tmp_path / "operator").mkdir()
    (tmp_path / "operator" / "owner.pub").write_text(OwnerKey.load(owner_key).public_key_hex)
    port = free_port()
    env = cli_env(tmp_path / "operator" / "cache")  # the operator's machine: its own sim PKI
    operator = subprocess.Popen(
        [sys.executable, "-m", "smlaas", "operator", "up", str(sealed), "--owner-public-key",
         "owner.pub", "--port", str(port), "--state-dir", "state"], cwd=tmp_path / "operator",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = read_until(operator, "Ctrl-C to stop")
        match = re.search(r"coordinator (127\.0\.0\.1:\d+)", banner)
        assert match, banner
        coordinator = match.group(1)
        # The operator's side never saw a key: its state holds no keyfile and no owner key.
        names = {p.name for p in (tmp_path / "operator").rglob("*")}
        assert not names & {"owner.key", "owner-keys.json"}
        owner = tmp_path / "owner"
        # sim only: the owner (and clients) trust exactly the operator's simulation root
        _eventually(lambda: smlaas("attest", "sim-root", "-o", str(owner / "sim-root.pem"),
                                   cwd=tmp_path / "operator"))
        common = ["--key", str(owner_key), "--coordinator", coordinator,
                  "--sim-root", "sim-root.pem"]
        step = smlaas("owner", "set-manifest", str(sealed), "--keys", str(keys), *common,
                      "--state-dir", "state", cwd=owner)
        assert step.returncode == 0, step.stdout + step.stderr
        assert "holds manifest v1" in step.stdout and "owner.pub" in step.stdout
        x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
        np.save(owner / "x.npy", x)
        infer = ["infer", "--url", f"https://127.0.0.1:{port}", "--ca", "state/ca.pem",
                 "--input", "x.npy", "--sim-root", "sim-root.pem"]
        result = _eventually(lambda: smlaas(*infer, cwd=owner))
        assert "release v1" in result.stdout
        renewed = smlaas("owner", "release", "--refresh", *common, "--json", cwd=owner)
        assert renewed.returncode == 0, renewed.stderr
        assert json.loads(renewed.stdout)["renewed"] is True
        status = smlaas("owner", "status", *common, "--json", cwd=owner)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["manifest_version"] == 1 and data["release"]["version"] == 1
        assert data["slots"] == {"stage-0": [0], "stage-1": [0], "stage-2": [0]}
        assert smlaas(*infer, cwd=owner).returncode == 0
    finally:
        operator.send_signal(signal.SIGINT)
        out, err = operator.communicate(timeout=60)
    assert operator.returncode == 0, err


def _eventually(run, attempts: int = 60):  # type: ignore[no-untyped-def]
    """The roles register once the manifest is set: the gateway is ready a little later."""
    import time

    for _ in range(attempts):
        result = run()
        if result.returncode == 0:
            return result
        time.sleep(0.5)
    raise AssertionError(result.stdout + result.stderr)
