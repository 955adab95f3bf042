from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# What the owner's CLI and clients remember (versions signed, releases seen) never goes to the
# user's state directory; module fixtures (which run before the per-test one below) use this.
os.environ["SMLAAS_STATE_DIR"] = tempfile.mkdtemp(prefix="smlaas-test-state-")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                    ) -> None:
    """Each test session profiles into its own cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "smlaas-cache"
    monkeypatch.setenv("SMLAAS_CACHE_DIR", str(cache))
    monkeypatch.setenv("SMLAAS_STATE_DIR", str(tmp_path_factory.mktemp("smlaas-state")))


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def cli_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SMLAAS_CACHE_DIR"] = str(cache_dir)
    env["COLUMNS"] = "200"
    return env
