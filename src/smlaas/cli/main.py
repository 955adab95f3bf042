"""Entry point: ``main(argv) -> int`` maps smlaas errors to exit codes.

Exit codes: 0 success; 1 a check said no (verification mismatch) or a runtime failure;
2 bad input (usage, model, input size, zoo name, build dir, infeasible constraints, a construct
unsupported by design, a request the inference service refused as malformed).
"""

from __future__ import annotations

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smlaas")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """smlaas: partition ONNX models into SGX-enclave-sized stages and serve them securely."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _register_commands() -> None:
    from smlaas.cli import (
        attest_cmds,
        bench_cmds,
        calibrate_cmd,
        coordinator_cmd,
        demo_cmd,
        deploy_cmd,
        gramine_cmd,
        infer_cmd,
        measure_cmd,
        owner_cmds,
        partition_cmds,
        seal_cmd,
        serve_cmds,
        zoo_cmds,
    )

    cli.add_command(zoo_cmds.zoo_group)
    cli.add_command(partition_cmds.partition)
    cli.add_command(partition_cmds.verify)
    cli.add_command(partition_cmds.plan)
    cli.add_command(calibrate_cmd.calibrate)
    cli.add_command(demo_cmd.demo)
    cli.add_command(attest_cmds.attest)
    cli.add_command(owner_cmds.owner)
    cli.add_command(seal_cmd.seal)
    cli.add_command(measure_cmd.measure)
    cli.add_command(coordinator_cmd.coordinator)
    cli.add_command(gramine_cmd.gramine)
    cli.add_command(serve_cmds.worker)
    cli.add_command(serve_cmds.gateway)
    cli.add_command(deploy_cmd.deploy)
    cli.add_command(infer_cmd.infer)
    cli.add_command(bench_cmds.bench)


_register_commands()


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
