"""Decoding with the whole model in plain ONNX Runtime and its KV cache: the tokens a
partitioned pipeline must reproduce, and the benchmark's unpartitioned baseline.

One prefill runs the prompts with empty pasts; then each step feeds the token just chosen, the
presents as the next pasts, the attention mask grown by one and the next positions. Several
prompts are decoded as one batch, padded on the left (attention mask 0, position 0), and every
sequence has its own :class:`~smlaas.generation.sampling.Sampler`, so a prompt gets the same
tokens alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from smlaas.errors import GenerationError, UnsupportedModelError
from smlaas.generation.sampling import Sampler, SamplingParams
from smlaas.graph.kv_cache import TOKEN_INPUTS, KvPair, TensorSignature, kv_pairs_of

_ORT_ELEMENT_TYPES = {
    "tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16,
    "tensor(double)": TensorProto.DOUBLE, "tensor(int64)": TensorProto.INT64,
    "tensor(int32)": TensorProto.INT32,
}


def decode_whole_model(session: ort.InferenceSession, prompt: Sequence[int],
                       max_new_tokens: int, params: SamplingParams, *,
                       eos_id: int | None = None) -> list[int]:
    """The tokens ``session``'s decoder generates after ``prompt``: at most ``max_new_tokens``,
    ending with ``eos_id`` when it is chosen.

    Raises:
        GenerationError: an empty prompt, a token outside the vocabulary, a negative count.
        UnsupportedModelError: the model is not a decoder of the supported layout.
    """
    return decode_batch(session, [prompt], max_new_tokens, params, eos_id=eos_id)[0]


def decode_batch(session: ort.InferenceSession, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, params: SamplingParams, *, eos_id: int | None = None,
                 pad_id: int = 0) -> list[list[int]]:
    """:func:`decode_whole_model` for several prompts at once, left-padded with ``pad_id``;
    each prompt's tokens, in order. A finished sequence stays in the batch until every one is
    done (its further tokens are discarded)."""
    decoder = _Decoder(session)
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for prompt in prompts:
        decoder.check_tokens(prompt)
    generated: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens == 0:
        return generated
    ids, mask = _left_padded(prompts, pad_id)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    pasts = decoder.empty_pasts(len(prompts))
    samplers = [Sampler(params) for _ in prompts]
    done = [False] * len(prompts)
    chosen = [prompt[-1] for prompt in prompts]  # a finished sequence is fed its last token
    for step in range(max_new_tokens):
        logits, pasts = decoder.run(ids, mask, positions, pasts)
        for row, sampler in enumerate(samplers):
            if not done[row]:
                chosen[row] = sampler.choose(logits[row, -1])
                generated[row].append(chosen[row])
                done[row] = chosen[row] == eos_id
        if all(done) or step == max_new_tokens - 1:
            break
        ids = np.array(chosen, np.int64)[:, None]
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return generated


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


class _Decoder:
    """A session's decoder signature: its token inputs, cache pairs and logits."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        inputs = [_signature(arg) for arg in session.get_inputs()]
        outputs = [_signature(arg) for arg in session.get_outputs()]
        self.pairs: list[KvPair] = kv_pairs_of(inputs, outputs)
        names = {i.name for i in inputs}
        if not self.pairs or "input_ids" not in names:
            raise UnsupportedModelError("the model is not a decoder with a KV cache: it needs "
                                        "input_ids and past_key_values.N.key/value inputs")
        others = sorted(names - set(TOKEN_INPUTS) - {p.past for p in self.pairs})
        if others:
            raise UnsupportedModelError(f"the decoder takes inputs the reference decoding "
                                        f"cannot fill: {', '.join(others)}")
        self.token_inputs = [name for name in TOKEN_INPUTS if name in names]
        output_names = [o.name for o in outputs]
        self.logits = "logits" if "logits" in output_names else output_names[0]
        vocab = next(o.shape[-1] for o in outputs if o.name == self.logits)
        self.vocab_size = vocab if isinstance(vocab, int) else None

    def check_tokens(self, prompt: Sequence[int]) -> None:
        if not prompt:
            raise GenerationError("a prompt needs at least one token")
        vocab = self.vocab_size
        bad = [t for t in prompt if t < 0 or vocab is not None and t >= vocab]
        if bad:
            expected = f"0..{vocab - 1}" if vocab is not None else "ids >= 0"
            raise GenerationError(f"prompt tokens {bad[:5]} are outside the vocabulary "
                                  f"({expected})")

    def empty_pasts(self, batch: int) -> dict[str, np.ndarray]:
        pasts = {}
        for pair in self.pairs:
            shape = []
            for axis, dim in enumerate(pair.shape):
                if axis == pair.batch_axis:
                    shape.append(batch)
                elif axis == pair.sequence_axis:
                    shape.append(0)
                elif isinstance(dim, int):
                    shape.append(dim)
                else:
                    raise UnsupportedModelError(
                        f"KV cache input {pair.past} has a symbolic dimension {dim!r} on axis "
                        f"{axis}; the reference decoding needs heads and head size fixed")
            if pair.elem_type == TensorProto.UNDEFINED:
                raise UnsupportedModelError(f"KV cache input {pair.past} has an element type "
                                            f"the reference decoding does not feed")
            pasts[pair.past] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(pair.elem_type))
        return pasts

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            pasts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The logits [batch, sequence, vocab] and the next pasts."""
        tokens = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds = {**{name: tokens[name] for name in self.token_inputs}, **pasts}
        outputs = self.session.run([self.logits, *(p.present for p in self.pairs)], feeds)
        return np.asarray(outputs[0]), {pair.past: np.asarray(present)
                                        for pair, present in zip(self.pairs, outputs[1:])}


def _signature(arg: ort.NodeArg) -> TensorSignature:
    # ONNX Runtime reports a named axis by its name and an unnamed one as None.
    shape = tuple(d if isinstance(d, str) or isinstance(d, int) and d >= 0 else "?"
                  for d in (arg.shape or []))
    return TensorSignature(arg.name, shape, _ORT_ELEMENT_TYPES.get(arg.type,
                                                                   TensorProto.UNDEFINED))
