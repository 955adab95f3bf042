"""``smlaas measure``: the measurements a deployment's roles have in simulated enclaves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from smlaas.cli.console import console, print_json, table
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.enclave.measurement import SIM_MRSIGNER
from smlaas.roles import CoordinatorSpec, GatewaySpec, RoleSpec, StageSpec


def sim_role_specs(owner_public_key: str, stages: int) -> list[RoleSpec]:
    """The coordinator, gateway and stage specs of a sim deployment (placement aside: it is
    not measured)."""
    coordinator = CoordinatorSpec(backend="sim", owner_public_key=owner_public_key)
    common: dict[str, Any] = {"backend": "sim",
                              "coordinator_mrenclave": coordinator.sim_mrenclave(),
                              "coordinator": ("", 0)}
    return [coordinator, GatewaySpec(first_stages=(("", 0),), listen=("", 0), model_name="",
                                     **common),
            *(StageSpec(index=k, listen=("", 0), sealed_dir="", **common)
              for k in range(stages))]


@click.command()
@click.option("--owner-key", "key_path", type=click.Path(dir_okay=False),
              help="The owner key the coordinator obeys (default: `smlaas owner`'s).")
@click.option("--stages", type=click.IntRange(min=0), default=1, show_default=True,
              help="How many stage roles to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def measure(key_path: str | None, stages: int, as_json: bool) -> int:
    """Print every role's MRENCLAVE under the sim backend (INSECURE simulation)."""
    owner = OwnerKey.load(Path(key_path) if key_path else default_owner_key_path())
    rows = {spec.role: spec.sim_mrenclave() for spec in sim_role_specs(owner.public_key_hex,
                                                                       stages)}
    if as_json:
        print_json({"backend": "sim", "simulated": True, "owner": owner.fingerprint,
                    "mrsigner": SIM_MRSIGNER.hex(), "mrenclave": rows})
    else:
        console.print(f"sim backend (SIMULATED - not hardware measurements), owner "
                      f"{owner.fingerprint}, MRSIGNER {SIM_MRSIGNER.hex()}")
        console.print(table("MRENCLAVE", ["role", "MRENCLAVE"],
                            [[role, mr] for role, mr in rows.items()]))
    return 0
