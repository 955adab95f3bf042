"""The client's check of the owner's release: is this gateway the owner's *current* decision?

A client is configured once with the owner's public key. After the gateway's quote passed, it
requires the release the gateway staples to its evidence (:mod:`smlaas.coordinator.release`)
to be:

1. signed by that owner key,
2. unexpired,
3. at least as new as the owner's current release: the client asks the coordinator the
   release names (over RA-TLS, pinning the MRENCLAVE the owner signed into it) for its latest
   release first, when it can reach it, and never accepts a version lower than the highest it
   has seen for this owner key and coordinator (remembered across runs,
   :class:`~smlaas.version_memory.VersionMemory`). Versions count one coordinator's manifests
   (v1, v2 ... of what it serves); an owner's other deployments, under other coordinators,
   have versions of their own, so the memory is kept per owner key *and* coordinator instance
   (a deployment the owner abandoned under another coordinator is refused once its last
   release expires),
4. for the very manifest the gateway's certificate says it was admitted under.

A v1 gateway the host keeps running after the owner moved to v2 fails 3 (or 4, if it staples
the v2 release); a restored earlier coordinator state passes only for a client that has seen
nothing newer, and only until its release expires (docs/SECURITY.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smlaas.coordinator.owner import parse_public_key, public_key_fingerprint
from smlaas.coordinator.release import Release, SignedRelease
from smlaas.enclave.verification import TrustedRoot
from smlaas.errors import ConfigError, ProtocolError, ReleaseError, SmlaasError
from smlaas.paths import state_dir
from smlaas.version_memory import VersionMemory

logger = logging.getLogger(__name__)
SEEN_RELEASES_FILE = "seen-releases.json"
COORDINATOR_TIMEOUT_S = 3.0
"""How long a client waits for the coordinator's current release before going on without."""


def owner_public_key_text(value: str | Path) -> str:
    """The owner's public key (hex SubjectPublicKeyInfo DER) given as hex or as a file
    holding it (``owner.pub``, written by ``smlaas deploy`` and ``smlaas owner show``)."""
    text = str(value).strip()
    if not all(c in "0123456789abcdefABCDEF" for c in text) or len(text) < 64:
        try:
            text = Path(value).read_text().strip()
        except OSError as err:
            raise ConfigError(f"the owner public key must be hex (`smlaas owner show`) or a "
                              f"file holding it; cannot read {value}: {err}") from err
    parse_public_key(text)  # ConfigError if it is not a P-256 key
    return text.lower()


class ReleaseCheck:
    """Checks gateways' releases against one owner key (see the module docstring)."""

    def __init__(self, owner_public_key: str, *, roots: list[TrustedRoot],
                 memory: VersionMemory | None = None, ask_coordinator: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.owner_public_key = owner_public_key_text(owner_public_key)
        self._key = parse_public_key(self.owner_public_key)
        self.fingerprint = public_key_fingerprint(self.owner_public_key)
        self.roots, self.ask_coordinator, self._clock = roots, ask_coordinator, clock
        self.memory = memory or VersionMemory(state_dir() / SEEN_RELEASES_FILE)

    def check(self, stapled: Any, *, admitted_manifest: str, simulated: bool) -> Release:
        """The gateway's release if it is the owner's current one; ReleaseError otherwise."""
        if stapled is None:
            raise ReleaseError("the gateway staples no owner release (its coordinator holds "
                               "none: the owner has not released this deployment, or it is "
                               "not the owner's current one)")
        release = self._verified(SignedRelease.from_dict(stapled), "the gateway's")
        current = self._coordinator_release(release, simulated=simulated) or release
        # Remembered even if this gateway is refused: a verified newer release stays seen.
        floor = self._record(release.coordinator_instance, current.version)
        if current.version == release.version and \
                current.manifest_digest != release.manifest_digest:
            raise ReleaseError(f"the coordinator's release v{current.version} names manifest "
                               f"{current.manifest_digest[:16]}..., the gateway's "
                               f"{release.manifest_digest[:16]}...: two manifests under one "
                               f"version; refusing both")
        if release.version < floor:
            raise ReleaseError(f"the gateway is under the owner's release v{release.version}, "
                               f"but v{floor} is current: a stale deployment the owner "
                               f"replaced, or a rolled-back coordinator")
        if release.manifest_digest != admitted_manifest:
            raise ReleaseError(f"the gateway was admitted under manifest "
                               f"{admitted_manifest[:16]}..., the owner's release "
                               f"v{release.version} names {release.manifest_digest[:16]}...: "
                               f"this gateway is not the owner's current deployment")
        return release

    def _record(self, instance: str, version: int) -> int:
        try:
            return self.memory.record(f"{self.fingerprint}/{instance}", version)
        except OSError as err:
            raise ConfigError(f"cannot remember the owner's release version in "
                              f"{self.memory.path}: {err} (set SMLAAS_STATE_DIR to a writable "
                              f"directory)") from err

    def _verified(self, signed: SignedRelease, whose: str) -> Release:
        release = signed.verify(self._key)
        if release.owner != self.fingerprint:
            raise ReleaseError(f"{whose} release names owner {release.owner}, the key "
                               f"trusted here is {self.fingerprint}")
        now = self._clock()
        if release.expired(now):
            raise ReleaseError(f"{whose} release v{release.version} expired "
                               f"{now - release.expires_at:.0f} s ago: the owner has not "
                               f"renewed it (`smlaas owner release --refresh`), or this "
                               f"deployment is no longer the owner's")
        return release

    def _coordinator_release(self, release: Release, *, simulated: bool) -> Release | None:
        """The newer release the coordinator named in ``release`` holds, if it can be asked;
        None when it cannot be reached or has nothing newer."""
        if not self.ask_coordinator or not release.coordinator_address:
            return None
        from smlaas.coordinator.client import CoordinatorClient, coordinator_policy
        from smlaas.transport.addresses import parse_address

        try:
            host, port = parse_address(release.coordinator_address, what="the coordinator")
            client = CoordinatorClient(host, port, roots=self.roots, policy=coordinator_policy(
                release.coordinator_mrenclave, simulated=simulated),
                timeout_s=COORDINATOR_TIMEOUT_S)
            fetched = client.release()
            instance = (client.instance or b"").hex()
        except (SmlaasError, OSError, ProtocolError) as err:
            logger.info("the coordinator at %s could not be asked for the current release "
                        "(%s); going by what the gateway staples", release.coordinator_address,
                        err)
            return None
        if instance != release.coordinator_instance:
            logger.warning("%s is another coordinator instance than the release names; its "
                           "answer is ignored", release.coordinator_address)
            return None
        if fetched is None:
            return None
        current = self._verified(fetched, "the coordinator's")
        newer = (current.version, current.issued_at) > (release.version, release.issued_at)
        return current if newer else None
