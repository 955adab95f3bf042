"""Per-process CPU of a local deployment, read from /proc."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from smlaas.bench.process_cpu import (
    THIS_PROCESS,
    Reading,
    cpu_table,
    mean_by_role,
    ms_per_request,
    read_cpu,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

BUSY = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"


def _spawn(log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", BUSY], stdout=out,
                                stderr=subprocess.STDOUT)


def _found(logs: Path, role: str, pid: int) -> dict[str, Reading]:
    deadline = time.monotonic() + 10
    while (readings := read_cpu(logs)).get(role, Reading(0, 0, 0)).pid != pid:
        assert time.monotonic() < deadline, readings
        time.sleep(0.05)
    return readings


def test_a_roles_process_is_found_by_its_log_and_its_cpu_counted(tmp_path: Path) -> None:
    logs, elsewhere = tmp_path / "logs", tmp_path / "other"
    logs.mkdir()
    elsewhere.mkdir()
    ours, theirs = _spawn(logs / "stage-0.log"), _spawn(elsewhere / "stage-1.log")
    try:
        before = _found(logs, "stage-0", ours.pid)
        time.sleep(0.5)
        after = read_cpu(logs)
        assert set(after) == {"stage-0", THIS_PROCESS}
        per_request = ms_per_request(before, after, requests=10)
        # about 0.5 s of a busy loop over 10 requests (less when the cores are shared)
        assert 5 < per_request["stage-0"] <= 100
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()
    assert "stage-0" not in read_cpu(logs)  # gone: left out


def test_a_restarted_role_is_followed_and_left_out_of_the_block_it_changed_in(
        tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    first = _spawn(logs / "gateway.log")
    try:
        before = _found(logs, "gateway", first.pid)
        first.kill()
        first.wait()
        second = _spawn(logs / "gateway.log")  # as the launcher restarts a role
        try:
            after = _found(logs, "gateway", second.pid)
            assert "gateway" not in ms_per_request(before, after, requests=5)
            assert "gateway" in ms_per_request(after, read_cpu(logs), requests=5)
        finally:
            second.kill()
            second.wait()
    finally:
        first.kill()
        first.wait()


def test_the_table_compares_two_modes() -> None:
    by_mode = {"off": mean_by_role([{"gateway": 2.0, "stage-0": 20.0}, {},
                                    {"gateway": 2.2, "stage-0": 22.0}]),
               "on": mean_by_role([{"gateway": 2.5, "stage-0": 21.5, "only-here": 1.0}])}
    table = "\n".join(cpu_table(by_mode, "off", "on"))
    assert "| gateway | 2.10 | 2.50 | +0.40 |" in table  # the empty block is skipped
    assert "| stage-0 | 21.00 | 21.50 | +0.50 |" in table
    assert "only-here" not in table and "**+0.90** (+3.9%)" in table
    assert ms_per_request({}, {}, requests=0) == {}
    assert mean_by_role([{}, {}]) == {}
    assert "not measured" in cpu_table({}, "off", "on")[0]
    assert "(+" not in cpu_table({"off": {"x": 0.0}, "on": {"x": 1.0}}, "off", "on")[-1]
