"""The ``ray`` launcher: one Ray actor per process, each on a node with an ``sgx`` resource.

Each actor runs a :class:`LocalLauncher` for its one process on its node, so starting,
logging and restarting work exactly as with ``local``; Ray only places and keeps the actors.
Tensors never pass through Ray: the processes talk over their own mutual-TLS links.

Placement: every process is booked in one placement group before it starts: one bundle for
the coordinator and the gateway together (``sgx: 2``, a CPU each) and one per stage process
(``sgx: 1`` and the CPUs of its ONNX Runtime threads); ``placement="spread"`` (one machine per
enclave) is ``STRICT_SPREAD``, each stage process and the control bundle on nodes of their
own; ``"pack"`` is ``PACK``. The request is first checked against the cluster's nodes
(:func:`placement_problem`): a cluster that can never hold it is refused at once, naming what
is missing, instead of pending in Ray. The Launcher protocol calls ``prepare`` before any
``reserve``; when the coordinator is reserved first, its bundle is booked then, in a group of
its own that the gateway joins, and the stages' group is checked against what is left.

Restarts: an actor that dies (its raylet killed it, or it was killed) is started again by Ray
in its bundle, reads the process it ran from Ray's key-value store and starts the same command
(same port), so it registers again and its upstream reconnects. That store is the host's: a
host that rewrites an entry starts another command, which the coordinator and the roles refuse
like any command the host chooses (tests/security/test_ray_kv_attack.py). A process dies with
its actor (``PR_SET_PDEATHSIG``), so a restarted actor never finds its port taken. A bundle
of a lost node is placed on another node, where its process listens on an address its
upstream does not learn: not handled.

Token authentication: a head started with ``RAY_AUTH_MODE=token`` (or that found a token in
``~/.ray/auth_token`` when it started) refuses drivers that do not send its token, and Ray
never turns token mode on by itself for a driver given an address: the process running this
launcher needs ``RAY_AUTH_MODE=token`` and the token in ``RAY_AUTH_TOKEN`` (or a file named by
``RAY_AUTH_TOKEN_PATH``, by default ``~/.ray/auth_token``); a refusal is a ConfigError saying
so (:func:`auth_refusal_message`).

Nodes advertise SGX with ``ray start --resources='{"sgx": N}'``. Without ``--ray-address`` a
local single-node cluster is started that advertises ``sgx`` itself (for development: with the
sim backend nothing here is protected).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from smlaas.coordinator.manifest import GATEWAY_ROLE
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.deploy.launchers import LocalLauncher, ProcessSpec
from smlaas.deploy.ray_auth import (
    AUTH_MODE_VARIABLE,
    auth_refusal_message,
    refused_for_auth,
    token_source,
)
from smlaas.deploy.ray_placement import (
    CPU_RESOURCE,
    PLACEMENT_TIMEOUT_S,
    PLACEMENTS,
    RAY_STRATEGIES,
    SGX_RESOURCE,
    Bundle,
    NodeCapacity,
    amount,
    placement_problem,
)
from smlaas.errors import ConfigError, DeployError

logger = logging.getLogger(__name__)
LOCAL_SGX_SLOTS = 64
CALL_TIMEOUT_S = 120.0
CONTROL_ROLES = (COORDINATOR_ROLE, GATEWAY_ROLE)
"""The processes that share the control bundle: one sgx slot and one CPU each."""
CONTROL_BUNDLE = "+".join(CONTROL_ROLES)


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


# -- placement: pure checks ------------------------------------------------------------------
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
        # Absolute: the actors run with another working directory, on other nodes.
        self.log_dir = Path(log_dir).resolve()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            if address is None:
                # Logical CPUs as many as SGX slots: a development cluster on one machine
                # shares its cores between the enclaves (a real node declares its own).
                ray.init(resources={SGX_RESOURCE: LOCAL_SGX_SLOTS}, num_cpus=LOCAL_SGX_SLOTS,
                         include_dashboard=False, log_to_driver=False)
            else:
                self._join(address)
        if ray.cluster_resources().get(SGX_RESOURCE, 0) < 1:
            raise ConfigError(f"no node of the Ray cluster advertises the {SGX_RESOURCE!r} "
                              f"resource (ray start --resources='{{\"{SGX_RESOURCE}\": 1}}')")
        self._actor_class = ray.remote(max_restarts=-1)(_ProcessHost)
        self._actors: dict[str, Any] = {}  # name -> actor handle (ray's types are dynamic)
        self._places: dict[str, tuple[Any, int, int]] = {}  # name -> (group, bundle, cpus)
        self._control: tuple[Any, int] | None = None  # the control bundle: (group, index)
        self._groups: list[Any] = []
        self._owner = f"{os.getpid()}-{id(self)}"

    def _join(self, address: str) -> None:
        ray = self._ray
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as err:  # Ray raises ConnectionError, RuntimeError or its own
            if refused_for_auth(err):
                raise ConfigError(auth_refusal_message(
                    address, auth_mode=os.environ.get(AUTH_MODE_VARIABLE),
                    token=token_source(os.environ, home=Path.home()))) from None
            raise DeployError(f"cannot join the Ray cluster at {address}: {err}") from err

    # -- placement -----------------------------------------------------------------------
    def prepare(self, enclaves: list[tuple[str, int]]) -> None:
        """Books, in one placement group, a bundle per stage process (``sgx`` and its CPUs)
        and, unless the coordinator's is booked already, the control bundle."""
        stages = [Bundle(name, 1, max(1, cpus)) for name, cpus in enclaves]
        books_control = self._control is None
        bundles = ([self._control_bundle()] if books_control else []) + stages
        group = self._book(bundles)
        first = 1 if books_control else 0
        if books_control:
            self._control = (group, 0)
        self._places.update({bundle.name: (group, first + k, bundle.cpus)
                             for k, bundle in enumerate(stages)})

    @staticmethod
    def _control_bundle() -> Bundle:
        return Bundle(CONTROL_BUNDLE, len(CONTROL_ROLES), len(CONTROL_ROLES))

    def _book(self, bundles: list[Bundle]) -> Any:
        """A ready placement group of ``bundles``; DeployError naming what is missing."""
        from ray.util.placement_group import placement_group, remove_placement_group

        problem = placement_problem(bundles, self._capacities(), placement=self.placement)
        if problem:
            raise DeployError(problem)
        group = placement_group([b.resources() for b in bundles],
                                strategy=RAY_STRATEGIES[self.placement],
                                name=f"smlaas-{self._owner}-{len(self._groups)}")
        try:
            self._ray.get(group.ready(), timeout=self.placement_timeout_s)
        except self._ray.exceptions.GetTimeoutError as err:
            remove_placement_group(group)
            free = self._ray.available_resources()
            raise DeployError(
                f"the Ray cluster could hold {', '.join(b.describe() for b in bundles)} "
                f"(placement {self.placement!r}) but did not place them within "
                f"{self.placement_timeout_s:.0f} s: other work holds its resources (free now: "
                f"{amount(free.get(SGX_RESOURCE, 0), SGX_RESOURCE)}, "
                f"{amount(free.get(CPU_RESOURCE, 0), 'CPU')} in all)") from err
        self._groups.append(group)
        return group

    def _capacities(self) -> list[NodeCapacity]:
        """The live nodes' resources, less the bundles this launcher already holds."""
        from ray.util.placement_group import placement_group_table

        held: dict[str, list[float]] = {}
        for group in self._groups:
            table = placement_group_table(group)
            for index, node_id in table.get("bundles_to_node_id", {}).items():
                bundle = table["bundles"][index]
                used = held.setdefault(str(node_id), [0.0, 0.0])
                used[0] += bundle.get(SGX_RESOURCE, 0)
                used[1] += bundle.get(CPU_RESOURCE, 0)
        nodes = []
        for node in self._ray.nodes():
            if not node.get("Alive"):
                continue
            resources, node_id = node.get("Resources", {}), str(node.get("NodeID", ""))
            used = held.get(node_id, [0.0, 0.0])
            nodes.append(NodeCapacity(
                f"node {node.get('NodeManagerAddress', '?')} ({node_id[:8]}"
                f"{', what this deployment left' if any(used) else ''})",
                resources.get(SGX_RESOURCE, 0) - used[0],
                resources.get(CPU_RESOURCE, 0) - used[1]))
        return nodes

    def _place(self, name: str) -> tuple[Any, int, int] | None:
        """(group, bundle index, CPUs) for ``name``'s actor; the coordinator and the gateway
        share the control bundle, booked here when they come before ``prepare``."""
        if name in self._places:
            return self._places[name]
        if name in CONTROL_ROLES:
            if self._control is None:
                self._control = (self._book([self._control_bundle()]), 0)
            return (*self._control, 1)
        return None  # not announced by prepare: an actor of its own, outside any group

    def _new_actor(self, name: str) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict[str, Any] = {"name": f"smlaas-{name}-{self._owner}",
                                   "resources": {SGX_RESOURCE: 1}, "num_cpus": 1}
        place = self._place(name)
        if place is not None:
            group, index, cpus = place
            options.update(num_cpus=cpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=index))
        return self._actor_class.options(**options).remote(str(self.log_dir), name,
                                                           self._owner)

    # -- the Launcher protocol -----------------------------------------------------------
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

    def kv_key(self, name: str) -> bytes:
        """The key under which ``name``'s actor keeps its command in Ray's key-value store
        (the security tests rewrite it, as a host could)."""
        return _kv_key(name, self._owner)

    def stop(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for name, actor in reversed(list(self._actors.items())):
            try:
                self._call(actor.stop.remote())
            except Exception as err:  # a dead actor or node: its process died with it
                logger.warning("could not stop %s through its actor: %s", name, err)
            finally:
                self._ray.kill(actor)
        self._actors.clear()
        for group in self._groups:
            remove_placement_group(group)
        self._groups.clear()
        self._places.clear()
        self._control = None
        if self._started_ray:
            self._ray.shutdown()
