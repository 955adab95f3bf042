"""The layers of ARCHITECTURE.md, read from the source: imports point downward only, and the
owner plane never imports what talks to the host's engines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smlaas
import smlaas.errors

SOURCE = Path(smlaas.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _modules(*packages: str) -> list[Path]:
    return [path for package in packages for path in sorted((SOURCE / package).rglob("*.py"))]


def _violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(SOURCE)} imports {name}" for path in paths
            for name in sorted(_imports(path))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("packages, forbidden", [
    (("serving", "transport"), ("smlaas.deploy", "smlaas.export", "smlaas.cli",
                                "smlaas.enclave.backends.sim")),
    (("client",), ("smlaas.serving", "smlaas.deploy", "smlaas.export", "smlaas.cli",
                   "smlaas.enclave.backends.sim")),
    (("enclave",), ("smlaas.profile", "smlaas.coordinator", "smlaas.serving", "smlaas.deploy")),
    (("coordinator",), ("smlaas.serving", "smlaas.deploy", "smlaas.client", "smlaas.cli")),
    (("runtime",), ("smlaas.export", "smlaas.serving", "smlaas.deploy")),
    (("graph", "plan"), ("smlaas.profile", "smlaas.export", "smlaas.serving", "smlaas.deploy",
                         "smlaas.coordinator", "smlaas.enclave", "smlaas.cli")),
])
def test_imports_point_down(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    assert _violations(_modules(*packages), forbidden) == []


def test_the_owner_plane_never_imports_a_launcher_or_an_engine() -> None:
    owner = [SOURCE / "deploy" / "owner_plane.py", SOURCE / "cli" / "owner_cmds.py"]
    engines = ("smlaas.deploy.launchers", "smlaas.deploy.operator", "smlaas.deploy.ray_launcher",
               "smlaas.deploy.k8s", "ray", "kubernetes", "subprocess")
    assert _violations(owner, engines) == []


def test_every_smlaas_error_lives_in_errors_py_and_in_its_tree() -> None:
    """One exception tree: every SmlaasError subclass anywhere in the package is defined in
    errors.py and drawn in its docstring."""
    defined_elsewhere = []
    paths = [*_modules(*[p.name for p in SOURCE.iterdir() if p.is_dir()]),
             *(p for p in SOURCE.glob("*.py") if p.name != "errors.py")]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(base, ast.Name) and base.id in vars(smlaas.errors)
                    and isinstance(vars(smlaas.errors)[base.id], type)
                    and issubclass(vars(smlaas.errors)[base.id], smlaas.errors.SmlaasError)
                    for base in node.bases):
                defined_elsewhere.append(f"{path.relative_to(SOURCE)}: {node.name}")
    assert defined_elsewhere == []
    tree = smlaas.errors.__doc__ or ""
    for name, value in vars(smlaas.errors).items():
        if isinstance(value, type) and issubclass(value, smlaas.errors.SmlaasError):
            assert f" {name} " in tree, f"{name} is not drawn in errors.py's docstring"


def test_the_gateway_and_coordinator_processes_load_no_model_runtime() -> None:
    """The gateway and the coordinator never run a model: starting either loads neither onnx
    nor ONNX Runtime (a second or so of start-up and tens of MiB of enclave memory each)."""
    import subprocess
    import sys

    for module in ("smlaas.serving.gateway_process", "smlaas.coordinator.server"):
        loaded = subprocess.run(
            [sys.executable, "-c", f"import sys, smlaas.cli.main, smlaas.cli.serve_cmds, "
             f"smlaas.cli.coordinator_cmd, {module}; print(sorted(m for m in sys.modules "
             f"if m.split('.')[0] in ('onnx', 'onnxruntime')))"],
            capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        assert loaded == "[]", (module, loaded)
