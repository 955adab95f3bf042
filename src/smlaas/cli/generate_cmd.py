"""``smlaas generate``: generate text with a deployed decoder, tokens streamed as they arrive."""

from __future__ import annotations

import json
from pathlib import Path

import click

from smlaas.cli.console import errors
from smlaas.client import InferenceClient
from smlaas.deploy.owner_plane import GATEWAY_POLICY_FILE, OWNER_PUBLIC_KEY_FILE
from smlaas.enclave.backends.sim import known_roots, simulation_root_from_pem
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import INTEL_ROOT


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
@click.option("--url", required=True, help="The gateway, e.g. https://127.0.0.1:8443.")
@click.option("--ca", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The deployment CA to pin (printed by `smlaas deploy`).")
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
@click.option("--model", help="Model name (default: the one the gateway serves).")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
              help="Policy to attest the gateway with (default: gateway-policy.toml beside "
                   "--ca, written by `smlaas deploy`).")
@click.option("--manifest-digest", help="Also require the gateway to be admitted under this "
                                        "manifest.")
@click.option("--owner-public-key", metavar="HEX|FILE",
              help="The owner's public key: accept the gateway only under the owner's "
                   "current, unexpired release (default: owner.pub beside --ca).")
@click.option("--sim-root", type=click.Path(exists=True, dir_okay=False),
              help="sim backend: trust exactly this simulation root (PEM) instead of this "
                   "machine's.")
@click.option("--no-release-check", is_flag=True,
              help="Accept any deployment of the pinned code, stale or rolled back ones "
                   "included (INSECURE: the owner's current release is not checked).")
@click.option("--no-attest", is_flag=True,
              help="Do not check the gateway's quote (INSECURE: trust whatever the CA vouches "
                   "for).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=60.0,
              show_default=True, help="Seconds to wait for each answer or token.")
def generate(prompt: str | None, url: str, ca: str, input_ids: str | None, max_tokens: int,
             temperature: float, top_k: int, top_p: float, seed: int | None, as_json: bool,
             model: str | None, policy_path: str | None, manifest_digest: str | None,
             owner_public_key: str | None, sim_root: str | None, no_release_check: bool,
             no_attest: bool, timeout_s: float) -> int:
    """Generate text after PROMPT (or --input-ids), printing tokens as they arrive (after
    attesting the gateway)."""
    if (prompt is None) == (input_ids is None):
        raise click.UsageError("give a PROMPT or --input-ids (one of them)")
    start: str | list[int] = parse_ids(input_ids) if input_ids is not None else prompt or ""
    policy, owner = _trust(ca, policy_path, owner_public_key, no_attest=no_attest,
                           no_release_check=no_release_check)
    with InferenceClient(url, ca=ca, model=model, policy=policy, attest=not no_attest,
                         manifest_digest=manifest_digest, timeout_s=timeout_s,
                         owner_public_key=owner, check_release=not no_release_check,
                         roots=[INTEL_ROOT, simulation_root_from_pem(Path(sim_root))]
                         if sim_root else known_roots()) as client:
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


def _trust(ca: str, policy_path: str | None, owner_public_key: str | None, *,
           no_attest: bool, no_release_check: bool) -> tuple[Policy | None, str | None]:
    """The policy to attest the gateway with and the owner's key, as ``smlaas infer``
    finds them (beside --ca unless given)."""
    if no_attest:
        errors.print("[bold yellow]warning:[/] --no-attest: the gateway's quote is NOT "
                     "checked; any server the CA vouches for gets your prompt")
        return None, None
    path = Path(policy_path) if policy_path else Path(ca).with_name(GATEWAY_POLICY_FILE)
    if not path.is_file():
        raise click.UsageError(f"no policy to attest the gateway with ({path} does not "
                               f"exist): give --policy FILE, or --no-attest")
    policy = Policy.from_toml(path)
    if no_release_check:
        errors.print("[bold yellow]warning:[/] --no-release-check: a stale or rolled-back "
                     "deployment of the same code would be accepted")
        return policy, None
    owner = owner_public_key or str(Path(ca).with_name(OWNER_PUBLIC_KEY_FILE))
    if owner_public_key is None and not Path(owner).is_file():
        raise click.UsageError(f"no owner public key to check the release with ({owner} "
                               f"does not exist): give --owner-public-key, or "
                               f"--no-release-check")
    return policy, owner
