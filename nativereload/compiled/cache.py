"""The on-disk cache of compiled call extensions: find, validate, build, load.

One file per plan (codegen.Plan), named by the digest of its key (generator
version, cffi version, Python ABI, machine, shapes)::

    $NATIVERELOAD_CACHE_DIR/compiled/_nativereload_calls_<digest>.so
    (default: ${XDG_CACHE_HOME:-~/.cache}/nativereload/compiled/...)

The file is the extension as the compiler wrote it, followed by a trailer::

    \\n#nativereload-compiled 1 <digest of the key> <sha256 of the bytes before the trailer>\\n

Bytes after an ELF's last section are never mapped, so the trailer does not
change what loads. Before an entry is loaded it must be a regular file of
ours that nobody else can write, end with a trailer whose key digest is the
one asked for (else it is *foreign*) and whose checksum matches (else it is
*corrupt*: a truncated or damaged file would otherwise crash dlopen); a
foreign or corrupt entry is rebuilt, never loaded.

Two processes (or threads) compiling the same plan: each compiles into a
temporary name in the same directory and renames it over the entry, so a
reader sees the old file or a complete new one; an advisory lock
(``<name>.lock``, flock) makes the second wait for the first and then find
its result, so the work is done once. A stale lock cannot block anyone: the
kernel drops a dead process's flock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from types import ModuleType

import cffi

from .. import atomicfile
from ..build import find_compiler
from ..errors import CompileError
from . import codegen

__all__ = ["CACHE_ENV", "cache_dir", "compiler", "load_cached", "build"]

logger = logging.getLogger("nativereload")

CACHE_ENV = "NATIVERELOAD_CACHE_DIR"
_TRAILER_MAGIC = b"\n#nativereload-compiled 1 "
_TRAILER_SIZE = len(_TRAILER_MAGIC) + 64 + 1 + 64 + 1
LOCK_TIMEOUT = 300.0           # seconds to wait for another process's compile before compiling anyway
STALE_SECONDS = 3600.0         # a build directory or partial file this old was left by a process that died

_loaded: dict[str, ModuleType] = {}     # digest -> the extension, imported once per process
_loaded_lock = threading.Lock()


def cache_dir() -> str:
    """Where compiled extensions are kept: $NATIVERELOAD_CACHE_DIR, else $XDG_CACHE_HOME/nativereload, else
    ~/.cache/nativereload; then ``compiled/``."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg if xdg and os.path.isabs(xdg) else os.path.expanduser("~/.cache"), "nativereload")
    return os.path.join(base, "compiled")


def compiler() -> list[str] | None:
    """The C compiler command (``build.find_compiler``); None if none is found, or $CC names none on PATH."""
    argv = find_compiler()
    return argv if argv and shutil.which(argv[0]) else None


def _entry_path(plan: codegen.Plan) -> str:
    return os.path.join(cache_dir(), plan.module_name + ".so")


def _trailer(digest: str, body: bytes) -> bytes:
    return _TRAILER_MAGIC + digest.encode() + b" " + hashlib.sha256(body).hexdigest().encode() + b"\n"


def _check_entry(path: str, digest: str) -> str | None:
    """None if ``path`` is a sound entry for ``digest``; else why not ("missing", or what is wrong)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return "owned or writable by another user"
        if info.st_size <= _TRAILER_SIZE:
            return "corrupt (too short)"
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read()
    finally:
        os.close(fd)
    body, trailer = data[:-_TRAILER_SIZE], data[-_TRAILER_SIZE:]
    if not trailer.startswith(_TRAILER_MAGIC):
        return "corrupt (no trailer)"
    if trailer[len(_TRAILER_MAGIC):len(_TRAILER_MAGIC) + 64] != digest.encode():
        return "foreign (built for another key)"
    if trailer != _trailer(digest, body):
        return "corrupt (checksum mismatch)"
    return None


def _import(plan: codegen.Plan, path: str) -> ModuleType:
    gil_enabled = getattr(sys, "_is_gil_enabled", lambda: True)
    gil_before = gil_enabled()
    loader = importlib.machinery.ExtensionFileLoader(plan.module_name, path)
    spec = importlib.util.spec_from_file_location(plan.module_name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    if not gil_before and gil_enabled():
        # A free-threaded interpreter turns the GIL back on for an extension that does not declare it
        # can run without it; cffi's generated modules do so only in cffi versions that support it.
        logger.warning("compiled calls: importing %s turned the GIL back on (cffi %s does not mark its modules "
                       "free-threading safe) — use calls='gate' on free-threaded builds with this cffi, or "
                       "PYTHON_GIL=0", plan.module_name, cffi.__version__)
    return module


def load_cached(plan: codegen.Plan) -> ModuleType | None:
    """The plan's extension if this process has it or the cache holds a sound entry; None otherwise.

    Raises:
        CompileError: a sound entry failed to load (e.g. a cache on a noexec filesystem).
    """
    module = _loaded.get(plan.digest)
    if module is not None:
        return module
    path = _entry_path(plan)
    with _loaded_lock:
        module = _loaded.get(plan.digest)
        if module is not None:
            return module
        problem = _check_entry(path, plan.digest)
        if problem is not None:
            if problem != "missing":
                logger.info("compiled calls: cache entry %s is %s; it will be rebuilt", path, problem)
            return None
        try:
            module = _import(plan, path)
        except Exception as exc:
            raise CompileError(f"cannot load the compiled call extension {path}: {exc}", reason=str(exc),
                               hint=f"point {CACHE_ENV} at a directory on a filesystem that allows executable "
                                    "mappings") from exc
        _loaded[plan.digest] = module
        return module


def build(plan: codegen.Plan) -> ModuleType:
    """The plan's extension: from this process, from the cache, or compiled now (and cached). Blocks.

    Raises:
        CompileError: no compiler, the compiler failed, or the result could not be written or loaded.
    """
    module = load_cached(plan)
    if module is not None:
        return module
    argv = compiler()
    if argv is None:
        raise CompileError("no C compiler found (looked for $CC, cc, gcc and clang on PATH)", reason="no compiler",
                           hint="install one (e.g. apt-get install gcc), or use calls='gate'")
    directory = cache_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise CompileError(f"cannot create the cache directory {directory}: {exc.strerror}", reason=str(exc),
                           hint=f"set {CACHE_ENV} to a writable directory") from None
    _sweep(directory)
    with _compile_lock(os.path.join(directory, plan.module_name + ".lock")):
        module = load_cached(plan)          # another process may have built it while we waited
        if module is not None:
            return module
        started = time.perf_counter()
        _compile(plan, argv, directory)
        elapsed = time.perf_counter() - started
        module = load_cached(plan)
        if module is None:
            raise CompileError(f"the compiled call extension {_entry_path(plan)} vanished or was damaged right "
                               "after it was written", reason="entry unsound after writing")
    logger.info("compiled calls: built %d call shapes in %.2f s into %s", len(plan.shapes), elapsed,
                _entry_path(plan))
    return module


def _sweep(directory: str) -> None:
    """Remove build directories and partial files that a process killed while compiling left behind.

    (An interpreter that exits while the background compile runs kills that daemon thread mid-build.)
    """
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(".build-") or name.endswith(".partial")):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.lstat(path).st_mtime < STALE_SECONDS:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        except OSError:
            pass


class _compile_lock:
    """An advisory lock on one cache entry (flock), given up after LOCK_TIMEOUT: the rename keeps it safe."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "_compile_lock":
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return self
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    return self
            time.sleep(0.05)

    def __exit__(self, *exc_info: object) -> None:
        if self.fd is not None:
            os.close(self.fd)           # closing drops the flock


def _compile(plan: codegen.Plan, argv: list[str], directory: str) -> None:
    """Generate, compile, add the trailer, and rename into place."""
    work = tempfile.mkdtemp(prefix=".build-", dir=directory)
    try:
        source = os.path.join(work, plan.module_name + ".c")
        codegen.write_source(plan, source)
        output = os.path.join(work, plan.module_name + ".so")
        include = sysconfig.get_paths()["include"]
        command = [*argv, *codegen.COMPILE_FLAGS, f"-I{include}", source, "-o", output]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CompileError(f"the C compiler could not run: {exc}", reason=str(exc)) from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            headers = not os.path.exists(os.path.join(include, "Python.h"))
            raise CompileError(
                "the C compiler failed on the compiled call extension "
                f"({' '.join(command)}):\n" + "\n".join(lines[-20:]),
                reason="\n".join(lines[-20:]),
                hint=("install Python's headers (e.g. apt-get install python3-dev)" if headers else
                      "please report this with the cdef; calls='gate' serves meanwhile"))
        with open(output, "rb") as stream:
            body = stream.read()
        atomicfile.write_bytes(_entry_path(plan), body + _trailer(plan.digest, body), durable=True, mode=0o600)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def forget_loaded_for_tests() -> None:
    """Make :func:`load_cached` look at the disk again (the extensions stay imported)."""
    with _loaded_lock:
        _loaded.clear()

