"""``smlaas measure``: the measurement this installation would have in a simulated enclave."""

from __future__ import annotations

import click

from smlaas.cli.console import console, print_json
from smlaas.enclave.measurement import measure as measure_role


@click.command()
@click.option("--role", default="worker", show_default=True,
              help="Role (coordinator, gateway, stage-0, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def measure(role: str, as_json: bool) -> int:
    """Print MRENCLAVE and MRSIGNER of ROLE under the sim backend (INSECURE simulation)."""
    result = measure_role(role).to_dict() | {"backend": "sim", "simulated": True}
    if as_json:
        print_json(result)
    else:
        console.print(f"role {role} (sim backend, SIMULATED - not a hardware measurement)")
        console.print(f"  MRENCLAVE {result['mrenclave']}")
        console.print(f"  MRSIGNER  {result['mrsigner']}")
    return 0
