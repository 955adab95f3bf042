"""``smlaas coordinator``: run the coordinator (attests enclaves, issues certificates)."""

from __future__ import annotations

from pathlib import Path

import click

from smlaas.cli.console import console
from smlaas.coordinator.server import CoordinatorServer
from smlaas.enclave.backends.sim import SimBackend
from smlaas.errors import ConfigError
from smlaas.profile.cache import cache_dir


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=7443, show_default=True, type=click.IntRange(0, 65535))
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Sealed state file (default: under the smlaas cache).")
@click.option("--backend", type=click.Choice(["sim", "gramine"]), default="sim",
              show_default=True)
def coordinator(host: str, port: int, state_path: str | None, backend: str) -> int:
    """Serve the coordinator over RA-TLS until interrupted."""
    if backend != "sim":
        raise ConfigError("the gramine backend is not available yet; use --backend sim")
    server = CoordinatorServer(SimBackend("coordinator"),
                               Path(state_path) if state_path else
                               cache_dir() / "coordinator" / "state.sealed",
                               host=host, port=port)
    bound_host, bound_port = server.address
    console.print(f"coordinator on {bound_host}:{bound_port} (RA-TLS, sim backend: "
                  f"SIMULATED, INSECURE); Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
