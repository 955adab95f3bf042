"""``smlaas receipt verify`` as a user runs it: a real process on receipt directories written by
``python -m tests.receipt_vectors`` (tests/data/receipts/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import cli_env
from tests.integration.test_cli import smlaas
from tests.receipt_vectors import OWNER_PUB, VECTORS

REPO = Path(__file__).resolve().parents[2]


def test_the_vectors_written_by_the_helper_verify_from_the_command_line(tmp_path: Path) -> None:
    written = subprocess.run([sys.executable, "-m", "tests.receipt_vectors", str(tmp_path / "v")],
                             cwd=REPO, env=cli_env(tmp_path / "cache"), capture_output=True,
                             text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    owner = ["--owner-key", str(OWNER_PUB)]
    valid = smlaas("receipt", "verify", str(tmp_path / "v" / "valid"), *owner,
                   "--allow-simulation", cwd=tmp_path)
    assert valid.returncode == 0, valid.stderr
    assert "SIMULATED" in valid.stdout
    swapped = smlaas("receipt", "verify", str(tmp_path / "v" / "stages-swapped"), *owner,
                     "--allow-simulation", cwd=tmp_path)
    assert swapped.returncode == 1
    fragment = VECTORS["stages-swapped"].rejected_by
    assert fragment is not None and fragment in " ".join(swapped.stderr.split())
    no_owner = smlaas("receipt", "verify", str(tmp_path / "v" / "valid"), cwd=tmp_path)
    assert no_owner.returncode == 2
    assert "--owner-key" in no_owner.stderr
