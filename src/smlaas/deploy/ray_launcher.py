"""The ``ray`` launcher: one Ray actor per process, each on a node with an ``sgx`` resource.

Each actor runs a :class:`LocalLauncher` for its one process on its node, so starting,
logging and restarting work exactly as with ``local``; Ray only places and keeps the actors.
Tensors never pass through Ray: the processes talk over their own mutual-TLS links.

Placement: the stage processes are booked at once in one placement group, a bundle per
enclave (``sgx: 1`` plus the CPUs its ONNX Runtime threads use), ``STRICT_SPREAD`` when every
enclave must have its own machine (``placement="spread"``, the design's one machine per
enclave) or ``PACK`` otherwise; a cluster that cannot hold it is refused with what is missing.
The coordinator and the gateway are actors of their own (``sgx: 1``, one CPU). Actors are
restartable: an actor that dies (its raylet killed it, or it was killed) is started again by
Ray in its bundle, reads the process it ran from Ray's key-value store and starts it again with
the same command (same port), so it registers again and its upstream reconnects. A process dies
with its actor (``PR_SET_PDEATHSIG``), so a restarted actor never finds its port taken. If a
whole node is lost, its bundle is placed on another node: the process then listens on another
address, which its upstream does not learn (it dials the address it was given) — that case is
not handled.

Nodes advertise SGX with ``ray start --resources='{"sgx": N}'``. Without ``--ray-address`` a
local single-node cluster is started that advertises ``sgx`` itself (for development: with the
sim backend nothing here is protected).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from smlaas.deploy.launchers import LocalLauncher, ProcessSpec
from smlaas.errors import ConfigError, DeployError

SGX_RESOURCE = "sgx"
LOCAL_SGX_SLOTS = 64
CALL_TIMEOUT_S = 120.0


def _kv_key(name: str, owner: str) -> bytes:
    return f"smlaas/{owner}/{name}".encode()


class _ProcessHost:
    """Body of the Ray actor: a LocalLauncher for one process on the actor's node. A
    restarted actor starts again the process it ran (kept in Ray's key-value store)."""

    def __init__(self, log_dir: str, name: str, owner: str) -> None:
        import ray
        from ray.experimental import internal_kv

        self.key = _kv_key(name, owner)
        self.launcher = LocalLauncher(Path(log_dir), host=ray.util.get_node_ip_address(),
                                      die_with_parent=True)
        saved = internal_kv._internal_kv_get(self.key)
        self.incarnations = 1
        if saved is not None:
            spec = json.loads(saved)
            self.incarnations = int(spec.pop("incarnations", 1)) + 1
            self._launch(ProcessSpec(spec["name"], spec["argv"], spec["env"]))

    def reserve(self, name: str) -> tuple[str, int]:
        return self.launcher.reserve(name)

    def start(self, spec: ProcessSpec) -> int:
        self._launch(spec)
        return self.launcher.pid(spec.name)

    def _launch(self, spec: ProcessSpec) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.key, json.dumps(
            {"name": spec.name, "argv": spec.argv, "env": spec.env,
             "incarnations": self.incarnations}), overwrite=True)
        self.launcher.start(spec)

    def actor_restarts(self) -> int:
        return self.incarnations - 1

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
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self.key)
        self.launcher.stop()


PLACEMENTS = ("spread", "pack")
PLACEMENT_TIMEOUT_S = 60.0


class RayLauncher:
    name = "ray"

    def __init__(self, log_dir: Path, *, address: str | None = None,
                 placement: str | None = None,
                 placement_timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
        """``placement``: "spread" (one enclave per node) or "pack"; by default spread on a
        cluster joined by ``address``, pack on the local one started here."""
        placement = placement or ("spread" if address else "pack")
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {', '.join(PLACEMENTS)}, got "
                              f"{placement!r}")
        self.placement = placement
        self.placement_timeout_s = placement_timeout_s
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
                # Logical CPUs as many as SGX slots: a development cluster on one machine
                # shares its cores between the enclaves (a real node declares its own).
                ray.init(resources={SGX_RESOURCE: LOCAL_SGX_SLOTS}, num_cpus=LOCAL_SGX_SLOTS,
                         include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        if ray.cluster_resources().get(SGX_RESOURCE, 0) < 1:
            raise ConfigError(f"no node of the Ray cluster advertises the {SGX_RESOURCE!r} "
                              f"resource (ray start --resources='{{\"{SGX_RESOURCE}\": 1}}')")
        self._actor_class = ray.remote(max_restarts=-1)(_ProcessHost)
        self._actors: dict[str, Any] = {}  # name -> actor handle (ray's types are dynamic)
        self._bundles: dict[str, tuple[int, int]] = {}  # stage process -> (bundle, cpus)
        self._group: Any = None
        self._owner = f"{os.getpid()}-{id(self)}"

    def prepare(self, enclaves: list[tuple[str, int]]) -> None:
        """Books a bundle per stage process (``sgx`` and its CPUs) in one placement group."""
        from ray.util.placement_group import placement_group

        bundles = [{SGX_RESOURCE: 1, "CPU": max(1, cpus)} for _, cpus in enclaves]
        strategy = "STRICT_SPREAD" if self.placement == "spread" else "PACK"
        group = placement_group(bundles, strategy=strategy, name=f"smlaas-{self._owner}")
        try:
            self._ray.get(group.ready(), timeout=self.placement_timeout_s)
        except self._ray.exceptions.GetTimeoutError as err:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
            nodes = sum(1 for n in self._ray.nodes() if n.get("Alive") and
                        n.get("Resources", {}).get(SGX_RESOURCE, 0) >= 1)
            raise DeployError(
                f"the Ray cluster cannot place {len(bundles)} enclave(s) "
                f"({strategy}: {'one per node' if strategy == 'STRICT_SPREAD' else 'packed'}, "
                f"each sgx: 1 and its CPUs); it has {nodes} node(s) with the "
                f"{SGX_RESOURCE!r} resource (use placement 'pack' to share nodes)") from err
        self._group = group
        self._bundles = {name: (index, max(1, cpus))
                         for index, (name, cpus) in enumerate(enclaves)}

    def _new_actor(self, name: str) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict[str, Any] = {"name": f"smlaas-{name}-{self._owner}",
                                   "resources": {SGX_RESOURCE: 1}, "num_cpus": 1}
        if name in self._bundles and self._group is not None:
            index, cpus = self._bundles[name]
            options.update(num_cpus=cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._group, placement_group_bundle_index=index))
        return self._actor_class.options(**options).remote(str(self.log_dir), name,
                                                           self._owner)

    def _call(self, ref: Any) -> Any:
        try:
            return self._ray.get(ref, timeout=CALL_TIMEOUT_S)
        except self._ray.exceptions.GetTimeoutError as err:
            raise DeployError(f"a Ray actor did not answer within {CALL_TIMEOUT_S:.0f} s "
                              f"(is a node with the {SGX_RESOURCE!r} resource free?)") from err

    def reserve(self, name: str) -> tuple[str, int]:
        actor: Any = self._actors.get(name)
        if actor is None:
            actor = self._new_actor(name)
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
        """Process restarts, counting a restarted actor's new process as one."""
        counts: dict[str, int] = {}
        for actor in self._actors.values():
            restarts = self._call(actor.restarts.remote())
            extra = self._call(actor.actor_restarts.remote())
            counts.update({name: n + extra for name, n in restarts.items()})
        return counts

    def actor(self, name: str) -> Any:
        """The Ray actor hosting ``name`` (tests kill it to stand for a lost raylet)."""
        return self._actors[name]

    def stop(self) -> None:
        for actor in reversed(list(self._actors.values())):
            try:
                self._call(actor.stop.remote())
            finally:
                self._ray.kill(actor)
        self._actors.clear()
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._group)
            self._group = None
        if self._started_ray:
            self._ray.shutdown()
