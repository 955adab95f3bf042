"""Generation through three real stage workers in one process (in-memory hops carrying the
network's typed messages): each stage keeps its layers' KV cache, the last one samples, and
the gateway's generator batches the sequences' decode steps. The tokens equal plain ONNX
Runtime decoding of the whole model with its cache, for the zoo's decoder layout, a decoder
laid out as Hugging Face exports it, and decoders of six architectures that Hugging Face optimum
exported (GPT-2 also in float16); no message between stages carries a cache."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from smlaas.errors import GenerationError, PipelineFailed, Unavailable
from smlaas.export import StageExtractor
from smlaas.generation.reference import decode_whole_model
from smlaas.generation.sampling import SamplingParams
from smlaas.partition import ModelSource, analyse
from smlaas.plan.generation import GenerationSizes, decoder_axes, decoder_input_sizes
from smlaas.runtime.stage_runner import StageRunner, relax_batch_dim
from smlaas.serving.generation import Finished, GenerationLimits, Generator
from smlaas.serving.hop import LocalHop
from smlaas.serving.protocol import Infer, Outputs
from smlaas.serving.sequences import GenerationStage
from smlaas.serving.worker import StageWorker
from smlaas.zoo.gpt2 import GPT2Config
from smlaas.zoo.gpt2_kv import build_gpt2_kv
from tests.hf_decoder import build_hf_decoder

CONTEXT, SEQUENCES = 128, 8
OPTIMUM_DECODER = Path(__file__).parents[1] / "data" / "hf_decoder" / "gpt2_tiny_optimum.onnx"


def zoo_decoder() -> onnx.ModelProto:
    return build_gpt2_kv("tiny_kv", GPT2Config(layers=3, d_model=64, heads=4, vocab_size=257,
                                               max_positions=256))


def three_stages(model: onnx.ModelProto) -> list[onnx.ModelProto]:
    """The decoder cut in three at valid cuts (no KV pair split)."""
    sizes = GenerationSizes(CONTEXT, SEQUENCES)
    analysis = analyse(ModelSource("m", "test", "-", model),
                       decoder_input_sizes(model, sizes), threads=1,
                       dynamic_axes=decoder_axes(model))
    graph = analysis.graph
    valid = np.flatnonzero(graph.valid_cut_positions()[1:-1]) + 1
    cuts = [0, int(valid[len(valid) // 3]), int(valid[2 * len(valid) // 3]), graph.node_count]
    extractor = StageExtractor(analysis.prepared, graph)
    return [extractor.extract(a, b, name=f"s{k}") for k, (a, b) in
            enumerate(zip(cuts, cuts[1:]))]


class Tap:
    """A hop that records every request it carries (what the host sees between stages)."""

    def __init__(self, hop: LocalHop, seen: list[Infer] | None, delay_s: float = 0.0) -> None:
        self.hop, self.seen, self.delay_s = hop, seen, delay_s

    async def request(self, message: Infer, *, request_id: str | None = None,
                      follow: object = None) -> object:
        if self.seen is not None:
            self.seen.append(message)
        await asyncio.sleep(self.delay_s)  # a slow network
        return await self.hop.request(message, request_id=request_id,
                                      follow=follow)  # type: ignore[arg-type]

    async def describe(self, message: object, *, request_id: str | None = None) -> object:
        return await self.hop.describe(message, request_id=request_id)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.hop.close()


@contextlib.asynccontextmanager
async def pipeline(model: onnx.ModelProto, seen: list[Infer] | None = None, *,
                   per_client: int = SEQUENCES, timeout_s: float = 60,
                   hop_delay_s: float = 0.0) -> AsyncIterator[Generator]:
    stages = three_stages(model)
    workers: list[StageWorker] = []
    next_hop = None
    for index in reversed(range(len(stages))):
        runner = StageRunner(relax_batch_dim(stages[index]), threads=1, serving=True,
                             label=f"stage {index}")
        worker = StageWorker(
            index=index, model=stages[index], server_context=None, runner=runner,
            upstream_role="gateway", manifest_digest="-", next_link=next_hop,
            generation=GenerationStage(runner, stages[index], max_sequences=SEQUENCES,
                                       max_context=CONTEXT, last=index == len(stages) - 1))
        await worker.start()
        workers.append(worker)
        hop = LocalHop(f"stage-{index}", worker)
        next_hop = Tap(hop, seen, hop_delay_s) if (seen is not None or hop_delay_s) \
            and index > 0 else hop
    assert next_hop is not None
    generator = Generator(next_hop, GenerationLimits(CONTEXT, SEQUENCES, None,  # type: ignore[arg-type]
                                                     max_per_client=per_client),
                          max_inflight=3, timeout_s=timeout_s)
    try:
        yield generator
    finally:
        await asyncio.sleep(0.05)  # the last releases reach the stages
        await generator.close()
        for worker in workers:
            await worker.stop()


async def collect(generator: Generator, prompt: list[int], tokens: int,
                  params: SamplingParams) -> list[int]:
    out = []
    async for item in generator.generate(prompt, max_tokens=tokens, sampling=params):
        if not isinstance(item, Finished):
            out.append(item)
    return out


def whole(model: onnx.ModelProto, prompt: list[int], tokens: int,
          params: SamplingParams) -> list[int]:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return decode_whole_model(session, prompt, tokens, params)


def prompt_of(length: int, seed: int, vocab: int = 257) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab - 1, length).tolist()


def optimum_decoder() -> onnx.ModelProto:
    """A GPT-2 exported by Hugging Face optimum itself (tests/data/hf_decoder/README.md)."""
    return onnx.load(str(OPTIMUM_DECODER))


def exported(name: str) -> onnx.ModelProto:
    """A decoder exported by Hugging Face optimum, or (``llama_genai``) built by ONNX Runtime
    GenAI's model builder (same README)."""
    file = "llama_tiny_genai.onnx" if name == "llama_genai" else f"{name}_tiny_optimum.onnx"
    return onnx.load(str(OPTIMUM_DECODER.with_name(file)))


def optimum_decoder_fp16() -> onnx.ModelProto:
    """The same in float16 throughout (weights, caches, logits), converted by ONNX Runtime's
    transformer tools as decoders are served in half precision."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(optimum_decoder())
    converted.convert_float_to_float16(keep_io_types=False)
    return converted.model


SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)


@pytest.mark.parametrize(("build", "params"), [
    (zoo_decoder, SamplingParams()), (zoo_decoder, SAMPLED),
    (build_hf_decoder, SamplingParams()), (build_hf_decoder, SAMPLED),
    (optimum_decoder, SamplingParams()), (optimum_decoder, SAMPLED),
    # float16 greedy only: a stage boundary rounds to float16 where the whole model's
    # fused kernels may not, which can move a sampled token on another CPU or ORT version
    (optimum_decoder_fp16, SamplingParams()),
], ids=["zoo-greedy", "zoo-sampled", "hf-layout-greedy", "hf-layout-sampled",
        "optimum-export-greedy", "optimum-export-sampled", "optimum-export-fp16-greedy"])
def test_three_stages_generate_the_whole_models_tokens(build, params) -> None:
    model = build()
    vocab = int(model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
    prompt = prompt_of(32, 0, vocab)
    expected = whole(model, prompt, 64, params)

    async def run() -> list[int]:
        async with pipeline(model) as generator:
            return await collect(generator, prompt, 64, params)

    assert asyncio.run(run()) == expected


@pytest.mark.parametrize("architecture", ["llama", "phi3", "gemma", "gpt_neox", "opt",
                                          "llama_genai"])
def test_other_architectures_exported_by_optimum_generate_their_own_tokens(
        architecture: str) -> None:
    """Rotary positions, grouped- and multi-query attention, fused projections, parallel
    blocks, learned positions with an offset: each as optimum exports it, cut in three, gives
    the whole model's tokens, greedy and seeded; and a Llama as ONNX Runtime GenAI builds it
    (GroupQueryAttention, no position_ids)."""
    model = exported(architecture)
    prompt = prompt_of(16, 1)

    async def run() -> list[list[int]]:
        async with pipeline(model) as generator:
            return [await collect(generator, prompt, 24, params)
                    for params in (SamplingParams(), SAMPLED)]

    assert asyncio.run(run()) == [whole(model, prompt, 24, params)
                                  for params in (SamplingParams(), SAMPLED)]


def test_eight_concurrent_streams_equal_their_single_stream_results() -> None:
    model = zoo_decoder()
    prompts = [prompt_of(4 + 5 * k, k) for k in range(8)]
    params = SamplingParams(temperature=0.8, seed=5)

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        async with pipeline(model) as generator:
            alone = [await collect(generator, p, 24, params) for p in prompts]
            together = await asyncio.gather(*(collect(generator, p, 24, params)
                                              for p in prompts))
            return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert alone[0] == whole(model, prompts[0], 24, params)


def test_no_message_between_stages_carries_a_kv_cache() -> None:
    """The host sees every message between stages: none is named like a cache or is the
    size of one layer's cache of the sequence (heads x tokens x head_dim per row)."""
    model = zoo_decoder()
    seen: list[Infer] = []

    async def run() -> None:
        async with pipeline(model, seen) as generator:
            await collect(generator, prompt_of(40, 1), 40, SamplingParams())

    asyncio.run(run())
    assert seen
    for message in seen:
        for name, value in message.tensors.items():
            assert "past" not in name and "present" not in name
            assert not (value.ndim == 4 and value.shape[1] == 4 and value.shape[3] == 16), \
                (name, value.shape)  # [rows, heads, tokens, head_dim]: a cache
            if message.step is not None and message.step.rows and \
                    message.step.rows[0].new == 1:  # a decode step: a token's worth per row
                tokens = max(r.past + r.new for r in message.step.rows)
                per_row = value.size // max(value.shape[0], 1)
                assert per_row < 64 * tokens / 2, (name, value.shape)  # a cache: 64 x tokens


def test_limits_are_answered_not_crashed() -> None:
    model = zoo_decoder()

    async def run() -> None:
        async with pipeline(model) as generator:
            with pytest.raises(GenerationError, match="prompt has"):
                await collect(generator, prompt_of(CONTEXT, 0), 4, SamplingParams())
            # a sequence stops at the context it was planned for
            out = []
            async for item in generator.generate(prompt_of(CONTEXT - 3, 0), max_tokens=50,
                                                 sampling=SamplingParams()):
                out.append(item)
            assert isinstance(out[-1], Finished) and out[-1].reason == "length"
            assert len(out) == 4
            # every slot busy: the next sequence is refused at once (503), none is lost
            streams = [generator.generate(prompt_of(8, k), max_tokens=100,
                                          sampling=SamplingParams()) for k in range(SEQUENCES)]
            firsts = [await anext(s) for s in streams]
            assert all(isinstance(t, int) for t in firsts)
            with pytest.raises(Unavailable):
                await collect(generator, prompt_of(8, 99), 2, SamplingParams())
            for stream in streams:
                await stream.aclose()
            await asyncio.sleep(0.2)  # the releases reach every stage
            assert len(await collect(generator, prompt_of(8, 99), 2, SamplingParams())) == 2

    asyncio.run(run())


def test_a_generation_may_last_longer_than_the_request_timeout() -> None:
    """The timeout is per step: a long generation outlives it, and a sequence joining a
    group never inherits another's deadline."""
    model = zoo_decoder()

    async def run() -> list[list[int]]:
        async with pipeline(model, timeout_s=0.3, hop_delay_s=0.005) as generator:
            first = asyncio.ensure_future(collect(generator, prompt_of(8, 0), 100,
                                                  SamplingParams()))
            await asyncio.sleep(0.25)
            second = collect(generator, prompt_of(8, 1), 40, SamplingParams())
            return list(await asyncio.gather(first, second))

    long, joined = asyncio.run(run())
    assert len(long) == 100 and len(joined) == 40


def test_one_client_cannot_hold_every_sequence() -> None:
    """Past its share (half the slots by default), a client's next sequence is refused while
    another client's is served."""
    model = zoo_decoder()

    async def run() -> None:
        async with pipeline(model, per_client=0) as generator:
            assert generator.limits.per_client == SEQUENCES // 2
            streams = [generator.generate(prompt_of(8, k), max_tokens=100, client="hog",
                                          sampling=SamplingParams()) for k in range(4)]
            for stream in streams:
                await anext(stream)
            with pytest.raises(Unavailable, match="as many as one client may"):
                await anext(generator.generate(prompt_of(8, 9), max_tokens=2, client="hog",
                                               sampling=SamplingParams()))
            other = [t async for t in generator.generate(
                prompt_of(8, 9), max_tokens=2, client="other", sampling=SamplingParams())]
            assert isinstance(other[-1], Finished) and len(other) == 3
            for stream in streams:
                await stream.aclose()

    asyncio.run(run())


def test_a_stage_refuses_a_step_out_of_step_with_its_cache() -> None:
    """A replayed or forged step (past not what the stage holds) fails; it never reads
    another sequence's cache."""
    model = zoo_decoder()

    async def run() -> None:
        async with pipeline(model) as generator:
            from smlaas.serving.protocol import Step, StepRow, deadline_in
            ids = np.zeros((1, 1), np.int64)
            message = Infer({"input_ids": ids, "attention_mask": np.ones((1, 6), np.int64),
                             "position_ids": np.full((1, 1), 5, np.int64)},
                            deadline_in(10), step=Step((StepRow("f" * 32, 5, 1),)))
            reply = await generator.link.request(message)
            assert not isinstance(reply, Outputs)
            assert "unknown sequence" in reply.message  # type: ignore[union-attr]

    asyncio.run(run())
    assert PipelineFailed  # the generator maps such a failure to PipelineFailed


def test_a_decoders_stages_are_never_replicated(tmp_path) -> None:
    """A stage keeps its sequences' caches: a replica would not have them, so neither the
    plan nor a deploy-time --replicas may give a decoder's stage a second one."""
    from dataclasses import replace

    from smlaas.deploy.topology import stage_replicas
    from smlaas.errors import ConfigError, PlanError
    from smlaas.partition import PlanOptions, partition
    from smlaas.plan import Planner, preset
    from smlaas.profile import ProfileSettings

    path = tmp_path / "m.onnx"
    onnx.save(zoo_decoder(), str(path))
    plan = partition(str(path), tmp_path / "b", cost_model=preset("native"),
                     options=PlanOptions(Planner.DP_THROUGHPUT, 2, False),
                     settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=2),
                     verify=False, measure_memory=False,
                     generation=GenerationSizes(CONTEXT, SEQUENCES)).plan
    assert stage_replicas(plan, None) == [1] * len(plan.stages)
    with pytest.raises(ConfigError, match="KV caches"):
        stage_replicas(plan, {0: 2})
    with pytest.raises(PlanError, match="not replicated|has one"):
        replace(plan, stages=(replace(plan.stages[0], replicas=2), *plan.stages[1:])).check()
    with pytest.raises(ConfigError, match="not replicated"):
        partition(str(path), tmp_path / "c", cost_model=preset("native"),
                  options=PlanOptions(Planner.DP_REPLICAS, 4, False),
                  settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=2),
                  verify=False, measure_memory=False)
