from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                    ) -> None:
    """Each test session profiles into its own cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "smlaas-cache"
    monkeypatch.setenv("SMLAAS_CACHE_DIR", str(cache))


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def cli_env(cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SMLAAS_CACHE_DIR"] = str(cache_dir)
    env["COLUMNS"] = "200"
    return env
