"""Replica slots: the manifest's replica count bounds how many live enclaves hold a stage key.

Stage ``k`` has ``manifest.replicas_of(k)`` slots, numbered from 0. A registering replica
claims one (the ``slot`` it asks for: its replica number) *before* its key is released, and
holds it for as long as the connection its registration came on stays open and keeps sending
heartbeats: the coordinator's server keeps that very TLS connection (:mod:`server`) as the
lease. A replica that dies (SIGKILL included) closes it, and the slot is free at once for its
restart; one the host cuts off from the coordinator stops heartbeating and loses the slot
after :data:`LEASE_S`, and genuine worker code stops serving (and exits) once it cannot renew
its lease. A second registrant for a held slot is refused ``slot_taken`` (retryable: a
restart waits until the old holder's lease ends); a slot number beyond the manifest's count is
refused ``no_slot``. Replacing the manifest revokes every lease of the old one, so no stage
of a superseded manifest keeps serving.

Socket-free: the server calls :meth:`SlotTable.free` when a lease's connection ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from smlaas.coordinator.protocol import Code, refusal

LEASE_S = 10.0
"""A lease with no heartbeat for this long ends (the holder was cut off, not killed)."""
HEARTBEAT_S = 2.0
"""How often a holder renews its lease on its registration connection."""


@dataclass(eq=False)
class Lease:
    role: str
    slot: int
    manifest_digest: str
    revoked: threading.Event = field(default_factory=threading.Event)
    """Set when the holder must stop serving (the manifest it holds was replaced)."""


class SlotTable:
    """Which (role, slot) is held by a live lease."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], Lease] = {}
        self._lock = threading.Lock()

    def claim(self, role: str, slot: int, *, capacity: int, manifest_digest: str) -> Lease:
        """A lease on ``role``'s slot ``slot``, or CoordinatorRefused (no_slot, slot_taken)."""
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < capacity:
            raise refusal(Code.NO_SLOT, f"the owner's manifest has {capacity} replica(s) of "
                          f"{role} (slots 0..{capacity - 1}); slot {slot!r} does not exist")
        with self._lock:
            held = self._held.get((role, slot))
            if held is not None and not held.revoked.is_set():
                raise refusal(Code.SLOT_TAKEN, f"slot {slot} of {role} is held by a live "
                              f"replica; a restarted replica gets it once that replica's "
                              f"connection closes or its lease lapses ({LEASE_S:g} s without "
                              f"a heartbeat)")
            lease = Lease(role, slot, manifest_digest)
            self._held[(role, slot)] = lease
            return lease

    def free(self, lease: Lease) -> None:
        with self._lock:
            if self._held.get((lease.role, lease.slot)) is lease:
                del self._held[(lease.role, lease.slot)]

    def revoke_all_but(self, manifest_digest: str) -> int:
        """Ends every lease held under another manifest; returns how many."""
        with self._lock:
            stale = [key for key, lease in self._held.items()
                     if lease.manifest_digest != manifest_digest]
            for key in stale:
                self._held.pop(key).revoked.set()
        return len(stale)

    def held(self) -> dict[str, list[int]]:
        """role -> the slots held now (for status)."""
        with self._lock:
            out: dict[str, list[int]] = {}
            for role, slot in sorted(self._held):
                out.setdefault(role, []).append(slot)
            return out
