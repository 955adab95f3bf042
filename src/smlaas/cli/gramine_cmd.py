"""``smlaas gramine manifest`` / ``measure``: Gramine manifests for every role of a sealed
build, sized from measured footprints."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from smlaas.cli.console import console
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.deploy.gramine_manifests import IMAGE_SEALED_DIR, IMAGE_STATE_DIR, write_manifests
from smlaas.deploy.gramine_sizes import DEFAULT_MAX_STAGE_THREADS, Footprints
from smlaas.deploy.python_layout import PythonLayout

DEFAULT_STATE_DIR = "/var/lib/smlaas"


@click.group()
def gramine() -> None:
    """Real SGX with Gramine (manifests; not yet verified on hardware)."""


@gramine.command("manifest")
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--owner-key", "key_path", type=click.Path(dir_okay=False),
              help="The owner key the coordinator will obey (default: `smlaas owner`'s).")
@click.option("--coordinator-mrenclave", metavar="HEX",
              help="The signed coordinator's MRENCLAVE (from gramine-sgx-sign): needed to "
                   "write the gateway's and the stages' manifests.")
@click.option("--state-dir", metavar="DIR",
              help=f"Host directory for the coordinator's sealed state (default "
                   f"{DEFAULT_STATE_DIR}; {IMAGE_STATE_DIR} with --for-image).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where to write (default: BUILD_DIR/gramine).")
@click.option("--python", "python", type=click.Path(dir_okay=False),
              help="The Python that will run the roles, e.g. a venv's bin/python3 (default: "
                   "the one running this command).")
@click.option("--for-image", is_flag=True,
              help="For deploy/Dockerfile's image and the Kubernetes pods: its Python, the "
                   f"sealed directory at {IMAGE_SEALED_DIR}, the state at {IMAGE_STATE_DIR}.")
@click.option("--measured", "measured_path", type=click.Path(dir_okay=False, exists=True),
              help="Footprints from `smlaas gramine measure` to size the enclaves (default: "
                   "a baseline measured by the project plus each stage's working set).")
@click.option("--max-stage-threads", type=click.IntRange(1, 256),
              default=DEFAULT_MAX_STAGE_THREADS, show_default=True,
              help="The most ONNX Runtime threads (SMLAAS_THREADS) a stage may be started "
                   "with: sgx.max_threads makes room for them.")
@click.option("--debug-enclave", is_flag=True, help="sgx.debug = true (INSECURE).")
def gramine_manifest(build_dir: str, key_path: str | None, coordinator_mrenclave: str | None,
                     state_dir: str | None, out_dir: str | None, python: str | None,
                     for_image: bool, measured_path: str | None, max_stage_threads: int,
                     debug_enclave: bool) -> int:
    """Write <role>.manifest.template for every role of the sealed BUILD_DIR."""
    if python and for_image:
        raise click.UsageError("--python and --for-image name two different interpreters")
    owner = OwnerKey.load(Path(key_path) if key_path else default_owner_key_path())
    out = Path(out_dir) if out_dir else Path(build_dir) / "gramine"
    layout = PythonLayout.image() if for_image else PythonLayout.of_interpreter(python)
    footprints = Footprints.from_json(Path(measured_path).read_text()) if measured_path \
        else None
    written = write_manifests(
        Path(build_dir), out, owner_public_key=owner.public_key_hex,
        coordinator_mrenclave=coordinator_mrenclave,
        state_dir=state_dir or (IMAGE_STATE_DIR if for_image else DEFAULT_STATE_DIR),
        debug=debug_enclave, layout=layout,
        sealed_host_dir=IMAGE_SEALED_DIR if for_image else None, footprints=footprints,
        max_stage_threads=max_stage_threads)
    console.print(f"for {layout.describe()}")
    for note in layout.notes:
        console.print(f"  {note}")
    for path in written:
        console.print(f"wrote {path}")
    if coordinator_mrenclave is None:
        console.print("next: render and sign the coordinator's manifest (gramine-manifest, "
                      "gramine-sgx-sign), then run again with --coordinator-mrenclave HEX for "
                      "the gateway's and the stages'")
    console.print("the hardware path is not yet verified (no SGX machine available to this "
                  "project); which files the manifests let in is checked by "
                  "tests/component/test_gramine_manifest_files.py")
    return 0


@gramine.command("measure")
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--keys", "keys_path", required=True, type=click.Path(dir_okay=False),
              help="The owner keyfile `smlaas seal` wrote (the deployment needs the stage "
                   "keys).")
@click.option("--owner-key", "key_path", type=click.Path(dir_okay=False),
              help="The owner signing key (default: `smlaas owner`'s).")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False),
              default="footprints.json", show_default=True)
@click.option("--requests", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Inferences before the footprints are read.")
def gramine_measure(build_dir: str, keys_path: str, key_path: str | None, out_path: str,
                    requests: int) -> int:
    """Measure every role's footprint (peak virtual size, threads) on this machine.

    Deploys the sealed BUILD_DIR here with the sim backend (the same processes as under
    Gramine, without the enclave), sends a few inferences and reads /proc/PID/status of
    every role. `smlaas gramine manifest --measured FILE` sizes the enclaves from it.
    """
    from smlaas.coordinator.server import free_port
    from smlaas.deploy.gramine_sizes import measure_footprints
    from smlaas.deploy.settings import DeploySettings

    with tempfile.TemporaryDirectory(prefix="smlaas-measure-") as state:
        settings = DeploySettings(
            build_dir=Path(build_dir), keys_path=Path(keys_path), state_dir=Path(state),
            owner_key_path=Path(key_path) if key_path else default_owner_key_path(),
            port=free_port(), threads=1)
        footprints = measure_footprints(settings, requests=requests,
                                        progress=lambda line: console.print(f"  {line}"))
    Path(out_path).write_text(footprints.to_json())
    console.print(footprints.text())
    console.print(f"wrote {out_path} (measured on {footprints.machine}; the sim backend "
                  f"stands in for the enclave)")
    return 0
