"""``smlaas operator``: the operator plane, which starts the roles and holds nothing secret.

``operator up`` runs a sealed build's coordinator, workers and gateway (on this machine or a
Ray cluster) from its public parts and the owner's *public* key; the owner then attests the
coordinator and sets the manifest from its own machine (``smlaas owner set-manifest``).
``operator serve`` is the child that ``smlaas deploy`` starts for its launcher (JSON lines on
stdin and stdout; not for people).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from smlaas.cli.console import console, stop_on_ctrl_c_and_sigterm
from smlaas.client.release_check import owner_public_key_text
from smlaas.deploy.operator import make_launcher, operator_up, run_operator_child, wait_forever
from smlaas.deploy.topology import ServingLayout
from smlaas.enclave.backends import BACKENDS
from smlaas.paths import cache_dir

_launcher = click.option("--launcher", type=click.Choice(["local", "ray"]), default="local",
                         show_default=True, help="local: processes here; ray: actors on "
                         "`sgx` nodes of a Ray cluster.")
_ray_address = click.option("--ray-address", help="Ray cluster to join (default: start a "
                            "local one).")
_placement = click.option("--placement", type=click.Choice(["spread", "pack"]),
                          help="Ray: one stage enclave per node (spread) or packed.")


@click.group()
def operator() -> None:
    """The operator plane: start a sealed build's processes (no keys, no signatures)."""


@operator.command("serve", hidden=True)
@_launcher
@click.option("--log-dir", required=True, type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1")
@_ray_address
@_placement
def operator_serve(launcher: str, log_dir: str, host: str, ray_address: str | None,
                   placement: str | None) -> int:
    """The launcher of `smlaas deploy`, in a child process (JSON lines on stdin/stdout)."""
    run_operator_child(launcher, Path(log_dir), host=host, ray_address=ray_address,
                       placement=placement)
    return 0


@operator.command("up")
@click.argument("sealed_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--owner-public-key", required=True, metavar="HEX|FILE",
              help="The owner's public key (`smlaas owner show`, or the owner.pub file): the "
                   "coordinator obeys that owner only.")
@click.option("--backend", type=click.Choice(BACKENDS), default="sim", show_default=True)
@click.option("--coordinator-mrenclave", metavar="HEX",
              help="The coordinator's MRENCLAVE (gramine; for sim it is computed).")
@_launcher
@_ray_address
@_placement
@click.option("--host", default="127.0.0.1", show_default=True, help="Gateway address.")
@click.option("--port", default=8443, show_default=True, type=click.IntRange(1, 65535))
@click.option("--grpc-port", type=click.IntRange(1, 65535))
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="ONNX Runtime threads per stage replica.")
@click.option("--max-batch-size", type=click.IntRange(min=0),
              help="Lower the batching limit (the manifest's is the ceiling).")
@click.option("--replicas", "replica_specs", multiple=True, metavar="STAGE=COUNT")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Coordinator state and logs (default: a new directory in the cache).")
def operator_up_cmd(sealed_dir: str, owner_public_key: str, backend: str,
                    coordinator_mrenclave: str | None, launcher: str, ray_address: str | None,
                    placement: str | None, host: str, port: int, grpc_port: int | None,
                    threads: int, max_batch_size: int | None, replica_specs: tuple[str, ...],
                    state_dir: str | None) -> int:
    """Start SEALED_DIR's coordinator, workers and gateway; Ctrl-C stops them. The owner
    then runs `smlaas owner set-manifest` against the coordinator address printed here."""
    from smlaas.deploy.topology import parse_replicas

    state = Path(state_dir) if state_dir else \
        cache_dir() / "operator" / time.strftime("%Y%m%d-%H%M%S")
    stop_on_ctrl_c_and_sigterm()
    running = make_launcher(launcher, state / "logs", host=host, ray_address=ray_address,
                            placement=placement)
    try:
        coordinator = operator_up(
            Path(sealed_dir), running, owner_public_key=owner_public_key_text(owner_public_key),
            layout=ServingLayout(backend=backend, host=host, port=port, grpc_port=grpc_port,
                                 threads=threads),
            state_dir=state, replicas=parse_replicas(replica_specs) or None,
            max_batch_size=max_batch_size, coordinator_mrenclave=coordinator_mrenclave,
            progress=lambda line: console.print(f"  {line}"))
        address = f"{coordinator.listen[0]}:{coordinator.listen[1]}"
        mode = "sim backend: SIMULATED, INSECURE" if backend == "sim" else f"{backend} backend"
        console.print(f"[bold]operator up[/] ({mode})\n"
                      f"  coordinator {address}\n"
                      f"  gateway     https://{host}:{port}\n"
                      f"  owner, on the owner's machine: smlaas owner set-manifest BUILD "
                      f"--keys KEYS --coordinator {address}\n  Ctrl-C to stop")
        console.file.flush()
        wait_forever(running)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        running.stop()
    return 0
