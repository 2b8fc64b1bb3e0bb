"""The bare work a reload cannot avoid, done by hand: the baseline for reload latency.

``BareLoader.load(source)`` = copy the file to a fresh name (sendfile, as the
registry does) + ``dlopen(RTLD_NOW | RTLD_LOCAL)`` + resolve every symbol to
a cffi function object. It resolves the cheapest way cffi allows: the
backend's library object over the handle and ``load_function`` with each
function's ctype computed once (``getattr(ffi.dlopen(...), name)`` costs
~6 µs a symbol more, in cffi's Python accessors). ``close(image)`` =
``dlclose`` + unlink the copy. Nothing else: no ELF check, no gate, no
bookkeeping, no unmapped-check, no logging. That difference is what the
reload/bare ratio measures. (Uses cffi's private ``_backend``,
``_parser`` and ``_get_cached_btype``, as nativereload/image.py does.)
"""

from __future__ import annotations

import os
import tempfile

import cffi

_RTLD_NOW = os.RTLD_NOW
_RTLD_LOCAL = os.RTLD_LOCAL

_dl = cffi.FFI()
_dl.cdef("void *dlopen(const char *, int);")
_dlopen = _dl.dlopen(None).dlopen


class BareLoader:
    """Copy + dlopen + resolve and dlclose + unlink, for one cdef, into one directory."""

    def __init__(self, cdef: str, symbols: list[str], directory: str) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(cdef)
        with self.ffi._lock:
            self.ctypes = {name: self.ffi._get_cached_btype(self.ffi._parser._declarations[f"function {name}"][0])
                           for name in symbols}
        self.directory = directory

    def load(self, source: str):
        """Returns (lib, functions, copy_path)."""
        source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(source_fd).st_size
            copy_fd, copy_path = tempfile.mkstemp(suffix=".so", dir=self.directory)
            try:
                copied = 0
                while copied < size:
                    copied += os.sendfile(copy_fd, source_fd, copied, size - copied)
            finally:
                os.close(copy_fd)
        finally:
            os.close(source_fd)
        handle = _dlopen(os.fsencode(copy_path), _RTLD_NOW | _RTLD_LOCAL)
        if handle == _dl.NULL:
            raise OSError(f"dlopen failed for {copy_path}")
        lib = self.ffi._backend.load_library(handle, 0)
        functions = {name: lib.load_function(ctype, name) for name, ctype in self.ctypes.items()}
        return lib, functions, copy_path

    def close(self, image) -> None:
        lib, _, copy_path = image
        lib.close_lib()             # dlclose
        os.unlink(copy_path)
