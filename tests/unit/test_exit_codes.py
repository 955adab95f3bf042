"""How the CLI maps refusals to exit codes: 2 for input smlaas or the service cannot use."""

from __future__ import annotations

import pytest

from smlaas.cli import main as cli_main
from smlaas.errors import GraphError, ServingError, UnsupportedModelError, VerificationError


@pytest.mark.parametrize(("error", "code"), [
    (UnsupportedModelError("node 'z' (ai.onnx.ml.ZipMap) outputs ...: unsupported by design"),
     2),
    (GraphError("the graph has a cycle through nodes 'a'"), 2),
    (ServingError("input 'x' has shape [4, 3]; the model expects [1, 3]", status=400), 2),
    (ServingError("stage 1 is unavailable", status=503), 1),
    (VerificationError("MISMATCH"), 1),
])
def test_refusals_map_to_exit_codes(monkeypatch: pytest.MonkeyPatch, error: Exception,
                                    code: int) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(cli_main.cli, "main", fail)
    assert cli_main.main(["partition"]) == code
