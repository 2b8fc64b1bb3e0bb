"""One loaded image of a module: a private copy of a .so, dlopened, its functions resolved.

Life of an Image (each step is a method below):
    Image.copy()  copy the source into the registry's directory -> check the
                  copy is a complete ELF for this machine (and one the trust
                  rules accept) -> give it a private soname. Nothing of it has
                  run yet: read_interface() reads the interface it embeds.
    open()        dlopen(RTLD_NOW | RTLD_LOCAL) -> resolve every declared
                  function. discard() undoes either step on failure: no copy,
                  no handle, nothing leaks.
    (serving)     the image's ImageGate counts the calls in flight.
    close()       called once by the gate when the retired image drains:
                  dlclose -> drop cffi's bookkeeping -> ask the loader whether
                  the image is really gone -> delete the copy, or mark the
                  image "leaked" and keep the copy if the loader kept it.

Why a private copy, always: glibc returns the already-loaded image for a path
(and for a hard link or symlink: it also matches by device and inode) that it
has seen, so dlopen of the rebuilt file would silently keep the old code; and
overwriting a file that is mapped crashes the process (SIGBUS/SIGSEGV). A
byte-for-byte copy under a new name is a new image and is ours alone.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from typing import Callable

import cffi

from . import dynamic, elf, elfcheck
from . import interface as _interface
from .errors import LoadError, ModuleNotFound, SymbolError
from .lifecycle import Hooks
from .trust import Trust

__all__ = ["Image"]

logger = logging.getLogger(__name__.rpartition(".")[0])

_RTLD_NOW = getattr(os, "RTLD_NOW", 2)
_RTLD_LOCAL = getattr(os, "RTLD_LOCAL", 0)
_RTLD_NOLOAD = getattr(os, "RTLD_NOLOAD", 4)

# The dynamic loader, called directly rather than through ffi.dlopen(path):
# on failure cffi's in-line dlopen falls back to ctypes.util.find_library
# (subprocesses, ~10 ms) and its error text no longer says what dlopen said.
# The function objects are bound once, here: the first attribute lookup on a
# cffi lib calls dlsym, which clears the thread's dlerror() state.
_dl_ffi = cffi.FFI()
_dl_ffi.cdef("void *dlopen(const char *, int); int dlclose(void *); char *dlerror(void);")
try:
    _dl_lib = _dl_ffi.dlopen(None)
    _dl_lib.dlopen
except (OSError, AttributeError):   # glibc < 2.34 keeps these in libdl
    _dl_lib = _dl_ffi.dlopen("libdl.so.2")
_dlopen = _dl_lib.dlopen
_dlclose = _dl_lib.dlclose
_dlerror = _dl_lib.dlerror

def _dl_error_text() -> str:
    message = _dlerror()
    return _dl_ffi.string(message).decode(errors="replace") if message else "unknown dlopen error"


class Image:
    """One private copy of a module's library: copied by :meth:`copy`, then dlopened by :meth:`open`.

    Attributes:
        module: the module's name.
        generation: this image's generation (1 for the first load).
        source: the user's file it was copied from.
        copy_path: the private copy that is mapped.
        declarations: the Declarations its functions were resolved with (after open()).
        missing: declared functions the library does not export (allowed by missing="lazy").
        gate: its ImageGate (functions, in-flight counts), after open().
        state: "active", "retired", "leaked" or "closed".
        signature: (device, inode, size, mtime) of the source when it was copied.
    """

    def __init__(self) -> None:
        raise TypeError("use Image.copy()")

    @classmethod
    def copy(cls, *, module: str, generation: int, source: str, directory: str,
             on_closed: Callable[["Image"], None], refused: str, trust: Trust | None = None,
             original: tuple[int, bytes] | None = None) -> "Image":
        """Copy ``source`` into ``directory`` and check the copy; nothing of it runs.

        Args:
            refused: what a failure means for the caller, appended to every
                error message (e.g. "reload refused; generation 3 still serving").
            trust: who may have written the file, and which contents may load (trust.py).
            on_closed: called once, with this image, after :meth:`close`.
            original: when ``source`` is a kept copy (rollback), the bytes its
                private soname replaced, so that content_hash() is the build's.

        Raises:
            ModuleNotFound: ``source`` does not exist (any more).
            LoadError: not a regular file, the copy failed, the copy is not a
                loadable ELF, or the trust rules refuse it.
        Nothing is left behind on failure.
        """
        self = object.__new__(cls)
        self.module = module
        self.generation = generation
        self.source = source
        self.declarations = None
        self.missing: tuple[str, ...] = ()
        self.state = "active"
        self.gate = None
        self.objects = None            # the registry's call policies for this image (registry._Objects)
        self.held_timer = None         # the registry's "still held" warning, cancelled at close
        self.soname = None             # what the copy's DT_SONAME was made (dynamic.py)
        self.signature: tuple[int, int, int, int]     # the source's (dev, ino, size, mtime): set by _copy below
        self.embeds_interface = False
        self.hooks: Hooks | None = None      # its lifecycle hooks (lifecycle.py), after open()
        self.on_closing: Callable[["Image"], None] | None = None   # the registry's: runs fini before the unmap
        self.fini_reason: int | None = None  # set when the reason is known before the close (an abort)
        self.original_bytes: tuple[int, bytes] | None = None    # (offset, bytes) the private soname replaced
        self._hash: str | None = None
        self.on_closed = on_closed     # the registry's: called once, after close()
        self._handle = None
        self._lib = None
        self._lock = threading.Lock()
        self._owner = os.getpid()          # a forked child never deletes its parent's copy
        self._started = time.perf_counter()
        self.copy_path = self._copy(directory, refused, trust, original)
        return self

    def read_interface(self, serving: _interface.Interface | None = None) -> _interface.Interface | None:
        """The interface the copy embeds (None if none), read with pread: nothing of the library runs.

        ``serving``: returned as is when the embedded one has the same digest (no decoding).

        Raises:
            InterfaceError: the embedded interface is corrupt or of a newer format.
        """
        fd = os.open(self.copy_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            found = _interface.read_fd(fd, source=self.source, serving=serving)
        finally:
            os.close(fd)
        self.embeds_interface = found is not None
        return found

    def open(self, declarations: _interface.Declarations, *, gate_type: type, refused: str,
             missing: str = "error") -> None:
        """dlopen the copy and resolve every function of ``declarations``; make the image's gate.

        Args:
            missing: "error": a declared function the library does not export
                refuses the load (SymbolError); "lazy": it is allowed, and
                calling it raises SymbolError.

        Raises:
            LoadError: dlopen failed. SymbolError: declared functions are missing.
            The caller discards the image on failure.
        """
        self.declarations = declarations
        self._dlopen(refused)
        functions = self._resolve(refused, lazy=missing == "lazy")
        self.hooks = Hooks(self._lib, self.module, self.generation)
        self.functions = functions       # symbol -> cffi ABI function object (the gate path's entries)
        self.compiled = frozenset()      # symbols served by compiled entries (attach_calls)
        self.gate = gate_type(functions, self.close)
        self.load_seconds = time.perf_counter() - self._started

    def discard(self) -> None:
        """Undo a load that failed part-way, or that was prepared and aborted: close the handle, delete the copy.

        The image never served (no call can be inside it). An aborted image
        whose init ran gets its fini first (``on_closing``).
        """
        with self._lock:
            if self.state in ("closed", "leaked"):
                return
            self.state = "closed"
        if self.on_closing is not None:        # the registry sets it only once open() made the hooks
            try:
                self.on_closing(self)
            except Exception:
                logger.exception("module '%s' generation %d: error before closing", self.module, self.generation)
        self._unmap()
        self._remove_partial(None, self.copy_path)

    def read_original(self) -> bytearray:
        """The bytes the copy was made from (what the user built).

        Raises:
            OSError: the copy is gone (a tmp cleaner removed it).
        """
        fd = os.open(self.copy_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            # One read into one buffer (a reload of a 20 MB module pays for this
            # copy, so no chunks to join), then the private soname put back in place.
            data = bytearray(os.fstat(fd).st_size)
            done = 0
            with memoryview(data) as view:
                while done < len(view):
                    read = os.preadv(fd, [view[done:]], done)
                    if read == 0:
                        break
                    done += read
            del data[done:]             # (our private copy does not shrink; if it did, what is there)
        finally:
            os.close(fd)
        if self.original_bytes is not None:
            at, original = self.original_bytes
            end = min(at + len(original), len(data))
            if at < end:
                data[at:end] = original[:end - at]
        return data

    def content_hash(self) -> str:
        """SHA-256 (hex) of the library as it was copied (the soname this module changed restored); cached.

        Raises:
            OSError: the copy is gone (a tmp cleaner removed it) and was never hashed.
        """
        if self._hash is None:
            self._hash = hashlib.sha256(self.read_original()).hexdigest()
        return self._hash

    def cached_hash(self) -> str | None:
        """The first 12 hex digits of content_hash() if it was computed already, else None."""
        return None if self._hash is None else self._hash[:12]

    def same_content(self, other: "Image") -> bool:
        """Whether ``other`` was copied from byte-identical contents (cheap when the file did not change)."""
        if self.signature == other.signature:
            return True            # the very same file, untouched since: no need to read it
        if self.signature[2] != other.signature[2]:
            return False           # sizes differ
        try:
            return self.content_hash() == other.content_hash()
        except OSError:
            return False

    # -- loading --------------------------------------------------------------------------

    def _copy(self, directory: str, refused: str, trust: Trust | None = None,
              original: tuple[int, bytes] | None = None) -> str:
        """Copy the source to a new file in ``directory`` and check it is a complete ELF; return its path."""
        try:
            # Never block: O_NONBLOCK opens a FIFO without waiting for a
            # writer; a device or a directory is refused before it is read.
            kind = os.stat(self.source).st_mode
            if not stat.S_ISREG(kind):
                raise self._not_regular(kind, refused)
            source_fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ModuleNotFound(
                f"module '{self.module}': {self.source} does not exist ({refused}) — build it, or check the "
                "path", module=self.module, searched=(self.source,)) from None
        except OSError as exc:
            raise self._load_error(f"cannot open it: {exc.strerror}", refused, exc) from None
        copy_fd = None
        copy_path = None
        try:
            st = os.fstat(source_fd)
            if not stat.S_ISREG(st.st_mode):            # replaced between the stat and the open
                raise self._not_regular(st.st_mode, refused)
            if trust is not None:
                trust.check_source(self.source, source_fd, module=self.module, refused=refused)
            self.signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            size = st.st_size
            # mkstemp: O_CREAT|O_EXCL, mode 0600, a fresh name (so a fresh
            # inode glibc has never seen) inside the registry's 0700 directory.
            copy_fd, copy_path = tempfile.mkstemp(prefix=f"{self.module}.g{self.generation}.", suffix=".so",
                                                  dir=directory)
            copied = 0
            while copied < size:
                sent = os.sendfile(copy_fd, source_fd, copied, size - copied)
                if sent == 0:
                    break          # the source shrank while we copied: the check below rejects it
                copied += sent
            elfcheck.check_fd(copy_fd)
            if trust is not None:
                trust.check_content(self.source, copy_fd, module=self.module, refused=refused)
            # Not findable by its soname: a dlopen("libfoo.so.1") elsewhere in the
            # process must get the system's library, never this copy.
            self.soname, self.original_bytes = dynamic.make_soname_private(copy_fd)
            if original is not None:          # the source is itself a copy (a kept file): hash what the user built
                self.original_bytes = original
        except elf.ELFError as exc:
            self._remove_partial(copy_fd, copy_path)
            raise self._load_error(str(exc), refused, exc) from None
        except OSError as exc:
            self._remove_partial(copy_fd, copy_path)
            # Only a full or unwritable directory is the directory's fault.
            hint = None
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                hint = ("free space there, or point nativereload at another directory with TMPDIR or "
                        "Registry(tmpdir=...)")
            elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and copy_fd is None:
                hint = "point nativereload at a writable directory with TMPDIR or Registry(tmpdir=...)"
            where = f"into {directory}" if copy_fd is None or hint else f"from {self.source}"
            raise self._load_error(f"cannot copy it {where}: {exc.strerror or exc}", refused, exc,
                                   hint=hint) from None
        except BaseException:
            self._remove_partial(copy_fd, copy_path)
            raise
        finally:
            os.close(source_fd)
        os.close(copy_fd)
        return copy_path

    def _not_regular(self, mode: int, refused: str) -> LoadError:
        return self._load_error(f"it is {elf.file_type(mode)}, not a regular file", refused, None,
                                hint="give the path of the built library (.so) itself")

    @staticmethod
    def _remove_partial(fd: int | None, path: str | None) -> None:
        if fd is not None:
            os.close(fd)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _dlopen(self, refused: str) -> None:
        # RTLD_NOW: an unresolved symbol fails here, not at some later call.
        # RTLD_LOCAL: this image's symbols never resolve another image's calls.
        handle = _dlopen(os.fsencode(self.copy_path), _RTLD_NOW | _RTLD_LOCAL)
        if handle == _dl_ffi.NULL:
            reason = _dl_error_text()
            hint = None
            if "failed to map segment" in reason or _is_noexec(self.copy_path):
                hint = ("the temporary directory is mounted noexec: set TMPDIR, or pass Registry(tmpdir=...), "
                        "to a directory on a filesystem that allows executable mappings")
            elif "undefined symbol" in reason:
                hint = ("the library calls a function no loaded library defines: define it, or link the "
                        "library against the one that does, and rebuild")
            raise self._load_error(reason, refused, None, hint=hint)
        self._handle = handle
        # The cffi backend's library object over the handle we opened: what
        # ffi.dlopen(handle) builds, minus the per-library accessor class and
        # the entries ffi.dlopen appends to ffi._libraries and
        # ffi._function_caches and never removes (~6 KB per reload), and at
        # half the cost. Its close_lib() dlcloses the handle: exactly once,
        # we never call dlclose on it ourselves.
        self._lib = self.declarations.ffi._backend.load_library(handle, 0)

    def _resolve(self, refused: str, *, lazy: bool) -> dict:
        """Look up every declared function now, so a reload is refused before anything switches."""
        lib = self._lib
        functions = {}
        missing = []
        for name, ctype in self.declarations.function_types.items():
            try:
                functions[name] = lib.load_function(ctype, name)
            except AttributeError:       # dlsym() found nothing
                missing.append(name)
        self.missing = tuple(missing)
        if missing and not lazy:
            names = ", ".join(f"'{name}'" for name in missing)
            noun = "symbol" if len(missing) == 1 else "symbols"
            raise SymbolError(
                f"module '{self.module}': {noun} {names} not found in {self.source} ({refused}) — export "
                f"{'it' if len(missing) == 1 else 'them'} from the library, declare only what it exports, or "
                "load with missing='lazy' to allow declared functions the library does not export",
                module=self.module, symbols=tuple(sorted(missing)))
        return functions

    def _load_error(self, reason: str, refused: str, exc: BaseException | None, hint: str | None = None
                    ) -> LoadError:
        message = f"module '{self.module}': cannot load {self.source}: {reason} ({refused})"
        if hint:
            message += f" — {hint}"
        elif isinstance(exc, elf.ELFError):
            message += " — rebuild it; if a build is still writing it, reload when it has finished"
        return LoadError(message, module=self.module, path=self.source, reason=reason)

    # -- closing --------------------------------------------------------------------------

    def _unmap(self) -> bool:
        """dlclose our handle; return True if the loader really unmapped the image."""
        lib, self._lib = self._lib, None
        if lib is not None:
            lib.close_lib()
        elif self._handle is not None:
            _dlclose(self._handle)
        self._handle = None
        # dlclose returning 0 does not mean the image is gone: ask the loader
        # (RTLD_NOLOAD finds a loaded object by name, ~4 µs).
        probe = _dlopen(os.fsencode(self.copy_path), _RTLD_NOW | _RTLD_NOLOAD)
        if probe != _dl_ffi.NULL:
            _dlclose(probe)
            return False
        return True

    def attach_calls(self, functions: dict, compiled: frozenset) -> None:
        """Serve from ``functions`` (compiled entries for the symbols in ``compiled``); nothing if already closed.

        One assignment of the gate's mapping: Funcs find the new entries at
        their next call; a call in flight finishes on what it looked up.
        """
        with self._lock:
            if self.state not in ("closed", "leaked"):
                self.gate.functions = functions
                self.compiled = compiled

    def retire(self) -> None:
        """Stop new calls from entering; the image closes when its last call returns (maybe now)."""
        with self._lock:
            if self.state == "active":
                self.state = "retired"
        self.gate.retire()

    def close(self) -> None:
        """Unmap this drained image (called once, by the gate, on the thread that drained it).

        Must not run while any call is inside the image: the gate guarantees it.
        Never raises: it may run at the end of a user's call, which must not
        fail because of cleanup. A failure is logged, and the image is then
        reported "leaked" (its copy kept) rather than left "retired" for ever.
        """
        started = time.perf_counter()
        with self._lock:
            if self.state in ("closed", "leaked"):
                return
            try:
                if self.on_closing is not None:
                    self.on_closing(self)      # the module's fini, while its code is still mapped
            except Exception:
                logger.exception("module '%s' generation %d: error before closing", self.module, self.generation)
            try:
                unmapped = self._unmap()
                self.gate.functions = {}     # drop the function objects: they point into unmapped code
                self.functions = {}
                self.compiled = frozenset()
                if unmapped and self._owner == os.getpid():
                    self._remove_partial(None, self.copy_path)
            except Exception:
                logger.exception("module '%s' generation %d: error while closing %s", self.module,
                                 self.generation, self.copy_path)
                unmapped = False
            self.state = "closed" if unmapped else "leaked"
        elapsed_ms = (time.perf_counter() - started) * 1e3
        if unmapped:
            logger.info("closed '%s' generation %d in %.2f ms", self.module, self.generation, elapsed_ms)
        else:
            logger.warning("module '%s' generation %d: dlclose() did not unmap %s; keeping the copy and "
                           "reporting the image as leaked. Why: %s.", self.module, self.generation,
                           self.copy_path, dynamic.why_still_mapped(self.copy_path))
        self.on_closed(self)


def _is_noexec(path: str) -> bool:
    try:
        return bool(os.statvfs(os.path.dirname(path)).f_flag & getattr(os, "ST_NOEXEC", 8))
    except OSError:
        return False
