"""Where an installed Python keeps its pieces: what a Gramine manifest must run, mount and trust.

A Gramine manifest names host paths: the interpreter it starts (``libos.entrypoint``), the
directories it makes visible (``fs.mounts``) and the files it hashes into the measurement
(``sgx.trusted_files``). A :class:`PythonLayout` holds those paths for one Python
installation, asked of the interpreter itself (:meth:`PythonLayout.of_interpreter`, run as the
enclave runs it, with ``-I``) or, for the image of ``deploy/Dockerfile``, written down
(:meth:`PythonLayout.image`).

Note "venv". In a virtual environment ``bin/python3`` is a symlink to the base interpreter,
and Gramine starts the real binary (``libos.entrypoint``); what makes ``sys.prefix`` the venv
inside the enclave is ``argv[0]``. CPython's start-up path calculation (``Modules/getpath.py``
in 3.11) takes the program name from ``argv[0]`` (on Linux it reads no ``/proc/self/exe``),
makes ``executable`` its absolute path when it contains a slash, and looks for
``pyvenv.cfg`` beside it and one directory up; finding one, it takes ``home`` from it for the
standard library and keeps ``executable``'s venv as ``sys.prefix``, and ``site`` then adds
the venv's site-packages (and, with ``include-system-site-packages = true``, the base's).
``-I`` does not change any of this: it ignores ``PYTHONHOME`` and the ``PYTHON*`` variables
and the user's site directory, not ``pyvenv.cfg``. Checked with CPython 3.11.7 by starting
the base binary with ``argv[0]`` set to a venv's ``bin/python3`` (``exec -a``), the symlink
removed: ``sys.prefix`` was the venv and its site-packages on ``sys.path``; with ``argv[0] =
python3`` and no ``PATH`` (what a manifest with ``loader.argv = ["python3", ...]`` gives),
``sys.executable`` was empty and ``sys.prefix`` the base installation. So the manifest sets
``loader.argv[0]`` to the venv's interpreter path and trusts ``pyvenv.cfg`` (getpath and
``site`` both read it). ``PYTHONEXECUTABLE`` would work too (CPython 3.11.7 honours it even
under ``-I``), but an environment variable is one more thing to fix in the manifest; Gramine
passes no variable the manifest does not name, so the host cannot set it.

Note "editable". An editable install (``pip install -e``) leaves the package in its source
tree, on ``sys.path`` through a ``.pth`` file or a finder. The manifest then mounts and
trusts the source tree too (every file of it is hashed into MRENCLAVE, so any change to the
checkout changes the measurement); a source tree that is a repository root (``.git`` in it)
is refused, since the whole checkout would be trusted: install non-editable (``pip install
.``) or use the src layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from smlaas.errors import ConfigError

IMAGE_PYTHON_VERSION = "3.11"
"""The Python of ``deploy/Dockerfile`` (``FROM python:3.11-slim``; a test reads the file)."""
IMAGE_PREFIX = "/usr/local"
"""Where the official Python images install CPython (``./configure --prefix=/usr/local``)."""
DEBIAN_OPENSSL_DIR = "/usr/lib/ssl"
"""OPENSSLDIR of Debian's libssl3, which the official images' ``_ssl`` links against."""

_PROBE = r"""
import importlib.util, json, os, sys, sysconfig
spec = importlib.util.find_spec("smlaas")
editable = False
try:
    from importlib.metadata import distribution
    raw = distribution("smlaas").read_text("direct_url.json")
    editable = bool(raw and json.loads(raw).get("dir_info", {}).get("editable"))
except Exception:
    pass
try:
    import ssl
    openssl_dir = os.path.dirname(ssl.get_default_verify_paths().openssl_cafile)
except Exception:
    openssl_dir = ""
shared = sysconfig.get_config_var("Py_ENABLE_SHARED")
libpython = os.path.join(sysconfig.get_config_var("LIBDIR") or "",
                         sysconfig.get_config_var("INSTSONAME") or "")
print(json.dumps({
    "executable": sys.executable, "interpreter": os.path.realpath(sys.executable),
    "prefix": sys.prefix, "base_prefix": sys.base_prefix,
    "version": "%d.%d" % sys.version_info[:2],
    "stdlib": sysconfig.get_path("stdlib"),
    "lib_dynload": sysconfig.get_config_var("DESTSHARED") or "",
    "sys_path": [p for p in sys.path if p and os.path.isdir(p)],
    "smlaas_origin": spec.origin if spec else None, "editable": editable,
    "libpython": libpython if shared and os.path.isfile(libpython) else None,
    "openssl_dir": openssl_dir}))
"""


@dataclass(frozen=True)
class PythonLayout:
    """The paths of one Python installation that runs smlaas (all absolute, host side)."""

    executable: str
    """``argv[0]``: the path the interpreter is started as. A venv's ``bin/python3`` (note
    "venv"), else the interpreter itself."""
    interpreter: str
    """The real binary (symlinks resolved): ``libos.entrypoint``."""
    prefix: str
    base_prefix: str
    version: str
    """``major.minor``."""
    stdlib: str
    lib_dynload: str
    """The standard library's extension modules (inside ``stdlib`` in the usual builds; a
    venv's ``platstdlib`` is the venv's, not this)."""
    import_paths: tuple[str, ...] = ()
    """``sys.path`` beyond the standard library, as ``python -I`` sees it: site-packages,
    directories ``.pth`` files add (an editable install's source tree)."""
    package_dir: str = ""
    """The directory holding the ``smlaas`` package."""
    editable: bool = False
    libpython: str | None = None
    """``libpython3.X.so.1.0`` of a shared build (the binary needs it), else None."""
    openssl_dir: str = ""
    """OPENSSLDIR of the ``ssl`` module's OpenSSL, whose ``openssl.cnf`` it reads at start."""
    notes: tuple[str, ...] = field(default=(), compare=False)

    # -- where it comes from -------------------------------------------------------------
    @classmethod
    def of_interpreter(cls, python: str | Path | None = None) -> PythonLayout:
        """Asks ``python`` (default: this process's interpreter) where its pieces are, with
        ``-I`` as the manifest starts it. ConfigError if it cannot run or import smlaas."""
        command = [str(python or sys.executable), "-I", "-c", _PROBE]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ConfigError(f"cannot run the Python interpreter {command[0]}: {err}") \
                from err
        if done.returncode != 0:
            raise ConfigError(f"{command[0]} -I failed ({done.returncode}): "
                              f"{done.stderr.strip()[-300:]}")
        return cls.from_probe(json.loads(done.stdout))

    @classmethod
    def from_probe(cls, probe: dict[str, Any]) -> PythonLayout:
        """The layout from what ``_PROBE`` printed in the interpreter."""
        if not probe.get("smlaas_origin"):
            raise ConfigError(f"{probe['executable']} cannot import smlaas: install it into "
                              f"that environment (pip install .)")
        stdlib = probe["stdlib"]
        package_dir = str(Path(probe["smlaas_origin"]).parent.parent)
        import_paths = tuple(p for p in probe["sys_path"] if not _under(p, stdlib))
        notes: list[str] = []
        source_trees = [p for p in dict.fromkeys((*import_paths, package_dir))
                        if "site-packages" not in Path(p).parts
                        and "dist-packages" not in Path(p).parts]
        for tree in source_trees:
            if (Path(tree) / ".git").exists():
                raise ConfigError(f"smlaas is an editable install whose source tree {tree} is "
                                  f"a repository root: every file in it would be trusted and "
                                  f"measured; install smlaas non-editable (pip install .)")
            notes.append(f"{tree}: a source tree on sys.path (editable install?), mounted "
                         f"and trusted whole")
        if package_dir not in import_paths:
            import_paths += (package_dir,)  # an editable finder's target, not on sys.path
        return cls(executable=probe["executable"], interpreter=probe["interpreter"],
                   prefix=probe["prefix"], base_prefix=probe["base_prefix"],
                   version=probe["version"], stdlib=stdlib,
                   lib_dynload=probe["lib_dynload"] or f"{stdlib}/lib-dynload",
                   import_paths=import_paths, package_dir=package_dir,
                   editable=bool(probe["editable"]) or bool(source_trees),
                   libpython=probe["libpython"], openssl_dir=probe["openssl_dir"],
                   notes=tuple(notes))

    @classmethod
    def image(cls) -> PythonLayout:
        """The layout of ``deploy/Dockerfile``'s image: CPython from ``python:3.11-slim`` in
        ``/usr/local`` (a shared build), smlaas installed non-editable into its
        site-packages, no venv."""
        version = IMAGE_PYTHON_VERSION
        lib = f"{IMAGE_PREFIX}/lib/python{version}"
        return cls(executable=f"{IMAGE_PREFIX}/bin/python{version}",
                   interpreter=f"{IMAGE_PREFIX}/bin/python{version}",
                   prefix=IMAGE_PREFIX, base_prefix=IMAGE_PREFIX, version=version,
                   stdlib=lib, lib_dynload=f"{lib}/lib-dynload",
                   import_paths=(f"{lib}/site-packages",),
                   package_dir=f"{lib}/site-packages",
                   libpython=f"{IMAGE_PREFIX}/lib/libpython{version}.so.1.0",
                   openssl_dir=DEBIAN_OPENSSL_DIR)

    # -- what a manifest needs -------------------------------------------------------------
    @property
    def venv_config(self) -> str | None:
        """``pyvenv.cfg`` of a venv (note "venv"), else None."""
        if self.prefix == self.base_prefix:
            return None
        return str(PurePosixPath(self.prefix) / "pyvenv.cfg")

    @property
    def openssl_config(self) -> str | None:
        return str(PurePosixPath(self.openssl_dir) / "openssl.cnf") if self.openssl_dir \
            else None

    def trusted(self) -> list[str]:
        """Host paths to trust (a directory ends with ``/``: Gramine trusts what is in it)."""
        paths = [self.interpreter, _dir(self.stdlib), _dir(self.lib_dynload)]
        paths += [p for p in (self.libpython, self.venv_config, self.openssl_config) if p]
        paths += [_dir(p) for p in self.import_paths]
        return _dedupe(paths)

    def mount_roots(self) -> list[str]:
        """Host directories to mount at the same path: each top one holding a trusted path
        (the interpreter's prefixes, the import paths, OpenSSL's directory)."""
        wanted = [self.base_prefix, self.prefix, *self.import_paths,
                  str(PurePosixPath(self.interpreter).parent)]
        if self.libpython:
            wanted.append(str(PurePosixPath(self.libpython).parent))
        if self.openssl_dir:
            wanted.append(self.openssl_dir)
        roots: list[str] = []
        for path in sorted(set(wanted), key=len):
            if not any(_under(path, root) for root in roots):
                roots.append(path)
        return roots

    def describe(self) -> str:
        kind = "venv " + self.prefix if self.venv_config else "installation " + self.prefix
        return (f"Python {self.version} ({kind}; interpreter {self.interpreter}"
                + (", smlaas editable from " + self.package_dir if self.editable else "")
                + ")")

    # -- data -----------------------------------------------------------------------------
    def to_json(self) -> str:
        data = asdict(self)
        data.pop("notes")
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PythonLayout:
        data = json.loads(text)
        data["import_paths"] = tuple(data.get("import_paths", ()))
        return cls(**data)


def _under(path: str, root: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(root))


def _dir(path: str) -> str:
    return path.rstrip("/") + "/"


def _dedupe(paths: list[str]) -> list[str]:
    seen: list[str] = []
    for path in paths:
        if path not in seen:
            seen.append(path)
    return seen
