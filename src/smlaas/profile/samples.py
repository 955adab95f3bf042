"""Sample inputs given by the user (``--sample-inputs FILE.npz``, ``--input-value NAME=VALUE``).

Models whose branches or shapes depend on input values (silero-vad's If on its sample rate
``sr``) cannot run on seeded random inputs. Given samples are used instead, wherever smlaas
runs the model: shape measurement, node profiling, stage timing and verification; inputs
without a sample still get seeded random values (:func:`smlaas.profile.inputs.random_inputs`).
A build keeps its samples in ``sample_inputs.npz`` so that ``smlaas verify`` uses them too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from smlaas.errors import ConfigError, InputSizeError
from smlaas.graph.input_size import model_inputs

SAMPLES_FILE = "sample_inputs.npz"


def load_sample_file(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, by name.

    Raises:
        ConfigError: the file is missing or not an npz archive.
    """
    try:
        with np.load(Path(path), allow_pickle=False) as archive:
            return {name: np.asarray(archive[name]) for name in archive.files}
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read sample inputs {path}: {err} (expected an .npz file "
                          f"written by numpy.savez, one array per model input)") from err


def save_sample_file(path: str | Path, feeds: Mapping[str, np.ndarray]) -> None:
    """Writes ``feeds`` as an ``.npz`` file that :func:`load_sample_file` reads back."""
    with Path(path).open("wb") as stream:
        np.savez(stream, **dict(feeds))  # type: ignore[arg-type]


def parse_input_values(specs: Sequence[str]) -> dict[str, str]:
    """``["sr=16000"]`` -> ``{"sr": "16000"}``."""
    values: dict[str, str] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        if not sep or not name or not text:
            raise ConfigError(f"bad --input-value {spec!r}: expected NAME=VALUE, e.g. sr=16000")
        if name in values:
            raise ConfigError(f"--input-value given twice for {name!r}")
        values[name] = text
    return values


def sample_feeds(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], *,
                 arrays: Mapping[str, np.ndarray] | None = None,
                 values: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """The given samples as feeds for ``model`` at ``shapes``: arrays cast to each input's
    element type, each ``values`` entry filled into its input's shape.

    Raises:
        InputSizeError: a name that is not an input, a shape that differs from ``shapes``,
            or a value that is not a number of the input's type.
    """
    inputs = {v.name: v for v in model_inputs(model)}
    feeds: dict[str, np.ndarray] = {}
    given = dict(arrays or {})
    for name, text in (values or {}).items():
        if name in given:
            raise InputSizeError(f"input {name!r} is given both in the sample file and by "
                                 f"--input-value")
        dtype = _dtype(inputs, name)
        try:
            value = np.asarray(text).astype(dtype) if dtype != np.dtype(object) else \
                np.asarray(text, dtype=object)
        except ValueError:
            raise InputSizeError(f"--input-value {name}={text}: not a {dtype} value") from None
        given[name] = np.full(shapes[name], value, dtype=dtype)
    for name, array in given.items():
        dtype = _dtype(inputs, name)
        if tuple(array.shape) != tuple(shapes[name]):
            raise InputSizeError(f"sample input {name!r} has shape {list(array.shape)}, but "
                                 f"the input size is {list(shapes[name])}")
        feeds[name] = array.astype(dtype, copy=False)
    return feeds


def samples_digest(feeds: Mapping[str, np.ndarray]) -> str:
    """A short digest of the samples (part of the profile cache key)."""
    digest = hashlib.sha256()
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes() if array.dtype != np.dtype(object) else
                      repr(array.tolist()).encode())
    return digest.hexdigest()[:16]


def _dtype(inputs: Mapping[str, onnx.ValueInfoProto], name: str) -> np.dtype:
    if name not in inputs:
        raise InputSizeError(f"sample input {name!r} is not an input of the model (its inputs "
                             f"are {', '.join(inputs)})")
    return np.dtype(helper.tensor_dtype_to_np_dtype(inputs[name].type.tensor_type.elem_type))
