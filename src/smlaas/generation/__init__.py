"""Text generation with a decoder's KV cache: choosing tokens (:mod:`.sampling`, pure numpy)
and decoding with the whole model in plain ONNX Runtime (:mod:`.reference`, the tokens a
partitioned pipeline must reproduce).

>>> from smlaas.generation import SamplingParams
>>> SamplingParams(temperature=0.7, top_k=40, seed=1).is_greedy
False
"""

from __future__ import annotations

from smlaas.generation.sampling import Sampler, SamplingParams

__all__ = ["Sampler", "SamplingParams"]
