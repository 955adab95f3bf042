"""Writing one Gramine manifest per role of a build (``smlaas gramine manifest``)."""

from __future__ import annotations

from pathlib import Path

from smlaas.enclave.backends.gramine import enclave_size_mib, render_manifest
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import SEALED_DIR

MANIFEST_DIR = "gramine"


def write_manifests(build_dir: Path, *, coordinator: str, debug: bool = False) -> list[Path]:
    plan = read_plan(build_dir)
    out = Path(build_dir) / MANIFEST_DIR
    out.mkdir(exist_ok=True)
    sealed = Path(build_dir) / SEALED_DIR
    written = []
    for stage in plan.stages:
        role = f"stage-{stage.index}"
        text = render_manifest(
            role=role, argv=["python3", "-m", "smlaas", "worker", "--role", role,
                             "--coordinator", coordinator, "--backend", "gramine"],
            enclave_size_mib=enclave_size_mib(stage.working_set_bytes), sealed_dir=sealed,
            debug=debug)
        path = out / f"{role}.manifest.template"
        path.write_text(text)
        written.append(path)
    for role, argv in (("coordinator", ["python3", "-m", "smlaas", "coordinator",
                                        "--backend", "gramine"]),
                       ("gateway", ["python3", "-m", "smlaas", "gateway", "--coordinator",
                                    coordinator, "--backend", "gramine"])):
        path = out / f"{role}.manifest.template"
        path.write_text(render_manifest(role=role, argv=argv, enclave_size_mib=1024,
                                        sealed_dir=sealed, debug=debug))
        written.append(path)
    return written
