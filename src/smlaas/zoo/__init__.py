"""The research prototype's models, built directly as ONNX with seeded weights (no torch).

>>> from smlaas import zoo
>>> model = zoo.build_model("resnet18")            # symbolic batch, 3x224x224
>>> zoo.get("inception_v3").default_input_size
(1, 3, 299, 299)
>>> zoo.get("gpt2_small4_kv").is_decoder           # every axis symbolic; ships a tokenizer
True
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import onnx

from smlaas.errors import ZooError
from smlaas.zoo.bert import build_bert_base
from smlaas.zoo.builder import count_parameters
from smlaas.zoo.densenet import build_densenet
from smlaas.zoo.gpt2 import GPT2Config, build_gpt2
from smlaas.zoo.gpt2_kv import build_gpt2_kv
from smlaas.zoo.inception import build_inception_v3
from smlaas.zoo.mobilenet import build_mobilenet_v1, build_mobilenet_v2
from smlaas.zoo.resnet import build_resnet
from smlaas.zoo.tokenizer import VOCAB_SIZE, tokenizer_json
from smlaas.zoo.vgg import build_vgg

__all__ = ["ZooModel", "build_model", "count_parameters", "get", "list_models", "ZOO_PREFIX"]

# A model reference "zoo:NAME" in plan.json means "rebuilt from the zoo", not a file.
ZOO_PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: how to build it and what input it expects by default."""

    name: str
    description: str
    default_input_size: tuple[int, ...]
    """Empty for a KV-cache decoder, whose axes are all symbolic."""
    _builder: Callable[[int], onnx.ModelProto]
    """Builds the model for one size parameter (image side, or sequence length)."""
    tokenizer_json: Callable[[], str] | None = None
    """The text of the ``tokenizer.json`` a text generator ships with; None for the others."""
    is_decoder: bool = False
    """A decoder with past key/value inputs and present outputs (``smlaas.graph.kv_cache``)."""

    @property
    def is_sequence_model(self) -> bool:
        return len(self.default_input_size) == 2 or self.is_decoder

    def size_parameter(self, input_size: Sequence[int] | None) -> int:
        """The image side or sequence length an --input-size asks for (validated); 0 for a
        KV-cache decoder, which takes any input size (its builder has no size parameter)."""
        if self.is_decoder:
            return 0
        if input_size is None:
            return self.default_input_size[-1]
        size = tuple(input_size)
        expected_rank = len(self.default_input_size)
        if len(size) != expected_rank:
            raise ZooError(
                f"{self.name} takes an input of rank {expected_rank} "
                f"(e.g. {_fmt(self.default_input_size)}), got {_fmt(size)}"
            )
        if not self.is_sequence_model:
            if size[1] != 3 or size[2] != size[3]:
                raise ZooError(f"{self.name} takes N,3,H,H images, got {_fmt(size)}")
            if size[2] < 32:
                raise ZooError(f"{self.name} needs images of at least 32x32, got {_fmt(size)}")
        elif not 1 <= size[1] <= 512:
            raise ZooError(f"{self.name} takes sequences of 1..512 tokens, got {size[1]}")
        return size[-1]

    def build(self, input_size: Sequence[int] | None = None) -> onnx.ModelProto:
        """The model with a symbolic batch dimension; other dims follow ``input_size``
        (which a KV-cache decoder ignores: its sequence axes are symbolic too)."""
        return self._builder(self.size_parameter(input_size))


def _fmt(size: Sequence[int]) -> str:
    return ",".join(str(d) for d in size)


def _image(builder: Callable[..., onnx.ModelProto], name: str, side: int = 224,
           ) -> tuple[tuple[int, ...], Callable[[int], onnx.ModelProto]]:
    return (1, 3, side, side), partial(builder, name)


_ENTRIES: dict[str, ZooModel] = {}


def _register(name: str, description: str, default: tuple[int, ...],
              builder: Callable[[int], onnx.ModelProto]) -> None:
    _ENTRIES[name] = ZooModel(name, description, default, builder)


def _register_kv_decoder(name: str, description: str, config: GPT2Config) -> None:
    def build(_size: int) -> onnx.ModelProto:
        return build_gpt2_kv(name, config)

    _ENTRIES[name] = ZooModel(name, description, (), build, tokenizer_json=tokenizer_json,
                              is_decoder=True)


for _name in ("resnet18", "resnet50", "resnet152"):
    _register(_name, f"ResNet v1.5 ({_name[6:]} layers, torchvision layout)",
              *_image(build_resnet, _name))
for _name in ("vgg16", "vgg19"):
    _register(_name, f"VGG {_name[3:]} without batch norm (torchvision layout)",
              *_image(build_vgg, _name))
for _name in ("densenet121", "densenet169", "densenet201"):
    _register(_name, f"DenseNet-BC {_name[8:]} (torchvision layout)",
              *_image(build_densenet, _name))
_register("inception_v3", "Inception v3 without auxiliary classifier (torchvision layout)",
          *_image(build_inception_v3, "inception_v3", 299))
_register("mobilenet_v1", "MobileNet v1, width 1.0",
          *_image(build_mobilenet_v1, "mobilenet_v1"))
_register("mobilenet_v2", "MobileNet v2 (torchvision layout)",
          *_image(build_mobilenet_v2, "mobilenet_v2"))
_register("bert_base", "BERT-base encoder: 12 layers, hidden 768, two int64 inputs",
          (1, 128), partial(build_bert_base, "bert_base"))
_register("gpt2_small4", "GPT-2 small cut to 4 layers, LM head tied to the 50257x768 "
          "embedding (one int64 input)", (1, 128), partial(build_gpt2, "gpt2_small4"))
_register_kv_decoder("gpt2_small4_kv", "GPT-2 small cut to 4 layers for text generation: KV "
                     "cache inputs/outputs, byte-level tokenizer (257 tokens)",
                     GPT2Config(layers=4, vocab_size=VOCAB_SIZE))
_register_kv_decoder("gpt2_small_kv", "GPT-2 small (12 layers) for text generation: KV cache "
                     "inputs/outputs, byte-level tokenizer (257 tokens)",
                     GPT2Config(vocab_size=VOCAB_SIZE))


def list_models() -> list[ZooModel]:
    """Every zoo model, in a stable order."""
    return list(_ENTRIES.values())


def get(name: str) -> ZooModel:
    """The zoo entry called ``name``; ZooError with the closest names if there is none."""
    try:
        return _ENTRIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, _ENTRIES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ZooError(
            f"unknown zoo model {name!r}{hint} (`smlaas zoo list` shows all)"
        ) from None


def build_model(name: str, input_size: Sequence[int] | None = None) -> onnx.ModelProto:
    """Builds zoo model ``name`` (see :meth:`ZooModel.build`)."""
    return get(name).build(input_size)
