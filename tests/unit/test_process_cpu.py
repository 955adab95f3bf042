"""Per-process CPU of a local deployment, read from /proc."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from smlaas.bench.process_cpu import (
    THIS_PROCESS,
    cpu_seconds,
    cpu_table,
    mean_by_role,
    ms_per_request,
    role_processes,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

BUSY = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"


def _spawn(log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", BUSY], stdout=out,
                                stderr=subprocess.STDOUT)


def test_a_roles_process_is_found_by_its_log_and_its_cpu_counted(tmp_path: Path) -> None:
    logs, elsewhere = tmp_path / "logs", tmp_path / "other"
    logs.mkdir()
    elsewhere.mkdir()
    ours, theirs = _spawn(logs / "stage-0.log"), _spawn(elsewhere / "stage-1.log")
    try:
        deadline = time.monotonic() + 10
        while (found := role_processes(logs)) != {"stage-0": ours.pid}:
            assert time.monotonic() < deadline, found
            time.sleep(0.05)
        before = cpu_seconds(found)
        time.sleep(0.5)
        after = cpu_seconds(found)
        assert set(after) == {"stage-0", THIS_PROCESS}
        per_request = ms_per_request(before, after, requests=10)
        # about 0.5 s of a busy loop over 10 requests (less when the cores are shared)
        assert 5 < per_request["stage-0"] <= 100
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()
    assert "stage-0" not in cpu_seconds(found)  # gone: left out


def test_the_table_compares_two_modes() -> None:
    by_mode = {"off": mean_by_role([{"gateway": 2.0, "stage-0": 20.0},
                                    {"gateway": 2.2, "stage-0": 22.0}]),
               "on": mean_by_role([{"gateway": 2.5, "stage-0": 21.5, "only-here": 1.0}])}
    table = "\n".join(cpu_table(by_mode, "off", "on"))
    assert "| gateway | 2.10 | 2.50 | +0.40 |" in table
    assert "| stage-0 | 21.00 | 21.50 | +0.50 |" in table
    assert "only-here" not in table and "**+0.90** (+3.9%)" in table
    assert ms_per_request({}, {}, requests=0) == {}
    assert "not measured" in cpu_table({}, "off", "on")[0]
