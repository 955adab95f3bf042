"""``smlaas bench``: evidence anyone can rerun."""

from __future__ import annotations

import json
from pathlib import Path

import click

from smlaas.cli.console import console, progress_bar, table


@click.group("bench")
def bench() -> None:
    """Benchmarks and the conformance suite."""


@bench.command()
@click.option("--pattern", help="Only tests whose name matches this regular expression.")
@click.option("--cut-mode", type=click.Choice(["every", "middle", "planner"]), default="every",
              show_default=True, help="every: a stage per node; middle: two stages; planner: "
              "the partition job's cuts (profiles every test model: slow).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def conformance(pattern: str | None, cut_mode: str, out: str | None) -> int:
    """ONNX's backend test suite: plain ONNX Runtime against the partitioned chain."""
    import onnxruntime as ort
    import onnxruntime.backend as ort_backend

    from smlaas.conformance.backend import chain_backend
    from smlaas.conformance.report import KNOWN_LIMITS, explain
    from smlaas.conformance.suite import CATEGORIES, compare, list_tests

    ort.set_default_logger_severity(3)
    names = list_tests(pattern)
    console.print(f"{len(names)} tests of the suite shipped with onnx ({', '.join(CATEGORIES)};"
                  f" the Real models need downloads), chain cut mode '{cut_mode}'")
    with progress_bar() as progress:
        result = compare(ort_backend, chain_backend(cut_mode), names, progress=progress)
    grouped, unexplained = explain(result)
    console.print(f"plain onnxruntime passed {result.reference_passed} of {result.tests}; "
                  f"the partitioned chain passed {result.chain_passed} of {result.tests}")
    limits = {k.key: k.explanation for k in KNOWN_LIMITS}
    if grouped:
        console.print(table("passed by onnxruntime, not by the chain: known limits",
                            ["limit", "tests", "why"],
                            [[key, f"{len(tests)}: " + ", ".join(tests[:4]) +
                              (", ..." if len(tests) > 4 else ""), limits[key]]
                             for key, tests in grouped.items()]))
    if unexplained:
        console.print(table("passed by onnxruntime, not by the chain: NOT explained",
                            ["test", "reason"],
                            [[n, o.message] for n, o in unexplained.items()]))
    if out:
        data = result.to_dict()
        data.update(cut_mode=cut_mode, pattern=pattern, known_limits=grouped,
                    unexplained=list(unexplained))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2))
        console.print(f"wrote {out}")
    return 1 if unexplained else 0


@bench.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def security(out: str | None) -> int:
    """What the security machinery costs: framing, TLS, sealing, quotes."""
    from smlaas.bench.security import security_costs
    from smlaas.enclave.backends.sim import default_pki_dir

    costs = security_costs(default_pki_dir())
    transfer, sealing, attestation = (costs["transfer_ms_per_mib"], costs["sealing"],
                                      costs["attestation"])
    console.print(table("security costs on this machine", ["what", "measured"], [
        ["tensor framing (encode + decode)", f"{costs['framing_ms_per_mib']:.2f} ms/MiB"],
        ["activation transfer, plain TCP (2 processes)",
         f"{transfer['plain_tcp']:.2f} ms/MiB"],
        ["activation transfer, mutual TLS 1.3", f"{transfer['mtls']:.2f} ms/MiB"],
        ["TLS cost (difference)", f"{transfer['tls_cost']:.2f} ms/MiB"],
        ["  limit: AES-256-GCM encrypt + decrypt, one core each",
         f"{costs['limits']['aes_gcm_encrypt_ms_per_mib']:.2f} + "
         f"{costs['limits']['aes_gcm_decrypt_ms_per_mib']:.2f} ms/MiB"],
        ["  limit: one memory copy (preallocated)",
         f"{costs['limits']['memcpy_ms_per_mib']:.2f} ms/MiB"],
        ["sealing (AES-256-GCM + header)", f"{sealing['seal_mib_per_s']:.0f} MiB/s"],
        ["unsealing", f"{sealing['unseal_mib_per_s']:.0f} MiB/s"],
        ["quote generation (sim)", f"{attestation['quote_generation_ms']:.2f} ms"],
        ["quote verification (dcap-qvl, sim root)",
         f"{attestation['quote_verification_ms']:.2f} ms"],
        ["role certificate issuance", f"{attestation['role_certificate_issue_ms']:.2f} ms"],
        ["stage key release (HPKE seal + open)",
         f"{attestation['stage_key_release_ms']:.2f} ms"],
        ["owner release: signing", f"{attestation['release_sign_ms']:.2f} ms"],
        ["client release check (stapled release only)",
         f"{attestation['release_check_ms']:.2f} ms"],
        ["client release check, asking the coordinator first (RA-TLS, loopback)",
         f"{attestation['release_check_asking_coordinator_ms']:.2f} ms"]]))
    _write(out, costs)
    return 0


@bench.command()
@click.option("--model", "-m", default="resnet50", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="ONNX Runtime threads, for plain ORT and for the stage alike (not with "
                   "--compare-threads, which sets its own).")
@click.option("--runs", type=click.IntRange(min=6), default=60, show_default=True,
              help="Requests per path.")
@click.option("--compare-threads", is_flag=True,
              help="Instead: the demo's plan (3 stages, batching as sealed) deployed with the "
                   "default threads per stage and with --threads 1 and 2, each under 4 gRPC "
                   "clients; is the default within 10% of the best throughput?")
@click.option("--seconds", type=click.FloatRange(min=1.0), default=10.0, show_default=True,
              help="--compare-threads: measured seconds per setting and round (after a "
                   "2 s warm-up).")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="--compare-threads: alternating rounds over the settings.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def gateway(model: str, threads: int, runs: int, compare_threads: bool, seconds: float,
            rounds: int, out: str | None) -> int:
    """What the gateway adds per request (REST binary, REST JSON, gRPC) over plain ORT, and
    its server-side cost; or (--compare-threads) default threads against the best."""
    from smlaas.bench.gateway import run_gateway_benchmark, run_threads_comparison

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    if compare_threads:
        results = run_threads_comparison(model=model, seconds=seconds, rounds=rounds, say=say)
    else:
        results = run_gateway_benchmark(model=model, threads=threads, runs=runs, say=say)
    _write(out, results)
    return 0


@bench.command()
@click.option("--models", "-m", multiple=True, help="Zoo models (default: all).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def planners(models: tuple[str, ...], threads: int, runs: int, out: str | None) -> int:
    """Every planner on every zoo model under sgx1 and sgx2 (PREDICTED figures)."""
    from smlaas.bench.planners import markdown, planners_benchmark, replicas_markdown
    from smlaas.profile import ProfileCache, ProfileSettings

    settings = ProfileSettings(threads=threads, warmup_runs=3, measured_runs=runs)
    with progress_bar() as progress:
        rows = planners_benchmark(models, settings, cache=ProfileCache(), progress=progress)
    console.print("PREDICTED by the cost model (no enclave ran):")
    console.print(markdown(rows), markup=False, highlight=False)
    console.print(replicas_markdown(rows), markup=False, highlight=False)
    _write(out, rows)
    return 0


@bench.command("working-set")
@click.option("--models", "-m", multiple=True,
              help="Only these models (zoo or exporter names; default: all).")
@click.option("--no-exporters", is_flag=True,
              help="Only the zoo (the exporters' models need .[exporters] and PyPI).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measured runs per profiled node (only the cuts depend on them).")
@click.option("--work-dir", type=click.Path(file_okay=False),
              help="Where downloaded wheels and converted models are kept (default: a "
                   "temporary directory).")
@click.option("--out", type=click.Path(dir_okay=False),
              default="docs/results/working_set.json", show_default=True,
              help="JSON results; the plot (.png) and the table (.md) go beside it.")
def working_set(models: tuple[str, ...], no_exporters: bool, threads: int, runs: int,
                work_dir: str | None, out: str) -> int:
    """Predicted against measured working set of every stage of the zoo's and the real
    exporters' models (dp-throughput --machines 3, sgx1): median and worst error, stages
    measured above the EPC while predicted to fit, and what fitted constants would give."""
    from smlaas.bench.working_set import (
        markdown,
        model_markdown,
        render_plot,
        working_set_benchmark,
    )
    from smlaas.profile import ProfileCache, ProfileSettings

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    settings = ProfileSettings(threads=threads, warmup_runs=2, measured_runs=runs)
    result = working_set_benchmark(models, settings=settings, exporters=not no_exporters,
                                   work_dir=Path(work_dir) if work_dir else None,
                                   cache=ProfileCache(), say=say)
    text = markdown(result)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    path = Path(out)
    _write(out, result)
    path.with_suffix(".md").write_text(model_markdown(result) + "\n\n" + text + "\n")
    render_plot(result, path.with_suffix(".png"))
    console.print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")
    return 0


@bench.command("receipts")
@click.option("--model", "-m", default="resnet50", show_default=True)
@click.option("--clients", type=click.IntRange(min=1), default=4, show_default=True,
              help="Concurrent clients for the throughput blocks.")
@click.option("--requests", "latency_requests", type=click.IntRange(min=2), default=400,
              show_default=True, help="Latency: sequential requests per mode (off, on).")
@click.option("--blocks", "latency_blocks", type=click.IntRange(min=1), default=40,
              show_default=True, help="Latency: alternating blocks the requests go in.")
@click.option("--seconds", type=click.FloatRange(min=1.0), default=4.0, show_default=True,
              help="Throughput: measured seconds per block (after 1 s of warm-up).")
@click.option("--rounds", type=click.IntRange(min=1), default=8, show_default=True,
              help="Throughput: blocks per mode, the order alternating.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def receipts(model: str, clients: int, latency_requests: int, latency_blocks: int,
             seconds: float, rounds: int, out: str | None) -> int:
    """Latency and throughput with receipts off and on, side by side in one run (the demo's
    plan: 3 stages, batching as sealed); a sample of the receipts verified afterwards."""
    from smlaas.bench.receipts import ReceiptBenchOptions, run_receipts_benchmark

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    options = ReceiptBenchOptions(model=model, clients=clients,
                                  latency_requests=latency_requests,
                                  latency_blocks=latency_blocks, seconds=seconds, rounds=rounds)
    problems = options.validate()
    if problems:
        raise click.UsageError("; ".join(problems))
    _write(out, run_receipts_benchmark(options, say=say))
    return 0


@bench.command("generation")
@click.option("--model", "-m", default="gpt2_small4_kv", show_default=True,
              help="A decoder with a KV cache (zoo name or file).")
@click.option("--stages", type=click.IntRange(min=1), default=2, show_default=True,
              help="Stages, each pinned to its own core.")
@click.option("--streams", type=click.IntRange(min=1), default=8, show_default=True,
              help="Concurrent streams (and the plan's --max-sequences).")
@click.option("--prompt", "prompt_tokens", type=click.IntRange(min=1), default=32,
              show_default=True, help="Prompt tokens.")
@click.option("--tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="New tokens per stream.")
@click.option("--max-inflight", type=click.IntRange(min=1), default=None,
              help="Steps in the pipeline at once [default: one per stage].")
@click.option("--pin/--no-pin", default=True, show_default=True,
              help="Pin each stage to its own core (the only mode: kept for the record).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
def generation(model: str, stages: int, streams: int, prompt_tokens: int, tokens: int,
               max_inflight: int | None, pin: bool, out: str | None) -> int:
    """Generation through pinned stages against plain ONNX Runtime decoding of the whole
    model with its KV cache, side by side in one run: time to first token, tokens/s at 1 and
    at --streams streams (over REST server-sent events, then gRPC streaming), per core, and
    what the hops cost per token."""
    from smlaas.bench.generation import markdown, run_generation_benchmark

    if not pin:
        raise click.UsageError("the generation benchmark always pins its stages (--pin)")

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    results = run_generation_benchmark(model=model, stages=stages, streams=streams,
                                       prompt=prompt_tokens, tokens=tokens,
                                       max_inflight=max_inflight, say=say)
    console.print(markdown(results), markup=False, highlight=False, soft_wrap=True)
    _write(out, results)
    return 0


def _write(out: str | None, data: object) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2))
        console.print(f"wrote {out}")


_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


@bench.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serving(args: tuple[str, ...]) -> int:
    """Deployed pipeline vs plain ONNX Runtime (options: --help)."""
    from smlaas.bench.serving import main

    main(list(args), say=click.echo)
    return 0


@bench.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def accuracy(args: tuple[str, ...]) -> int:
    """Predicted vs measured native stage times over the zoo (options: --help)."""
    from smlaas.bench.accuracy import main

    main(list(args), say=click.echo)
    return 0


@bench.command(context_settings=_PASS_THROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def exporters(args: tuple[str, ...]) -> int:
    """Real exporters' models (wheels, skl2onnx, quantisers, fp16): partitioned and verified
    under two planners, with prediction errors (options: --help)."""
    from smlaas.bench.exporters import main

    main(list(args), say=click.echo)
    return 0
