"""One loaded image of a module: a private copy of a .so, dlopened, its functions resolved.

Life of an Image (each step is a method below):
    Image.load()  copy the source into the registry's directory -> check the
                  copy is a complete ELF for this machine -> dlopen(RTLD_NOW |
                  RTLD_LOCAL) -> resolve every declared function. Any failure
                  closes and deletes what was made and raises; nothing leaks.
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

import logging
import os
import tempfile
import threading
import time
from typing import Callable

import cffi

from . import dynamic, elf
from .errors import InterfaceError, LoadError, ModuleNotFound, SymbolError

__all__ = ["Image", "Interface"]

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


class Interface:
    """A parsed cdef: one cffi FFI shared by every image loaded with the same declarations.

    Parsing is most of what a reload costs if done per image (~0.4 ms of
    ~0.8 ms), so each distinct cdef is parsed once per registry.

    Attributes:
        cdef: the declarations, as given.
        ffi: the cffi.FFI holding them (for ffi.new, ffi.string, ...).
        functions: the declared function names, in declaration order.
    """

    def __init__(self, cdef: str, module: str) -> None:
        if not isinstance(cdef, str) or not cdef.strip():
            raise InterfaceError(
                f"module '{module}': a cdef is required — pass the C declarations of the functions to call, "
                f"e.g. load('{module}', cdef='long add(long, long);')", module=module)
        ffi = cffi.FFI()
        try:
            ffi.cdef(cdef)
        except Exception as exc:   # cffi raises CDefError, pycparser's ParseError, FFIError...
            raise InterfaceError(
                f"module '{module}': the cdef does not parse: {exc} — fix the declarations "
                "(plain C declarations, no #include or macros with values)", module=module) from exc
        self.cdef = cdef
        self.ffi = ffi
        # cffi has no public list of declarations; its parser's (and the
        # ctype of each function, which ffi.dlopen's accessors build the same
        # way) has been stable since cffi 1.0.
        with ffi._lock:
            self.function_types = {key.split(" ", 1)[1]: ffi._get_cached_btype(declaration[0])
                                   for key, declaration in ffi._parser._declarations.items()
                                   if key.startswith("function ")}
        self.functions = tuple(self.function_types)


class Image:
    """One dlopened private copy of a module's library. Build with :meth:`load`.

    Attributes:
        module: the module's name.
        generation: this image's generation (1 for the first load).
        source: the user's file it was copied from.
        copy_path: the private copy that is mapped.
        interface: the Interface its functions were resolved with.
        gate: its ImageGate (functions, in-flight counts).
        state: "active", "retired", "leaked" or "closed".
    """

    def __init__(self) -> None:
        raise TypeError("use Image.load()")

    @classmethod
    def load(cls, *, module: str, generation: int, source: str, directory: str, interface: Interface,
             gate_type: type, on_closed: Callable[["Image"], None], refused: str) -> "Image":
        """Copy ``source`` into ``directory``, check it, dlopen it and resolve every declared function.

        Args:
            refused: what a failure means for the caller, appended to every
                error message (e.g. "reload refused; generation 3 still serving").
            on_closed: called once, with this image, after :meth:`close`.

        Raises:
            ModuleNotFound: ``source`` does not exist (any more).
            LoadError: the copy failed, the copy is not a loadable ELF, or dlopen failed.
            SymbolError: declared functions are missing from the library.
        Nothing is left behind on failure: no copy, no handle.
        """
        self = object.__new__(cls)
        self.module = module
        self.generation = generation
        self.source = source
        self.interface = interface
        self.state = "active"
        self.gate = None
        self.objects = None            # the registry's call policies for this image (registry._Objects)
        self.held_timer = None         # the registry's "still held" warning, cancelled at close
        self.soname = None             # what the copy's DT_SONAME was made (dynamic.py)
        self._on_closed = on_closed
        self._handle = None
        self._lib = None
        self._lock = threading.Lock()
        self._owner = os.getpid()          # a forked child never deletes its parent's copy
        started = time.perf_counter()
        self.copy_path = self._copy(directory, refused)
        try:
            self._dlopen(refused)
            functions = self._resolve(refused)
        except BaseException:
            self._discard()
            raise
        self.functions = functions       # symbol -> cffi ABI function object (the gate path's entries)
        self.compiled = frozenset()      # symbols served by compiled entries (attach_calls)
        self.gate = gate_type(functions, self.close)
        self.load_seconds = time.perf_counter() - started
        return self

    # -- loading --------------------------------------------------------------------------

    def _copy(self, directory: str, refused: str) -> str:
        """Copy the source to a new file in ``directory`` and check it is a complete ELF; return its path."""
        try:
            source_fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ModuleNotFound(
                f"module '{self.module}': {self.source} does not exist ({refused}) — build it, or check the "
                "path", module=self.module, searched=(self.source,)) from None
        except OSError as exc:
            raise self._load_error(f"cannot open it: {exc.strerror}", refused, exc) from None
        copy_fd = None
        copy_path = None
        try:
            size = os.fstat(source_fd).st_size
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
            elf.check_fd(copy_fd)
            # Not findable by its soname: a dlopen("libfoo.so.1") elsewhere in the
            # process must get the system's library, never this copy.
            self.soname = dynamic.make_soname_private(copy_fd)
        except elf.ELFError as exc:
            self._remove_partial(copy_fd, copy_path)
            raise self._load_error(str(exc), refused, exc) from None
        except OSError as exc:
            self._remove_partial(copy_fd, copy_path)
            raise self._load_error(
                f"cannot copy it into {directory}: {exc.strerror or exc}", refused, exc,
                hint="free space there, or point nativereload at another directory with TMPDIR or "
                     "Registry(tmpdir=...)") from None
        finally:
            os.close(source_fd)
        os.close(copy_fd)
        return copy_path

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
        self._lib = self.interface.ffi._backend.load_library(handle, 0)

    def _resolve(self, refused: str) -> dict:
        """Look up every declared function now, so a reload is refused before anything switches."""
        lib = self._lib
        functions = {}
        missing = []
        for name, ctype in self.interface.function_types.items():
            try:
                functions[name] = lib.load_function(ctype, name)
            except AttributeError:       # dlsym() found nothing
                missing.append(name)
        if missing:
            names = ", ".join(f"'{name}'" for name in missing)
            noun = "symbol" if len(missing) == 1 else "symbols"
            raise SymbolError(
                f"module '{self.module}': {noun} {names} not found in {self.source} ({refused}) — export "
                f"{'it' if len(missing) == 1 else 'them'} from the library, or reload with a cdef that does "
                "not declare " + ("it" if len(missing) == 1 else "them"),
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

    def _discard(self) -> None:
        """Undo a load that failed part-way: close the handle, delete the copy."""
        self._unmap()
        self._remove_partial(None, self.copy_path)

    def attach_calls(self, functions: dict, compiled: frozenset) -> bool:
        """Serve from ``functions`` (compiled entries for the symbols in ``compiled``); False if already closed.

        One assignment of the gate's mapping: Funcs find the new entries at
        their next call; a call in flight finishes on what it looked up.
        """
        with self._lock:
            if self.state in ("closed", "leaked"):
                return False
            self.gate.functions = functions
            self.compiled = compiled
            return True

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
        self._on_closed(self)


def _is_noexec(path: str) -> bool:
    try:
        return bool(os.statvfs(os.path.dirname(path)).f_flag & getattr(os, "ST_NOEXEC", 8))
    except OSError:
        return False
