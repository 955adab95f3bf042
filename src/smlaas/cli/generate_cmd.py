"""``smlaas generate``: generate text with a deployed decoder, tokens streamed as they arrive."""

from __future__ import annotations

import json

import click

from smlaas.cli.client_options import GatewayOptions, gateway_options
from smlaas.cli.console import errors


def parse_ids(text: str) -> list[int]:
    """``1,2,3`` as token ids (UsageError otherwise)."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.UsageError(f"--input-ids takes comma-separated integers, got "
                               f"{text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise click.UsageError(f"--input-ids takes token ids >= 0, got {text!r}")
    return ids


@click.command()
@click.argument("prompt", required=False)
@gateway_options(timeout_help="Seconds to wait for each answer or token.")
@click.option("--input-ids", help="Token ids to start from instead of PROMPT, e.g. 1,2,3.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens to generate at most.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0,
              show_default=True, help="0 picks the most likely token (greedy).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0,
              show_default=True, help="Sample within this probability mass.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed the sampler (reproducible).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (text, ids, finish reason, usage) at the end.")
def generate(prompt: str | None, gateway: GatewayOptions, input_ids: str | None,
             max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
             as_json: bool) -> int:
    """Generate text after PROMPT (or --input-ids), printing tokens as they arrive (after
    attesting the gateway)."""
    if (prompt is None) == (input_ids is None):
        raise click.UsageError("give a PROMPT or --input-ids (one of them)")
    start: str | list[int] = parse_ids(input_ids) if input_ids is not None else prompt or ""
    with gateway.client(sending="prompt") as client:
        if as_json:
            result = client.generate(start, max_tokens=max_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed)
            click.echo(json.dumps({"text": result.text, "output_ids": result.output_ids,
                                   "finish_reason": result.finish_reason,
                                   "usage": {"prompt_tokens": result.prompt_tokens,
                                             "completion_tokens": result.completion_tokens}}))
            return 0
        last = None
        for piece in client.generate(start, max_tokens=max_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed, stream=True):
            click.echo(piece.text, nl=False)  # flushes: each token shows as it comes
            last = piece
        click.echo()
        if client.verdict is not None:
            errors.print(f"gateway attested: MRENCLAVE {client.verdict.mrenclave[:16]}... "
                         + ("(SIMULATED)" if client.verdict.simulated else "(hardware)"))
        if last is not None and last.finish_reason is not None:
            errors.print(f"[{last.finish_reason}: {last.prompt_tokens} prompt tokens, "
                         f"{last.completion_tokens} generated]", markup=False)
    return 0
