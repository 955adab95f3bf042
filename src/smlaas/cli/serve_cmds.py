"""``smlaas worker`` and ``smlaas gateway``: the pipeline's processes (``smlaas deploy``
starts them; run by hand for a custom placement).

Each builds its role's spec (:mod:`smlaas.roles`) from its options: the measured ones
(role, coordinator MRENCLAVE) are arguments only; the host's (addresses, threads, ...) may also
come from ``SMLAAS_*`` environment variables, which is how Gramine passes them into an
enclave whose arguments are fixed by its measured manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import MISSING
from typing import Any

import click

from smlaas.enclave.backends import BACKENDS
from smlaas.roles import GatewaySpec, HostOption, RoleSpec, StageSpec, host_envvar


def host_option(flag: str, *names: str, **kwargs: Any) -> Callable[[Any], Any]:
    """A host-chosen option, also read from its ``SMLAAS_*`` variable."""
    return click.option(flag, *names, envvar=host_envvar(flag), show_envvar=True, **kwargs)


_backend = click.option("--backend", type=click.Choice(BACKENDS), default="sim",
                        show_default=True,
                        help="Enclave backend (sim: SIMULATED, INSECURE; for development).")
_coordinator_mr = click.option(
    "--coordinator-mrenclave", required=True, metavar="HEX",
    help="The coordinator measurement to trust (measured: part of this role's identity).")
_TYPES = {"int": int, "float": float, "port": int}


def host_options(spec_class: type[RoleSpec]) -> Callable[[Any], Any]:
    """The click options of ``spec_class``'s host options, generated from its table
    (flags, types, ranges, defaults, help, ``SMLAAS_*`` variables: :class:`HostOption`)."""
    def decorate(command: Any) -> Any:
        for option in reversed(spec_class.HOST_OPTIONS):
            command = host_option(option.flag, **_click_settings(option, spec_class))(command)
        return command

    return decorate


def _int(bound: float | None) -> int | None:
    return None if bound is None else int(bound)


def _click_settings(option: HostOption, spec_class: type[RoleSpec]) -> dict[str, Any]:
    default = option.default_of(spec_class)
    kind = _TYPES.get(option.kind)
    if kind is not None and (option.minimum is not None or option.maximum is not None):
        bounded: Any = click.IntRange(_int(option.minimum), _int(option.maximum)) \
            if kind is int else click.FloatRange(option.minimum, option.maximum)
    elif option.kind == "path":
        bounded = click.Path()
    else:
        bounded = kind or str
    settings: dict[str, Any] = {"type": bounded, "help": option.help or None,
                                "metavar": option.metavar}
    if default is MISSING:
        settings["required"] = True
    elif default not in ("", ()):
        settings.update(default=default, show_default=True)
    return settings


def _spec_values(spec_class: type[RoleSpec], options: dict[str, Any]) -> dict[str, Any]:
    """The spec fields from a command's parsed host options (keyed by click's names)."""
    return spec_class.host_fields({
        option.flag: options.pop(option.flag.lstrip("-").replace("-", "_"))
        for option in spec_class.HOST_OPTIONS})


def _log_to_stderr() -> None:
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)


@click.command()
@click.option("--role", required=True, metavar="stage-K", help="The stage this worker runs.")
@_backend
@_coordinator_mr
@host_options(StageSpec)
def worker(role: str, backend: str, coordinator_mrenclave: str, **options: Any) -> int:
    """Run one stage: register, unseal the stage, serve it over mutual TLS."""
    from smlaas.coordinator.manifest import stage_index
    from smlaas.serving.worker_process import run_worker

    _log_to_stderr()
    run_worker(StageSpec(index=stage_index(role), backend=backend,
                         coordinator_mrenclave=coordinator_mrenclave,
                         **_spec_values(StageSpec, options)))
    return 0


@click.command()
@_backend
@_coordinator_mr
@host_options(GatewaySpec)
def gateway(backend: str, coordinator_mrenclave: str, **options: Any) -> int:
    """Serve the Open Inference Protocol over HTTPS in front of the stages."""
    from smlaas.serving.gateway_process import run_gateway

    _log_to_stderr()
    run_gateway(GatewaySpec(backend=backend, coordinator_mrenclave=coordinator_mrenclave,
                            **_spec_values(GatewaySpec, options)))
    return 0
