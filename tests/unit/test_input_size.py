from __future__ import annotations

import pytest

from smlaas.errors import InputSizeError
from smlaas.graph import parse_input_sizes, resolve_input_sizes
from tests.models import chain_model, multi_input_model


def test_parse_unnamed_and_named() -> None:
    assert parse_input_sizes(["1,3,224,224"]) == {"": (1, 3, 224, 224)}
    assert parse_input_sizes(["ids:1,128", "mask:1,128"]) == {"ids": (1, 128),
                                                              "mask": (1, 128)}


@pytest.mark.parametrize("spec", ["1,x,3", "", "0,3", "1,-2", "a:1,,2"])
def test_parse_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(InputSizeError):
        parse_input_sizes([spec])


def test_unnamed_and_named_cannot_mix() -> None:
    with pytest.raises(InputSizeError, match="either one unnamed"):
        parse_input_sizes(["1,8", "x:1,8"])


def test_resolve_fixes_symbolic_batch() -> None:
    assert resolve_input_sizes(chain_model(), {"": (4, 8)}) == {"x": (4, 8)}


def test_resolve_rejects_wrong_rank_naming_the_input() -> None:
    with pytest.raises(InputSizeError, match=r"input 'x' has rank 2 .* rank 4"):
        resolve_input_sizes(chain_model(), {"": (1, 3, 224, 224)})


def test_resolve_rejects_conflicting_fixed_dim() -> None:
    with pytest.raises(InputSizeError, match="fixed size 8 on axis 1"):
        resolve_input_sizes(chain_model(), {"": (1, 9)})


def test_resolve_requires_sizes_for_symbolic_dims() -> None:
    with pytest.raises(InputSizeError, match="symbolic dimensions"):
        resolve_input_sizes(chain_model(), {})


def test_multi_input_named_and_unknown_name() -> None:
    model = multi_input_model()
    assert resolve_input_sizes(model, {"ids": (2, 5), "feat": (2, 6)}) == {
        "ids": (2, 5), "feat": (2, 6)}
    with pytest.raises(InputSizeError, match="names nope"):
        resolve_input_sizes(model, {"nope": (1,)})
    # Same rank for both inputs: one unnamed size applies to each.
    assert resolve_input_sizes(model, {"": (2, 6)}) == {"ids": (2, 6), "feat": (2, 6)}
