"""One table per role's host options: the command line a spec writes is parsed back by the
command generated from the same table into the same spec, and every option has a variable."""

from __future__ import annotations

import click
import pytest

from smlaas.cli.serve_cmds import _spec_values, gateway, worker
from smlaas.roles import GatewaySpec, RoleSpec, StageSpec, host_envvar

COMMON = {"backend": "sim", "coordinator_mrenclave": "ab" * 32,
          "coordinator": ("127.0.0.1", 7443)}
SPECS = [
    StageSpec(index=1, listen=("127.0.0.1", 9001), sealed_dir="/sealed", **COMMON),
    StageSpec(index=0, listen=("10.0.0.2", 9000), sealed_dir="/s", replica=2, threads=3,
              queue_size=7, next_stages=(("a", 1), ("b", 2)), **COMMON),
    GatewaySpec(first_stages=(("127.0.0.1", 9000),), listen=("127.0.0.1", 8443),
                model_name="m", **COMMON),
    GatewaySpec(first_stages=(("x", 1), ("y", 2)), listen=("0.0.0.0", 443), model_name="bert",
                max_batch_size=8, max_queue_delay_us=0, max_inflight=2, request_timeout_s=2.5,
                max_queue=9, header_timeout_s=1.5, body_timeout_s=4.0, grpc_port=8001,
                labels_path="/labels.txt", **COMMON),
]


def _parsed(spec: RoleSpec) -> RoleSpec:
    """The spec the generated command builds from ``spec.to_argv()`` (not run)."""
    command: click.Command = worker if isinstance(spec, StageSpec) else gateway
    context = command.make_context(command.name, list(spec.to_argv()[1:]))
    options = {k: v for k, v in context.params.items()
               if k not in ("role", "backend", "coordinator_mrenclave")}
    fields = _spec_values(type(spec), options)
    if isinstance(spec, StageSpec):
        from smlaas.coordinator.manifest import stage_index

        return StageSpec(index=stage_index(context.params["role"]), backend="sim",
                         coordinator_mrenclave=context.params["coordinator_mrenclave"], **fields)
    return GatewaySpec(backend="sim", coordinator_mrenclave=context.params[
        "coordinator_mrenclave"], **fields)


@pytest.mark.parametrize("spec", SPECS)
def test_a_spec_survives_its_own_command_line(spec: RoleSpec) -> None:
    assert _parsed(spec) == spec


@pytest.mark.parametrize("spec_class", [StageSpec, GatewaySpec])
def test_every_host_option_has_its_variable_and_defaults_live_in_the_spec(
        spec_class: type[RoleSpec]) -> None:
    command = worker if spec_class is StageSpec else gateway
    by_flag = {opt.opts[0]: opt for opt in command.params if isinstance(opt, click.Option)}
    for option in spec_class.HOST_OPTIONS:
        generated = by_flag[option.flag]
        assert generated.envvar == host_envvar(option.flag)
        default = option.default_of(spec_class)
        if default not in ("", ()) and not generated.required:
            assert generated.default == default, option.flag
