"""The zoo matches the reference architectures' parameter counts and is deterministic."""

from __future__ import annotations

import onnx
import pytest

from smlaas import zoo
from smlaas.errors import ZooError

# torchvision's documented parameter counts (Hugging Face's for bert-base-uncased; Keras's
# trainable count for MobileNet v1 1.0/224); inception_v3 without its auxiliary classifier
# (27,161,264 - 3,326,696 aux parameters); gpt2_small4 is Hugging Face's gpt2 (124,439,808)
# less 8 of its 12 blocks (7,087,872 parameters each), the head tied to the embedding.
REFERENCE_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet152": 60_192_808,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "inception_v3": 23_834_568,
    "mobilenet_v1": 4_231_976,
    "mobilenet_v2": 3_504_872,
    "bert_base": 109_482_240,
    "gpt2_small4": 124_439_808 - 8 * 7_087_872,
    # the KV decoders: GPT-2 small's layers, a byte-level vocabulary of 257 for 50257
    "gpt2_small4_kv": 124_439_808 - 8 * 7_087_872 - 50_000 * 768,
    "gpt2_small_kv": 124_439_808 - 50_000 * 768,
}


def test_zoo_lists_every_reference_model() -> None:
    assert [m.name for m in zoo.list_models()] == list(REFERENCE_PARAMETERS)


# Building these three takes 4 to 6 s each (110M to 144M seeded weights): `pytest -m slow`.
LARGEST = {"vgg16", "vgg19", "bert_base"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in LARGEST
                                  else name for name in REFERENCE_PARAMETERS])
def test_parameter_count_matches_reference(name: str) -> None:
    model = zoo.build_model(name)
    onnx.checker.check_model(model)
    assert zoo.count_parameters(model) == REFERENCE_PARAMETERS[name]


def test_same_name_gives_identical_bytes() -> None:
    first = zoo.build_model("resnet18").SerializeToString()
    assert zoo.build_model("resnet18").SerializeToString() == first


def test_input_size_changes_image_side_and_sequence_length() -> None:
    small = zoo.build_model("mobilenet_v2", (1, 3, 96, 96))
    dims = [d.dim_value for d in small.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 96, 96]
    bert = zoo.build_model("bert_base", (1, 16))
    assert bert.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 16
    gpt2 = zoo.build_model("gpt2_small4", (1, 16))
    assert gpt2.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 16


@pytest.mark.parametrize("name, size, message", [
    ("resnet50", (1, 3, 224), "rank 4"),
    ("resnet50", (1, 1, 224, 224), "N,3,H,H"),
    ("vgg16", (1, 3, 256, 256), "224x224 inputs only"),
    ("bert_base", (1, 1000), "1..512 tokens"),
])
def test_bad_sizes_are_rejected(name: str, size: tuple[int, ...], message: str) -> None:
    with pytest.raises(ZooError, match=message):
        zoo.build_model(name, size)


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(ZooError, match="did you mean resnet50"):
        zoo.get("resnet51")
