"""The highest version seen per key, remembered across runs in one private JSON file.

The owner's CLI remembers, per coordinator instance, the highest manifest version it signed
(so a rolled-back coordinator never makes it sign a second, different version of the same
number); a client remembers, per owner key, the highest release version it accepted (so it
never accepts a lower one). Both only ever raise a number; the file is rewritten atomically.
"""

from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path

from smlaas.errors import ConfigError
from smlaas.private_files import write_private


class VersionMemory:
    """key -> highest version, in the file at ``path`` (created on first record)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.path} (remembered versions) is unreadable: {err}; it "
                              f"only ever grows: restore it rather than delete it") from err
        if not isinstance(data, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            raise ConfigError(f"{self.path} is not a JSON object of key -> version")
        return data

    def highest(self, key: str) -> int:
        """The highest version recorded for ``key`` (0: none)."""
        with self._lock:
            return int(self._read().get(key, 0))

    def record(self, key: str, version: int) -> int:
        """Raises ``key``'s version to ``version`` if higher; returns the highest. Read,
        compare and write happen under an exclusive lock on a file beside it, so two processes
        (a cron job and a person; two clients) never lose each other's versions."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            if version > data.get(key, 0):
                data[key] = version
                write_private(self.path, json.dumps(data, sort_keys=True, indent=1).encode())
            return int(data.get(key, 0))
