"""The ``ray`` launcher: one Ray actor per process, each on a node with an ``sgx`` resource.

Each actor runs a :class:`LocalLauncher` for its one process on its node, so starting,
logging and restarting work exactly as with ``local``; Ray only places and keeps the actors.
Tensors never pass through Ray: the processes talk over their own mutual-TLS links.

Nodes advertise SGX with ``ray start --resources='{"sgx": N}'``. Without ``--ray-address`` a
local single-node cluster is started that advertises ``sgx`` itself (for development: with the
sim backend nothing here is protected).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from smlaas.deploy.launchers import LocalLauncher, ProcessSpec
from smlaas.errors import ConfigError, DeployError

SGX_RESOURCE = "sgx"
LOCAL_SGX_SLOTS = 64
CALL_TIMEOUT_S = 120.0


class _ProcessHost:
    """Body of the Ray actor: a LocalLauncher for one process on the actor's node."""

    def __init__(self, log_dir: str) -> None:
        import ray

        self.launcher = LocalLauncher(Path(log_dir), host=ray.util.get_node_ip_address())

    def reserve(self, name: str) -> tuple[str, int]:
        return self.launcher.reserve(name)

    def start(self, spec: ProcessSpec) -> int:
        self.launcher.start(spec)
        return self.launcher.pid(spec.name)

    def pid(self, name: str) -> int:
        return self.launcher.pid(name)

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def problems(self) -> list[str]:
        return self.launcher.problems()

    def restarts(self) -> dict[str, int]:
        return self.launcher.restarts()

    def stop(self) -> None:
        self.launcher.stop()


class RayLauncher:
    name = "ray"

    def __init__(self, log_dir: Path, *, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("the ray launcher needs Ray: pip install 'smlaas[ray]'") from None
        self._ray = ray
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            if address is None:
                ray.init(resources={SGX_RESOURCE: LOCAL_SGX_SLOTS}, include_dashboard=False,
                         log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        if ray.cluster_resources().get(SGX_RESOURCE, 0) < 1:
            raise ConfigError(f"no node of the Ray cluster advertises the {SGX_RESOURCE!r} "
                              f"resource (ray start --resources='{{\"{SGX_RESOURCE}\": 1}}')")
        self._actor_class = ray.remote(num_cpus=0, resources={SGX_RESOURCE: 1},
                                       max_restarts=0)(_ProcessHost)
        self._actors: dict[str, Any] = {}  # name -> actor handle (ray's types are dynamic)

    def _call(self, ref: Any) -> Any:
        try:
            return self._ray.get(ref, timeout=CALL_TIMEOUT_S)
        except self._ray.exceptions.GetTimeoutError as err:
            raise DeployError(f"a Ray actor did not answer within {CALL_TIMEOUT_S:.0f} s "
                              f"(is a node with the {SGX_RESOURCE!r} resource free?)") from err

    def reserve(self, name: str) -> tuple[str, int]:
        actor: Any = self._actors.get(name)
        if actor is None:
            actor = self._actor_class.options(name=f"smlaas-{name}-{os.getpid()}").remote(
                str(self.log_dir))
            self._actors[name] = actor
        host, port = self._call(actor.reserve.remote(name))
        return str(host), int(port)

    def start(self, spec: ProcessSpec) -> None:
        if spec.name not in self._actors:
            self.reserve(spec.name)
        cache = os.environ.get("SMLAAS_CACHE_DIR")
        env = {**({"SMLAAS_CACHE_DIR": cache} if cache else {}), **spec.env}
        self._call(self._actors[spec.name].start.remote(ProcessSpec(spec.name, spec.argv, env)))

    def pid(self, name: str) -> int:
        return int(self._call(self._actors[name].pid.remote(name)))

    def node_of(self, name: str) -> str:
        """The Ray node ID hosting ``name``'s actor."""
        return str(self._call(self._actors[name].node.remote()))

    def problems(self) -> list[str]:
        found: list[str] = []
        for actor in self._actors.values():
            found += self._call(actor.problems.remote())
        return found

    def restarts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for actor in self._actors.values():
            counts.update(self._call(actor.restarts.remote()))
        return counts

    def stop(self) -> None:
        for actor in reversed(list(self._actors.values())):
            try:
                self._call(actor.stop.remote())
            finally:
                self._ray.kill(actor)
        self._actors.clear()
        if self._started_ray:
            self._ray.shutdown()
