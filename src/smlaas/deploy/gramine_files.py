"""Which files a Gramine manifest lets its enclave open: the check behind ``smlaas``'s
manifests (``tests/component/test_gramine_manifest_files.py`` runs every role natively and
holds every file it opened against the manifest).

Gramine's rules, as this module applies them (Gramine's manifest syntax and ``libos/src/fs``):

- A path inside the enclave resolves through the ``fs.mounts`` entry with the longest ``path``
  prefix: a ``chroot`` mount maps it to the host file under its ``uri``; a ``tmpfs`` mount
  keeps it in enclave memory (readable, writable, lost at exit). A path under no mount is
  not there (the enclave sees ENOENT).
- With ``sgx.file_check_policy = "strict"`` (the default) a host file may be opened only if
  it is a trusted file (``sgx.trusted_files``: read only, its hash checked; a URI ending in
  ``/`` trusts everything under it) or an allowed file (``sgx.allowed_files``: read and
  write, unchecked). Anything else under a mount is refused (EACCES).
- ``/proc``, ``/dev`` and ``/sys/devices/system/{cpu,node}`` are Gramine's own pseudo file
  systems: only what Gramine emulates exists there (:data:`PSEUDO_FILES`).
- Gramine brings its own glibc (``{{ gramine.runtimedir() }}``, mounted at ``/lib``): a
  process in the enclave loads those libraries (:data:`GRAMINE_GLIBC`) instead of the host's.

A file the check is given is a *host* path, as a native run opened it. It is first turned into
the enclave path that reaches it (the mount whose ``uri`` holds it), then resolved as the
enclave would resolve that path, so a mount shadowed by another is caught too.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from smlaas.errors import ConfigError

LIBOS_STANDIN = "/gramine/libsysdb.so"
"""What ``{{ gramine.libos }}`` stands for when a template is checked without Gramine."""
RUNTIME_STANDIN = "/gramine/runtime/glibc"
"""What ``{{ gramine.runtimedir() }}`` stands for."""

GRAMINE_GLIBC = frozenset({
    "ld-linux-x86-64.so.2", "libc.so.6", "libdl.so.2", "libm.so.6", "libmvec.so.1",
    "libnsl.so.1", "libnss_compat.so.2", "libnss_db.so.2", "libnss_dns.so.2",
    "libnss_files.so.2", "libpthread.so.0", "libresolv.so.2", "librt.so.1",
    "libthread_db.so.1", "libutil.so.1", "libanl.so.1"})
"""The libraries of Gramine's patched glibc (``subprojects/packagefiles/glibc-2.40/meson.build``
in gramineproject/gramine: installed into the runtime directory)."""

PSEUDO_FILES = tuple(re.compile(pattern) for pattern in (
    # libos/src/fs/proc/fs.c (and thread.c, info.c)
    r"/proc/(meminfo|cpuinfo|stat|sys/kernel/pid_max)",
    r"/proc/(self|\d+)(/task/\d+)?(/(maps|cmdline|status|statm|stat|root|cwd|exe|fd(/\d+)?))?",
    # libos/src/fs/dev/fs.c and attestation.c
    r"/dev/(null|zero|random|urandom|tty|fd(/\d+)?|stdin|stdout|stderr)",
    r"/dev/attestation(/.*)?",
    # libos/src/fs/sys/fs.c
    r"/sys/devices/system/(cpu|node)(/.*)?",
    # libos/src/fs/etc/fs.c, with sys.enable_extra_runtime_domain_names_conf = true
    r"/etc/resolv\.conf",
))
"""Paths Gramine emulates itself (regular expressions over the whole path)."""
PSEUDO_ROOTS = ("/proc", "/dev", "/sys")


@dataclass(frozen=True)
class Opened:
    """One file (or directory) a process opened, as the host saw it."""

    path: str
    write: bool = False
    directory: bool = False
    how: str = "open"
    """What saw it: ``open`` (the audit hook), ``map`` (a mapping in /proc/PID/maps),
    ``list`` (a directory listed), ``native`` (a system call traced outside Python)."""


@dataclass(frozen=True)
class Refusal:
    """A file the enclave could not open as the native run did."""

    path: str
    how: str
    write: bool
    reason: str
    absent: bool
    """The enclave would see ENOENT (the path is not there), not EACCES."""

    def line(self) -> str:
        return f"{self.path} ({self.how}{', written' if self.write else ''}): {self.reason}"


@dataclass(frozen=True)
class Mount:
    path: str
    uri: str
    """The host directory or file ('' for tmpfs)."""
    kind: str = "chroot"


@dataclass(frozen=True)
class ManifestFiles:
    """A manifest's file rules: its mounts, trusted files and allowed files (host paths)."""

    mounts: tuple[Mount, ...]
    trusted: tuple[str, ...]
    allowed: tuple[str, ...]
    domain_names: bool = False
    """``sys.enable_extra_runtime_domain_names_conf``: Gramine writes /etc/resolv.conf."""

    @classmethod
    def from_toml(cls, text: str) -> ManifestFiles:
        """From a manifest template, its ``gramine-manifest`` placeholders replaced by
        :data:`LIBOS_STANDIN` and :data:`RUNTIME_STANDIN`."""
        rendered = text.replace("{{ gramine.libos }}", LIBOS_STANDIN) \
            .replace("{{ gramine.runtimedir() }}", RUNTIME_STANDIN)
        try:
            data = tomllib.loads(rendered)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"not a Gramine manifest: {err}") from err
        mounts = tuple(Mount(path=m["path"], uri=_host(m.get("uri", "")),
                             kind=m.get("type", "chroot"))
                       for m in data.get("fs", {}).get("mounts", []))
        sgx = data.get("sgx", {})
        trusted = tuple(_host(t if isinstance(t, str) else t["uri"])
                        for t in sgx.get("trusted_files", []))
        allowed = tuple(_host(a) for a in sgx.get("allowed_files", []))
        domain = bool(data.get("sys", {}).get("enable_extra_runtime_domain_names_conf"))
        return cls(mounts=mounts, trusted=trusted, allowed=allowed, domain_names=domain)

    def without_trusted(self, entry: str) -> ManifestFiles:
        """The same rules with one trusted entry removed (to show the check notices)."""
        if entry not in self.trusted:
            raise ConfigError(f"{entry} is not a trusted entry of this manifest")
        return ManifestFiles(self.mounts, tuple(t for t in self.trusted if t != entry),
                             self.allowed, self.domain_names)

    # -- the check -----------------------------------------------------------------------
    def check(self, opened: Iterable[Opened]) -> list[Refusal]:
        """Every file of ``opened`` the enclave could not open as the native run did (sorted,
        each path and way once). A file read in ``/tmp`` must have been written by the same
        run first, or hold a file it wrote: the enclave's ``/tmp`` starts empty."""
        items = list(opened)
        written = {_normal(o.path) for o in items if o.write}
        written |= {str(parent) for path in written for parent in PurePosixPath(path).parents}
        found = {Refusal(o.path, o.how, o.write, why, absent)
                 for o in items
                 for why, absent in [self._verdict(o, written)] if why is not None}
        return sorted(found, key=lambda r: (r.path, r.how, r.write))

    def problems(self, opened: Iterable[Opened]) -> list[str]:
        """:meth:`check`, one line each."""
        return [r.line() for r in self.check(opened)]

    def _verdict(self, opened: Opened, written: set[str]) -> tuple[str | None, bool]:
        """(why the enclave could not open it, whether because it is absent there)."""
        path = _normal(opened.path)
        if _under_any(path, PSEUDO_ROOTS):
            if any(p.fullmatch(path) for p in PSEUDO_FILES):
                return None, False
            return "not emulated by Gramine (ENOENT)", True
        if path == "/etc/resolv.conf" and self.domain_names:
            return None, False
        name = PurePosixPath(path).name
        if name in GRAMINE_GLIBC and not opened.write:
            path = f"{RUNTIME_STANDIN}/{name}"  # Gramine's glibc, found first at /lib
        inside = self.enclave_path(path)
        if inside is None:
            if self._in_tmpfs(path):
                if opened.write or opened.directory or path in written:
                    return None, False
                return "not written first: the enclave's /tmp starts empty (ENOENT)", True
            return "under no fs.mounts entry: not in the enclave (ENOENT)", True
        mount, host = self.resolve(inside)
        if mount.kind == "tmpfs":
            return None, False
        if host != path:
            return (f"the enclave path {inside} resolves to {host} (mount {mount.path} "
                    f"shadows it)"), False
        if opened.directory:
            return None, False  # listing a mounted directory needs no trust
        if _covered(path, self.allowed):
            return None, False
        if _covered(path, self.trusted):
            return ("written, but trusted files are read-only" if opened.write else None), False
        return ("written, but neither allowed nor trusted" if opened.write
                else "neither trusted nor allowed (refused: EACCES)"), False

    def _in_tmpfs(self, path: str) -> bool:
        try:
            mount, _ = self.resolve(path)
        except ConfigError:
            return False
        return mount.kind == "tmpfs"

    # -- path resolution -------------------------------------------------------------------
    def enclave_path(self, host_path: str) -> str | None:
        """The enclave path through which ``host_path`` is reached (the mount whose host
        directory holds it; identity mounts first), None if no mount reaches it."""
        candidates = [(m, f"{m.path.rstrip('/')}/{rest}".rstrip("/") if rest else m.path)
                      for m in self.mounts if m.kind == "chroot"
                      for rest in [_relative(host_path, m.uri)] if rest is not None]
        if not candidates:
            return None
        candidates.sort(key=lambda c: (c[0].path != c[0].uri, -len(c[0].uri)))
        return candidates[0][1]

    def resolve(self, enclave_path: str) -> tuple[Mount, str]:
        """The mount an enclave path resolves through (the longest ``path`` prefix) and the
        host path it reaches ('' in a tmpfs)."""
        best: Mount | None = None
        for mount in self.mounts:
            if _relative(enclave_path, mount.path) is not None and \
                    (best is None or len(mount.path) > len(best.path)):
                best = mount
        if best is None:
            raise ConfigError(f"{enclave_path} is under no mount")
        rest = _relative(enclave_path, best.path)
        if best.kind == "tmpfs":
            return best, ""
        return best, f"{best.uri.rstrip('/')}/{rest}".rstrip("/") if rest else best.uri


def _host(uri: str) -> str:
    """``file:/a/b/`` -> ``/a/b/`` (a trailing slash kept: a directory entry)."""
    return uri[len("file:"):] if uri.startswith("file:") else uri


def _normal(path: str) -> str:
    return str(PurePosixPath(path))


def _relative(path: str, root: str) -> str | None:
    """``path`` relative to ``root`` ('' when equal), None when not under it."""
    if not root:
        return None
    root_path, inner = PurePosixPath(root.rstrip("/") or "/"), PurePosixPath(path)
    if inner == root_path:
        return ""
    if inner.is_relative_to(root_path):
        return str(inner.relative_to(root_path))
    return None


def _under_any(path: str, roots: Iterable[str]) -> bool:
    return any(_relative(path, root) is not None for root in roots)


def _covered(path: str, entries: Iterable[str]) -> bool:
    """Whether a trusted or allowed entry names ``path`` or a directory holding it."""
    for entry in entries:
        if entry.endswith("/"):
            if _relative(path, entry) not in (None, ""):
                return True
        elif _normal(entry) == path:
            return True
    return False
