"""Where smlaas keeps things on this machine: the cache (profiles, the simulation PKI) and the
state it must not lose (versions the owner signed, releases a client has seen)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "SMLAAS_CACHE_DIR"
STATE_DIR_ENV = "SMLAAS_STATE_DIR"


def cache_dir() -> Path:
    """``$SMLAAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/smlaas``, else ``~/.cache/smlaas``."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smlaas"


def state_dir() -> Path:
    """``$SMLAAS_STATE_DIR``, else ``$XDG_STATE_HOME/smlaas`` (``~/.local/state/smlaas``):
    what only ever grows and must survive a cache clean-up."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "smlaas"
