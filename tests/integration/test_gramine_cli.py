"""`smlaas gramine measure` and `smlaas gramine manifest` end to end: footprints measured from a
real (sim) deployment of a sealed build size the manifests written for this Python, for
another interpreter, and for deploy/Dockerfile's image."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

from smlaas.deploy.gramine_sizes import Footprints, size_roles
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import sealed_directory
from tests.builds import sealed_chain_build
from tests.integration.test_cli import smlaas


def _manifest(path: Path) -> dict:
    return tomllib.loads(path.read_text().replace("{{ gramine.libos }}", "/libos.so")
                         .replace("{{ gramine.runtimedir() }}", "/runtime"))


def test_measure_then_manifests_sized_from_it(tmp_path: Path) -> None:
    build, keys, owner_key = sealed_chain_build(tmp_path / "b", machines=2)
    measured = smlaas("gramine", "measure", str(build), "--keys", str(keys), "--owner-key",
                      str(owner_key), "-o", "footprints.json", "--requests", "3", cwd=tmp_path,
                      check=True)
    assert "stage-1" in measured.stdout
    footprints = Footprints.from_json((tmp_path / "footprints.json").read_text())
    assert {f.role for f in footprints.roles} == {"coordinator", "gateway", "stage-0",
                                                  "stage-1"}
    assert all(f.vm_peak_bytes > f.rss_peak_bytes > 0 and f.threads >= 1
               for f in footprints.roles)
    sizes = size_roles(read_plan(sealed_directory(build)), footprints=footprints,
                       plan_sha256=footprints.plan_sha256)
    common = [str(build), "--owner-key", str(owner_key), "--coordinator-mrenclave", "ab" * 32,
              "--measured", "footprints.json"]
    smlaas("gramine", "manifest", *common, "--python", sys.executable, "--out", "here",
           cwd=tmp_path, check=True)
    for role, sizing in sizes.items():
        data = _manifest(tmp_path / "here" / f"{role}.manifest.template")
        assert data["sgx"]["enclave_size"] == f"{sizing.enclave_mib}M"
        assert data["sgx"]["max_threads"] == sizing.max_threads
        assert "its model included" in sizing.basis or not role.startswith("stage-")
    image = smlaas("gramine", "manifest", *common, "--for-image", "--out", "image",
                   cwd=tmp_path, check=True)
    assert "installation /usr/local" in image.stdout
    stage = _manifest(tmp_path / "image" / "stage-0.manifest.template")
    assert stage["loader"]["argv"][:3] == ["/usr/local/bin/python3.11", "-I", "-B"]
    assert {"path": "/smlaas/sealed", "uri": "file:/build"} in stage["fs"]["mounts"]
    coordinator = _manifest(tmp_path / "image" / "coordinator.manifest.template")
    assert coordinator["sgx"]["allowed_files"] == ["file:/state/"]
    both = smlaas("gramine", "manifest", *common, "--for-image", "--python", sys.executable,
                  cwd=tmp_path)
    assert both.returncode == 2 and "two different interpreters" in both.stderr
    assert json.loads((tmp_path / "footprints.json").read_text())["plan_sha256"]
