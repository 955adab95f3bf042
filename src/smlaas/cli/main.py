"""Entry point: ``main(argv) -> int`` maps smlaas errors to exit codes.

Exit codes: 0 success; 1 a check said no (verification mismatch) or a runtime failure;
2 bad input (usage, model, input size, zoo name, build dir, infeasible constraints, a construct
unsupported by design, a request the inference service refused as malformed).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

import click
from rich.markup import escape

from smlaas import __version__
from smlaas.cli.console import errors
from smlaas.errors import CheckFailed, InputError, PlanError, ServingError, SmlaasError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
# Answers of the inference service that say the request itself is unusable (bad tensor name,
# shape, dtype, size, body; unknown model), as opposed to the service failing.
_BAD_REQUEST_STATUSES = frozenset({400, 404, 413, 415, 422})


# Subcommand -> "module:attribute". A command's module is imported only when that command
# runs (or help lists it): `smlaas owner ...`, the owner plane, then never imports the
# launchers (operator plane), and every command starts faster.
COMMANDS = {
    "zoo": "zoo_cmds:zoo_group", "partition": "partition_cmds:partition",
    "verify": "partition_cmds:verify", "plan": "partition_cmds:plan",
    "calibrate": "calibrate_cmd:calibrate", "demo": "demo_cmd:demo",
    "attest": "attest_cmds:attest", "owner": "owner_cmds:owner", "seal": "seal_cmd:seal",
    "measure": "measure_cmd:measure", "coordinator": "coordinator_cmd:coordinator",
    "gramine": "gramine_cmd:gramine", "worker": "serve_cmds:worker",
    "gateway": "serve_cmds:gateway", "deploy": "deploy_cmd:deploy",
    "operator": "operator_cmd:operator", "infer": "infer_cmd:infer",
    "generate": "generate_cmd:generate",
    "bench": "bench_cmds:bench", "receipt": "receipt_cmd:receipt",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        command = getattr(importlib.import_module(f"smlaas.cli.{module}"), attribute)
        assert isinstance(command, click.Command)  # every COMMANDS entry names one
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smlaas")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """smlaas: partition ONNX models into SGX-enclave-sized stages and serve them securely."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI on ``argv`` and returns the exit code (never exits the process)."""
    try:
        result = cli.main(args=list(argv) if argv is not None else None,
                          prog_name="smlaas", standalone_mode=False)
    except click.exceptions.Abort:
        errors.print("aborted")
        return 130
    except click.UsageError as err:
        command = err.ctx.command_path if err.ctx else "smlaas"
        _error(f"{err.format_message()} (see `{command} --help`)")
        return EXIT_BAD_INPUT
    except click.ClickException as err:
        _error(err.format_message())
        return err.exit_code
    except click.exceptions.Exit as err:
        return int(err.exit_code)
    except (InputError, PlanError) as err:
        _error(err)
        return EXIT_BAD_INPUT
    except CheckFailed as err:
        _error(err)
        return EXIT_FAILED
    except ServingError as err:
        _error(err)
        return EXIT_BAD_INPUT if err.status in _BAD_REQUEST_STATUSES else EXIT_FAILED
    except SmlaasError as err:
        _error(err)
        return EXIT_FAILED
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130
    return result if isinstance(result, int) else EXIT_OK


def _error(err: BaseException | str) -> None:
    errors.print("[bold red]error:[/] " + escape(str(err)), soft_wrap=True)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
