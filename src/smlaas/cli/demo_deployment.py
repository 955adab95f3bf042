"""The demo's deployment: started on this machine, its gateway attested, stopped after."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from smlaas.cli.console import console
from smlaas.client import InferenceClient
from smlaas.coordinator.manifest import GATEWAY_ROLE
from smlaas.deploy.deployment import Deployment, DeploySettings


@dataclass
class DemoDeployment:
    client: InferenceClient
    """A client whose gateway is attested (under the owner's current release)."""
    ready_s: float
    stages: int


@contextlib.contextmanager
def attested_demo(settings: DeploySettings) -> Iterator[DemoDeployment]:
    """Deploys ``settings`` on this machine, attests the gateway, and stops it all after."""
    started = time.perf_counter()
    deployment = Deployment.on_this_machine(settings,
                                            progress=lambda line: console.print(f"  {line}"))
    with deployment as dep:
        ready_s = time.perf_counter() - started
        with dep.client() as client:
            verdict = client.attest(dep.role_policy(GATEWAY_ROLE), dep.trusted_roots,
                                    manifest_digest=dep.manifest.digest()
                                    if dep.manifest else None)
            release = client.release
            console.print(f"gateway attested: MRENCLAVE {verdict.mrenclave[:16]}... "
                          f"(SIMULATED), its quote binds the HTTPS key of this connection; "
                          f"it serves under the owner's release v"
                          f"{release.version if release else '?'} (signed by the owner key, "
                          f"unexpired, the current one)")
            yield DemoDeployment(client, ready_s, dep.stage_count)
    console.print("stopped the deployment (coordinator, workers, gateway)")
