"""What the tests read from the repository is in the repository: no file under tests/data is
ignored by git (a clean checkout once lacked tests/data/hf_decoder/*.onnx, which a
`.gitignore` rule for *.onnx hid, and 18 tests failed there while passing here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_no_test_data_file_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests" / "data").rglob("*"))
             if path.is_file() and "__pycache__" not in path.parts]
    assert files
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT,
                             input="\n".join(files), capture_output=True, text=True,
                             timeout=60).stdout.split()
    assert ignored == [], f"git ignores test data: {ignored}"
