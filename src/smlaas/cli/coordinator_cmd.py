"""``smlaas coordinator``: run the coordinator (attests enclaves, issues certificates)."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console, stop_on_ctrl_c_and_sigterm
from smlaas.cli.serve_cmds import host_option
from smlaas.coordinator.owner import parse_public_key, public_key_fingerprint
from smlaas.coordinator.server import CoordinatorServer
from smlaas.enclave.backends import BACKENDS, create_backend
from smlaas.paths import cache_dir
from smlaas.roles import CoordinatorSpec


@click.command()
@click.option("--backend", type=click.Choice(BACKENDS), default="sim", show_default=True)
@click.option("--owner-public-key", required=True, metavar="HEX",
              help="The owner's public key (`smlaas owner show`): only manifests it signed "
                   "are accepted. Measured: part of the coordinator's identity.")
@host_option("--host", default="127.0.0.1", show_default=True)
@host_option("--port", default=7443, show_default=True, type=click.IntRange(0, 65535))
@host_option("--state", "state_path", type=click.Path(dir_okay=False),
             help="Sealed state file (default: under the smlaas cache).")
def coordinator(backend: str, owner_public_key: str, host: str, port: int,
                state_path: str | None) -> int:
    """Serve the coordinator over RA-TLS until interrupted."""
    parse_public_key(owner_public_key)
    spec = CoordinatorSpec(backend=backend, owner_public_key=owner_public_key,
                           listen=(host, port), state_path=state_path or "")
    enclave = create_backend(backend, spec.role, spec.measured_config())
    server = CoordinatorServer(enclave,
                               Path(state_path) if state_path else
                               cache_dir() / "coordinator" / "state.sealed",
                               owner_public_key=owner_public_key, host=host, port=port)
    bound_host, bound_port = server.address
    mode = "sim backend: SIMULATED, INSECURE" if enclave.simulated else f"{backend} backend"
    console.print(f"coordinator on {bound_host}:{bound_port} (RA-TLS, {mode}) for owner "
                  f"{public_key_fingerprint(owner_public_key)}; Ctrl-C to stop")
    console.file.flush()
    stop_on_ctrl_c_and_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
