"""``smlaas calibrate``: measure this machine and write a cost-model TOML file."""

from __future__ import annotations

import datetime
from pathlib import Path

import click
import tomli_w

from smlaas.cli.console import console, print_json, table
from smlaas.errors import ConfigError
from smlaas.partition import default_threads
from smlaas.plan import PRESETS, preset, to_toml_text
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
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def calibrate(output: str, base: str, network: str, threads: int, as_json: bool) -> int:
    """Measure CPU clock, AES-GCM and loopback rates and native speed; write OUTPUT.

    Enclave-only parameters (EPC size, paging and transition costs) cannot be measured
    without SGX hardware and keep the preset's cited values.
    """
    result = measure(threads=threads)
    model = preset(base)
    overrides: dict[str, float] = {}
    if result.cpu_ghz:
        overrides["cpu_ghz"] = round(result.cpu_ghz, 3)
    if model.aead_mib_per_s > 0:
        overrides["aead_mib_per_s"] = round(result.aead_mib_per_s, 1)
    if network == "loopback":
        overrides["network_mib_per_s"] = round(result.loopback_mib_per_s, 1)
        overrides["hop_latency_ms"] = round(result.loopback_hop_latency_ms, 4)
    model = model.with_overrides(overrides)
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    text = to_toml_text(model, comments={
        "written by": f"smlaas calibrate on {when}",
        "machine": machine_id(),
        "measured here": ", ".join(sorted(overrides)) or "nothing the preset uses",
    }) + "\n" + tomli_w.dumps({"measured": {k: v for k, v in result.to_dict().items()
                                            if v is not None}})
    path = Path(output)
    try:
        path.write_text(text)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err}") from err
    if as_json:
        print_json({"output": str(path), "measured": result.to_dict(), "overrides": overrides})
    else:
        console.print(table("measured on this machine", ["quantity", "value"], [
            ["CPU clock", f"{result.cpu_ghz:.2f} GHz" if result.cpu_ghz else "unknown"],
            ["AES-256-GCM (1 core)", f"{result.aead_mib_per_s:.0f} MiB/s"],
            ["loopback TCP", f"{result.loopback_mib_per_s:.0f} MiB/s"],
            ["loopback one-way latency", f"{result.loopback_hop_latency_ms * 1000:.0f} us"],
            [f"MatMul 1024 ({threads} threads)", f"{result.matmul_gflop_per_s:.1f} GFLOP/s"],
        ]))
        console.print(f"wrote {path} (preset {base}; use it with --cost-model {path})")
    return 0
