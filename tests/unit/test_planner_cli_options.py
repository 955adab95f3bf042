"""The planner options of `smlaas partition` / `smlaas plan compare`: usage errors are found
before any model is opened (exit code 2, one clear line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smlaas.cli.main import main

GOOD_FILE = '[[class]]\nname = "large"\ncount = 2\n'


@pytest.mark.parametrize("extra, file_text, message", [
    (["--planner", "dp-replicas"], None, "--planner dp-replicas needs --machines K"),
    (["--planner", "dp-replicas", "--machines", "2", "--machines-file", "M"], GOOD_FILE,
     "--machines and --machines-file are alternatives"),
    (["--planner", "greedy-epc", "--machines-file", "M"], GOOD_FILE,
     "--planner greedy-epc does not assign machine classes"),
    (["--planner", "dp-replicas", "--machines-file", "M"], "[[class]]\nname = 'x'\n",
     "class 'x': missing count"),
    (["--planner", "dp-latency", "--machines-file", "M"], None, "does not exist"),
])
def test_partition_refuses_bad_planner_options(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               extra: list[str], file_text: str | None,
                                               message: str) -> None:
    machines_file = tmp_path / "machines.toml"
    if file_text is not None:
        machines_file.write_text(file_text)
    args = ["partition", "--model", str(tmp_path / "never-opened.onnx"), "--build-dir",
            str(tmp_path / "b")] + [str(machines_file) if a == "M" else a for a in extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "b").exists()


def test_help_describes_the_new_options(capsys: pytest.CaptureFixture) -> None:
    assert main(["partition", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "dp-replicas" in text and "--machines-file" in text
