"""``smlaas coordinator``: run the coordinator (attests enclaves, issues certificates)."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console, stop_on_ctrl_c_and_sigterm
from smlaas.coordinator.server import CoordinatorServer
from smlaas.profile.cache import cache_dir
from smlaas.serving.enrol import BACKENDS, create_backend


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7443, show_default=True, type=click.IntRange(0, 65535))
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Sealed state file (default: under the smlaas cache).")
@click.option("--backend", type=click.Choice(BACKENDS), default="sim",
              show_default=True)
def coordinator(host: str, port: int, state_path: str | None, backend: str) -> int:
    """Serve the coordinator over RA-TLS until interrupted."""
    enclave = create_backend(backend, "coordinator")
    server = CoordinatorServer(enclave,
                               Path(state_path) if state_path else
                               cache_dir() / "coordinator" / "state.sealed",
                               host=host, port=port)
    bound_host, bound_port = server.address
    mode = "sim backend: SIMULATED, INSECURE" if enclave.simulated else f"{backend} backend"
    console.print(f"coordinator on {bound_host}:{bound_port} (RA-TLS, {mode}); Ctrl-C to stop")
    stop_on_ctrl_c_and_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
