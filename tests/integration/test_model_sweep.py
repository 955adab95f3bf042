"""Every zoo model, and models other tools exported, through partition + verify."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest

from smlaas import zoo
from tests.integration.test_cli import smlaas

LIGHT_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# One operator alone exceeds the EPC (VGG's first classifier layer holds 392 MiB, GPT-2's
# tied head 147 MiB): --fit-epc splits it, --no-split-oversize refuses.
SPLIT_FOR_SGX1 = {"vgg16": "classifier.0", "vgg19": "classifier.0", "gpt2_small4": "logits"}
# The node the refusal names: for GPT-2 the Transpose that holds the table and its copy.
REFUSED_AT = {**SPLIT_FOR_SGX1, "gpt2_small4": "lm_head.transpose_wte"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in zoo.list_models()])
def test_zoo_model_partitions_to_the_epc_and_verifies(tmp_path: Path, name: str) -> None:
    if name in SPLIT_FOR_SGX1:
        refused = smlaas("partition", "--model", name, "--build-dir", "B", "--preset", "sgx1",
                         "--fit-epc", "--no-split-oversize", "--runs", "2", cwd=tmp_path)
        assert refused.returncode == 2
        assert f"'{REFUSED_AT[name]}' alone needs" in refused.stderr
        assert not (tmp_path / "B").exists()
    args = ["partition", "--model", name, "--build-dir", "B", "--preset", "sgx1", "--fit-epc",
            "--runs", "2", "--json"]
    result = smlaas(*args, cwd=tmp_path)
    if result.returncode == 2 and "measured working set" in result.stderr:
        # A stage packed up to the EPC by its prediction measured above it (issue 19: on this
        # machine densenet201 and one of gpt2_small4's split stages, by 1 to 5%): refused in
        # one line, nothing left behind; the prediction alone still partitions and verifies.
        message = " ".join(result.stderr.split())
        assert re.search(r"--fit-epc: stage \d+'s measured working set [0-9.]+ MiB exceeds "
                         r"the usable EPC 93.5 MiB \(predicted [0-9.]+ MiB\)", message)
        assert not (tmp_path / "B").exists()
        result = smlaas(*args, "--no-measure-memory", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified"] is True
    assert data["plan"]["predicted"]["all_fit_epc"] is True
    assert all(s["measured"] is None or s["measured"]["working_set_bytes"] <= 93.5 * 2**20
               for s in data["plan"]["stages"])
    assert [s["node"] for s in data["split_operators"]] == (
        [SPLIT_FOR_SGX1[name]] if name in SPLIT_FOR_SGX1 else [])
    assert smlaas("verify", "B", "--seeds", "1", cwd=tmp_path).returncode == 0


# By default the two smallest through the CLI (3 s each); the seven others take 5 to 19 s each
# on two cores (inception_v1 also runs in process in test_real_exporters.py): `pytest -m slow`.
DEFAULT_LIGHT_MODELS = {"light_shufflenet", "light_squeezenet"}


def _light_models() -> list[object]:
    if not LIGHT_MODELS.is_dir():
        return []
    return [pytest.param(path, id=path.stem, marks=() if path.stem in DEFAULT_LIGHT_MODELS
                         else pytest.mark.slow) for path in sorted(LIGHT_MODELS.glob("*.onnx"))]


@pytest.mark.skipif(not LIGHT_MODELS.is_dir(), reason="onnx package without backend test data")
@pytest.mark.parametrize("path", _light_models())
def test_foreign_exported_model_partitions_and_verifies(tmp_path: Path, path: Path) -> None:
    """Caffe2-exported architectures (IR 3, opset 9, initializers listed as inputs)."""
    result = smlaas("partition", "--model", str(path), "--build-dir", "B", "--planner",
                    "dp-throughput", "--machines", "3", "--runs", "2", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True
