"""``smlaas calibrate``: measure this machine and write a cost-model TOML file."""

from __future__ import annotations

import datetime
from pathlib import Path

import click
import tomli_w

from smlaas.cli.console import console, print_json, progress_bar, table
from smlaas.errors import ConfigError
from smlaas.memory_calibration import CALIBRATION_MODELS, MemoryCalibration, calibrate_memory
from smlaas.partition import default_threads
from smlaas.plan import PRESETS, preset, to_toml_text
from smlaas.profile import ProfileCache, ProfileSettings
from smlaas.profile.cache import machine_id
from smlaas.profile.calibrate import calibrate as measure


@click.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="cost_model.toml",
              show_default=True, help="TOML file to write.")
@click.option("--preset", "base", type=click.Choice(sorted(PRESETS)), default="sgx1",
              show_default=True, help="Preset the measured values are laid over.")
@click.option("--network", type=click.Choice(["preset", "loopback"]), default="preset",
              show_default=True,
              help="Keep the preset's network, or use the measured loopback (for stages "
                   "deployed on this one machine).")
@click.option("--threads", type=click.IntRange(min=1), default=default_threads(),
              show_default=True)
@click.option("--memory-model", "memory_models", multiple=True, metavar="MODEL",
              help="A zoo model or ONNX file whose stages' working sets are measured to fit "
                   "weight_factor and runtime_overhead_mib (repeatable; default: "
                   f"{', '.join(CALIBRATION_MODELS)}).")
@click.option("--no-memory", is_flag=True,
              help="Keep the preset's weight_factor and runtime_overhead_mib (skips the "
                   "working-set measurements, which take a minute or two).")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def calibrate(output: str, base: str, network: str, threads: int,
              memory_models: tuple[str, ...], no_memory: bool, as_json: bool) -> int:
    """Measure CPU clock, AES-GCM and loopback rates, native speed and the working-set
    constants; write OUTPUT.

    weight_factor and runtime_overhead_mib are fitted (least squares) to the working sets of
    the stages of a few models (--memory-model), each measured natively. Enclave-only
    parameters (EPC size, paging and transition costs, the LibOS's pages) cannot be measured
    without SGX hardware and keep the preset's cited values.
    """
    result = measure(threads=threads)
    model = preset(base)
    memory: MemoryCalibration | None = None
    if not no_memory:
        with progress_bar(enabled=not as_json) as progress:
            memory = calibrate_memory(
                memory_models or CALIBRATION_MODELS, base=model, progress=progress,
                settings=ProfileSettings(threads=threads, warmup_runs=2, measured_runs=3),
                cache=ProfileCache(),
                say=None if as_json else lambda line: console.print(line, soft_wrap=True))
    overrides: dict[str, float] = {}
    if result.cpu_ghz:
        overrides["cpu_ghz"] = round(result.cpu_ghz, 3)
    if model.aead_mib_per_s > 0:
        overrides["aead_mib_per_s"] = round(result.aead_mib_per_s, 1)
    if network == "loopback":
        overrides["network_mib_per_s"] = round(result.loopback_mib_per_s, 1)
        overrides["hop_latency_ms"] = round(result.loopback_hop_latency_ms, 4)
    comments: dict[str, str] = {}
    if memory is not None:
        overrides["weight_factor"] = round(memory.fit.weight_factor, 4)
        overrides["runtime_overhead_mib"] = round(memory.fit.runtime_overhead_mib, 3)
        comments = _memory_comments(memory)
    model = model.with_overrides(overrides)
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    measured_tables: dict[str, object] = {k: v for k, v in result.to_dict().items()
                                          if v is not None}
    if memory is not None:
        measured_tables["working_set"] = memory.to_dict()
    text = to_toml_text(model, comments={
        "written by": f"smlaas calibrate on {when}",
        "machine": machine_id(),
        "measured here": ", ".join(sorted(overrides)) or "nothing the preset uses",
        **comments,
    }) + "\n" + tomli_w.dumps({"measured": measured_tables})
    path = Path(output)
    try:
        path.write_text(text)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err}") from err
    if as_json:
        print_json({"output": str(path), "measured": result.to_dict(), "overrides": overrides,
                    "working_set": memory.to_dict() if memory is not None else None})
    else:
        console.print(table("measured on this machine", ["quantity", "value"], [
            ["CPU clock", f"{result.cpu_ghz:.2f} GHz" if result.cpu_ghz else "unknown"],
            ["AES-256-GCM (1 core)", f"{result.aead_mib_per_s:.0f} MiB/s"],
            ["loopback TCP", f"{result.loopback_mib_per_s:.0f} MiB/s"],
            ["loopback one-way latency", f"{result.loopback_hop_latency_ms * 1000:.0f} us"],
            [f"MatMul 1024 ({threads} threads)", f"{result.matmul_gflop_per_s:.1f} GFLOP/s"],
            *_memory_rows(memory),
        ]))
        console.print(f"wrote {path} (preset {base}; use it with --cost-model {path})")
    return 0


def _memory_comments(memory: MemoryCalibration) -> dict[str, str]:
    """The TOML's header lines for the fitted constants: [CALIBRATED], not [ASSUMED]."""
    source = (f"[CALIBRATED] least squares over {len(memory.samples)} stages' working sets "
              f"measured natively here ({', '.join(memory.models)}; {memory.method}, "
              f"{memory.threads} thread(s))")
    return {
        "weight_factor": f"{memory.fit.weight_factor:.4f} {source}; the preset's "
                         f"{memory.assumed.weight_factor:g} was [ASSUMED]",
        "runtime_overhead_mib": f"{memory.fit.runtime_overhead_mib:.3f} {source}; the "
                                f"preset's was {memory.assumed.runtime_overhead_mib:g}",
        "libos_overhead_mib": f"{memory.assumed.libos_overhead_mib:g} [ASSUMED], the "
                              f"preset's: the LibOS's (Gramine's) own pages inside an "
                              f"enclave, which no native measurement sees",
        "working set error": f"median |predicted - measured| / measured "
                             f"{100 * memory.median_error_assumed:.1f}% with the preset's "
                             f"constants, {100 * memory.median_error_calibrated:.1f}% with "
                             f"these (in sample)",
    }


def _memory_rows(memory: MemoryCalibration | None) -> list[list[str]]:
    if memory is None:
        return [["weight_factor, runtime_overhead_mib", "preset's [ASSUMED] (--no-memory)"]]
    return [
        ["weight_factor [CALIBRATED]", f"{memory.fit.weight_factor:.4f} (was "
                                       f"{memory.assumed.weight_factor:g} [ASSUMED])"],
        ["runtime_overhead_mib [CALIBRATED]",
         f"{memory.fit.runtime_overhead_mib:.3f} (was "
         f"{memory.assumed.runtime_overhead_mib:g})"],
        ["libos_overhead_mib [ASSUMED]",
         f"{memory.assumed.libos_overhead_mib:g} (kept: only SGX hardware can measure it)"],
        [f"working-set error over {len(memory.samples)} stages",
         f"{100 * memory.median_error_assumed:.1f}% assumed -> "
         f"{100 * memory.median_error_calibrated:.1f}% calibrated (median)"],
    ]
