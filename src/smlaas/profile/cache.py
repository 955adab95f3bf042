"""On-disk cache of node profiles, keyed by model hash, input size, settings and machine."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import onnx
import onnxruntime as ort

from smlaas.paths import cache_dir
from smlaas.profile.profiler import NodeProfile, ProfileSettings

__all__ = ["ProfileCache", "cache_dir", "machine_id", "model_digest", "profile_key"]

logger = logging.getLogger(__name__)


def machine_id() -> str:
    """CPU model, core count, host name and ONNX Runtime version: what makes timings differ."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|{os.cpu_count()}|{platform.node()}|ort-{ort.__version__}"


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def profile_key(digest: str, input_shapes: Mapping[str, tuple[int, ...]],
                settings: ProfileSettings) -> str:
    shapes = json.dumps({k: list(v) for k, v in sorted(input_shapes.items())})
    text = f"{digest}|{shapes}|{settings.key()}|{machine_id()}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class ProfileCache:
    """A directory of ``<key>.json`` node profiles; unreadable entries count as misses."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = (directory or cache_dir()) / "profiles"

    def get(self, key: str) -> NodeProfile | None:
        path = self.directory / f"{key}.json"
        try:
            return NodeProfile.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as err:
            logger.warning("ignoring unreadable profile cache entry %s: %s", path, err)
            return None

    def put(self, key: str, profile: NodeProfile) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(profile.to_json())
            tmp.replace(self.directory / f"{key}.json")
        except OSError as err:  # a cache that cannot be written only costs time
            logger.warning("cannot write profile cache in %s: %s", self.directory, err)
