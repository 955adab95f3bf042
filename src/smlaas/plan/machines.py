"""Classes of machines a plan may use, and the cost of every stage on each class (pure).

A heterogeneous deployment has a few *classes* of machines (``--machines-file``): each with a
count, a usable EPC, a relative compute speed and a network rate. Reading the TOML file is the
partition layer's job (:func:`smlaas.partition.read_machines_file`); this module holds the
parsed data and applies it to the shared cost table.

NOTE_MACHINE_CLASS: how a class changes the figures of :mod:`smlaas.plan.cost_model`.

- *Compute*: the segment's native time T divides by ``speed`` (1.0 is the machine the cost
  model describes), so ``T_enc = alpha * T / speed + transitions + paging(M)``. Transitions
  and paging keep the cost model's values: they are SGX costs (ECALL/OCALL round trips, MEE
  page encryption), which a faster core does not change in proportion.
- *EPC*: paging and ``--fit-epc`` use the class's ``usable_epc_mib``. The working set M does
  not depend on the class.
- *Network*: a stage on the class receives and sends at the class's ``network_mib_per_s``;
  hop latency and the AEAD rate are the cost model's. A transfer's *latency* is counted at
  the receiving stage's rate (the request into stage 0 too), as in a homogeneous plan where
  a stage's latency includes its input transfer. A link's *capacity* bounds the period at
  both ends: each machine's incoming and outgoing links at its class's rate, and the
  gateway's (every request out, every result in) at the cost model's rate, since the
  gateway is not one of the file's machines. The result's transfer back to the gateway is
  counted in latency at the cost model's rate, as without a machines file.

All of this is recomputed from what :class:`~smlaas.plan.costs.SegmentCosts` keeps (native
time and working set of every segment, bytes of every cut), so every class is priced by the
same formulas as the homogeneous planners.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from smlaas.errors import ConfigError
from smlaas.plan.cost_model import MIB, CostModel
from smlaas.plan.costs import SegmentCosts

MAX_CLASSES = 4
"""The exact planners' state grows with the product of (count + 1) over classes."""


@dataclass(frozen=True)
class MachineClass:
    """A number of identical machines. Units are in the names; ``speed`` is relative."""

    name: str
    count: int
    usable_epc_mib: float
    speed: float
    network_mib_per_s: float

    @property
    def usable_epc_bytes(self) -> float:
        return self.usable_epc_mib * MIB

    def cost_model(self, base: CostModel) -> CostModel:
        """``base`` with this class's EPC and network rate (see NOTE_MACHINE_CLASS)."""
        return replace(base, usable_epc_mib=self.usable_epc_mib,
                       network_mib_per_s=self.network_mib_per_s)

    def enclave_time_ms(self, base: CostModel, native_ms: Any, working_set_bytes: Any) -> Any:
        """Enclave time on this class of a stage with ``native_ms`` on the reference machine."""
        native = np.asarray(native_ms, dtype=float) / self.speed
        return self.cost_model(base).enclave_time_ms(native, working_set_bytes)

    def transfer_ms(self, base: CostModel, nbytes: Any) -> Any:
        """Time to move ``nbytes`` into (or out of) a machine of this class."""
        return self.cost_model(base).transfer_ms(nbytes)

    def validate(self) -> list[str]:
        problems = []
        if not self.name:
            problems.append("a class has an empty name")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            problems.append(f"class {self.name!r}: count must be an integer >= 1, got "
                            f"{self.count!r}")
        for field in ("usable_epc_mib", "speed", "network_mib_per_s"):
            value = getattr(self, field)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                problems.append(f"class {self.name!r}: {field} must be a number > 0, got "
                                f"{value!r}")
        return problems


_REQUIRED = ("name", "count")
_OPTIONAL = ("usable_epc_mib", "speed", "network_mib_per_s")


@dataclass(frozen=True)
class MachinePool:
    """The machines a plan may use: one to :data:`MAX_CLASSES` classes with distinct names."""

    classes: tuple[MachineClass, ...]

    @property
    def total_count(self) -> int:
        return sum(c.count for c in self.classes)

    def get(self, name: str) -> MachineClass:
        for machine_class in self.classes:
            if machine_class.name == name:
                return machine_class
        raise KeyError(name)

    def describe(self) -> str:
        """``2 x sgx1-large, 4 x small``."""
        return ", ".join(f"{c.count} x {c.name}" for c in self.classes)

    def validate(self) -> list[str]:
        problems = []
        if not self.classes:
            problems.append("no machine class is given (expected [[class]] tables)")
        if len(self.classes) > MAX_CLASSES:
            problems.append(f"{len(self.classes)} machine classes, at most {MAX_CLASSES} are "
                            f"supported: the exact planners' work grows with the product of "
                            f"(count + 1) over classes; merge similar classes")
        names = [c.name for c in self.classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"class name(s) {', '.join(map(repr, duplicates))} appear more "
                            f"than once")
        for machine_class in self.classes:
            problems.extend(machine_class.validate())
        return problems

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, defaults: CostModel,
                  source: str = "machines file") -> MachinePool:
        """Parses ``{"class": [{name, count, usable_epc_mib?, speed?, network_mib_per_s?},
        ...]}``; a missing EPC or network rate is ``defaults``'s, a missing speed 1.0.

        Raises:
            ConfigError: listing every problem, prefixed by ``source``.
        """
        unknown = sorted(set(data) - {"class"})
        problems = [f"unknown top-level key(s) {', '.join(unknown)}; expected [[class]] "
                    f"tables"] if unknown else []
        tables = data.get("class", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError(f"{source}: 'class' must be an array of tables ([[class]])")
        classes = []
        for position, table in enumerate(tables):
            label = repr(table.get("name", f"#{position}"))
            extra = sorted(set(table) - set(_REQUIRED) - set(_OPTIONAL))
            if extra:
                problems.append(f"class {label}: unknown key(s) {', '.join(extra)}; known: "
                                f"{', '.join(_REQUIRED + _OPTIONAL)}")
            missing = [key for key in _REQUIRED if key not in table]
            if missing:
                problems.append(f"class {label}: missing {', '.join(missing)}")
                continue
            values: dict[str, Any] = {
                "usable_epc_mib": defaults.usable_epc_mib, "speed": 1.0,
                "network_mib_per_s": defaults.network_mib_per_s}
            for key in _OPTIONAL:
                if key in table:
                    value = table[key]
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        problems.append(f"class {label}: {key} must be a number, got {value!r}")
                        continue
                    values[key] = float(value)
            classes.append(MachineClass(name=str(table["name"]), count=table["count"],
                                        **values))
        pool = cls(tuple(classes))
        problems.extend(pool.validate())
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(dict.fromkeys(problems)))
        return pool


# -- per-class cost tables -------------------------------------------------------------------
@dataclass(frozen=True)
class ClassCosts:
    """Every segment ``[i, j)`` as a stage on one class of machines (matrices ``[i, j]``).

    ``period_ms`` is what one machine of the class spends per request on the stage: the
    busiest of its CPU, its incoming link and its outgoing link (see NOTE_REPLICA_PERIOD in
    :mod:`smlaas.plan.replicas`); ``latency_ms`` is the stage's enclave time plus its input
    transfer. Both are ``inf`` where the segment may not be a stage on this class (not both
    ends valid cuts, or above the class's EPC under ``--fit-epc``).
    """

    name: str | None
    """``None`` for the cost model's own machine (a plan without a machines file)."""
    count: int
    period_ms: np.ndarray
    latency_ms: np.ndarray


def _allowed(costs: SegmentCosts, usable_epc_bytes: float, *, fit_epc: bool) -> np.ndarray:
    n = costs.node_count
    allowed = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    allowed &= costs.valid_cut[:, None] & costs.valid_cut[None, :]
    if fit_epc:
        allowed &= costs.working_set_bytes <= usable_epc_bytes
    return allowed


def _class_costs(name: str | None, count: int, enclave_ms: np.ndarray, transfer_ms: np.ndarray,
                 allowed: np.ndarray) -> ClassCosts:
    period = np.maximum(np.maximum(enclave_ms, transfer_ms[:, None]), transfer_ms[None, :])
    latency = enclave_ms + transfer_ms[:, None]
    return ClassCosts(name=name, count=count, period_ms=np.where(allowed, period, np.inf),
                      latency_ms=np.where(allowed, latency, np.inf))


def reference_class_costs(costs: SegmentCosts, count: int, *, fit_epc: bool) -> ClassCosts:
    """``count`` machines of the kind the cost model describes, priced exactly as the
    homogeneous planners price them."""
    allowed = _allowed(costs, costs.cost_model.usable_epc_bytes, fit_epc=fit_epc)
    return _class_costs(None, count, costs.enclave_ms, np.asarray(costs.transfer_ms, float),
                        allowed)


def machine_class_costs(costs: SegmentCosts, machine_class: MachineClass, *,
                        fit_epc: bool) -> ClassCosts:
    """The cost table recomputed for ``machine_class`` (NOTE_MACHINE_CLASS)."""
    base = costs.cost_model
    upper = np.triu(np.ones_like(costs.native_ms, dtype=bool), 1)
    enclave = np.where(upper, machine_class.enclave_time_ms(base, costs.native_ms,
                                                            costs.working_set_bytes), 0.0)
    transfer = np.asarray(machine_class.transfer_ms(base, costs.memory.cut_bytes), dtype=float)
    allowed = _allowed(costs, machine_class.usable_epc_bytes, fit_epc=fit_epc)
    return _class_costs(machine_class.name, machine_class.count, enclave, transfer, allowed)


def gateway_floor_ms(costs: SegmentCosts) -> float:
    """The gateway's links, which no replica shares: the request in, the result out."""
    return max(float(costs.transfer_ms[0]), costs.output_transfer_ms)
