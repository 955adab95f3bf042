"""``smlaas demo`` on a decoder: generate through the attested pipeline and check the tokens
against plain ONNX Runtime decoding of the whole model with its KV cache."""

from __future__ import annotations

import time
from pathlib import Path

from tokenizers import Tokenizer

from smlaas.cli.console import console
from smlaas.cli.demo_deployment import attested_demo
from smlaas.deploy.deployment import DeploySettings
from smlaas.errors import VerificationError
from smlaas.export.build_dir import TOKENIZER_FILE
from smlaas.export.sealed_build import EOS_NAMES
from smlaas.generation.reference import decode_whole_model
from smlaas.generation.sampling import SamplingParams
from smlaas.model_source import open_model
from smlaas.profile.session import create_session

PROMPT = "An enclave keeps the cache; the tokens stream out."
NEW_TOKENS = 32


def generate_and_compare(settings: DeploySettings, model: str, threads: int
                         ) -> list[list[str]]:
    """Deploys, attests, generates NEW_TOKENS greedy tokens after PROMPT (streamed, then
    timed), and checks them against plain decoding; the summary's rows."""
    source, _ = open_model(model)
    whole = create_session(source.model, threads=threads, serving=True)
    with attested_demo(settings) as demo:
        client = demo.client
        console.print(f"generating after {PROMPT!r}: ", end="")
        ids: list[int] = []
        begin = time.perf_counter()
        first = None
        for piece in client.generate(PROMPT, max_tokens=NEW_TOKENS, stream=True):
            first = first if first is not None or not piece.output_ids else \
                time.perf_counter() - begin
            ids += piece.output_ids
            console.print(repr(piece.text)[1:-1], end="", markup=False, highlight=False)
        seconds = time.perf_counter() - begin
        console.print()
        prompt_ids = client.generate(PROMPT, max_tokens=1).prompt_tokens
    ready_s, stages = demo.ready_s, demo.stages
    tokenizer_ids = _prompt_ids(settings, prompt_ids)
    expected = decode_whole_model(whole, tokenizer_ids, NEW_TOKENS, SamplingParams(),
                                  eos_id=_eos(settings))
    if ids != expected:
        raise VerificationError(f"the pipeline generated {ids[:8]}..., the whole model "
                                f"{expected[:8]}...")
    begin = time.perf_counter()
    decode_whole_model(whole, tokenizer_ids, NEW_TOKENS, SamplingParams(), eos_id=_eos(settings))
    local = time.perf_counter() - begin
    console.print(f"[bold green]the pipeline's {len(ids)} tokens equal greedy decoding of the "
                  f"whole model with its KV cache[/]")
    return [["model", model], ["stages (enclaves)", str(stages)],
            ["time to ready", f"{ready_s:.1f} s"],
            ["time to first token through the gateway", f"{(first or 0) * 1e3:.1f} ms"],
            ["tokens/s through the gateway (1 stream)", f"{len(ids) / seconds:.1f}"],
            ["tokens/s, plain ONNX Runtime, whole model", f"{len(expected) / local:.1f}"],
            ["backend", "sim (SIMULATED, INSECURE)"]]


def _tokenizer(settings: DeploySettings) -> Tokenizer:
    """The build's tokenizer (the one sealed into the plan the gateway got)."""
    return Tokenizer.from_file(str(Path(settings.build_dir).parent / TOKENIZER_FILE))


def _prompt_ids(settings: DeploySettings, count: int) -> list[int]:
    ids = list(_tokenizer(settings).encode(PROMPT, add_special_tokens=False).ids)
    if len(ids) != count:
        raise VerificationError(f"the gateway's tokenizer made {count} tokens of the prompt, "
                                f"the build's {len(ids)}")
    return ids


def _eos(settings: DeploySettings) -> int | None:
    tokenizer = _tokenizer(settings)
    return next((tokenizer.token_to_id(name) for name in EOS_NAMES
                 if tokenizer.token_to_id(name) is not None), None)
