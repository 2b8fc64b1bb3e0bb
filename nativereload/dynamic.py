"""The dynamic section of a private copy: a soname nobody asks for, and why the loader kept an image.

``make_soname_private(fd)``: glibc registers a loaded library under its
``DT_SONAME`` as well as its path, and a later ``dlopen("liblz4.so.1")``
anywhere in the process returns the already-loaded object with that soname. So
a private copy of an upstream build would be handed to unrelated code that asks
for the system library, and that code's reference would keep our image mapped
after we close it. Before ``dlopen``, the copy's soname string is overwritten
in place (same length, so every offset stays valid) with a name of our own,
``nr-<random>``. If another entry of the dynamic section points into the middle
of that string (linkers merge string tails), the ``DT_SONAME`` entry is instead
turned into a tag the loader ignores, leaving the copy with no soname at all.

``why_still_mapped(path)``: when ``dlclose`` left an image mapped, the reasons
the file itself shows (``STB_GNU_UNIQUE`` symbols, ``DF_1_NODELETE``,
``thread_local`` destructors), or else another reference from elsewhere in
the process.

Both read with ``pread`` and trust nothing: a field that points outside the
file means "nothing to do" (the ELF check, run before, refuses broken files).
"""

from __future__ import annotations

import os
import secrets
import struct

__all__ = ["make_soname_private", "why_still_mapped"]

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_SONAME, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29
_DT_FLAGS_1 = 0x6FFFFFFB
_DF_1_NODELETE = 0x8
# An OS-specific tag glibc's elf_get_dynamic_info() does not look at.
_DT_IGNORED = 0x6000000D
_SHT_DYNSYM = 11
_STB_GNU_UNIQUE = 10
_TLS_DTOR_SYMBOLS = (b"__cxa_thread_atexit_impl", b"__cxa_thread_atexit")
_MAX_DYNAMIC = 1 << 20


class _Layout:
    """Where the pieces of one ELF file are (only what this module needs)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        ident = os.pread(fd, 64, 0)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            raise ValueError("not an ELF file")
        self.is64 = ident[4] == 2
        self.order = "<" if ident[5] == 1 else ">"
        if self.is64:
            (self.phoff, self.shoff, _flags, _ehsize, self.phentsize, self.phnum, self.shentsize,
             self.shnum, _shstrndx) = struct.unpack_from(self.order + "QQIHHHHHH", ident, 32)
        else:
            (self.phoff, self.shoff, _flags, _ehsize, self.phentsize, self.phnum, self.shentsize,
             self.shnum, _shstrndx) = struct.unpack_from(self.order + "IIIHHHHHH", ident, 28)
        self.word = 8 if self.is64 else 4
        self.loads: list[tuple[int, int, int]] = []        # (vaddr, offset, filesz)
        self.dynamic: tuple[int, int] | None = None        # (offset, filesz)
        ph_format = self.order + ("IIQQQQQQ" if self.is64 else "IIIIIIII")
        table = self.read(self.phoff, self.phnum * self.phentsize)
        for index in range(self.phnum):
            fields = struct.unpack_from(ph_format, table, index * self.phentsize)
            if self.is64:
                p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = fields
            else:
                p_type, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _flags, _align = fields
            if p_type == _PT_LOAD:
                self.loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == _PT_DYNAMIC:
                self.dynamic = (p_offset, p_filesz)

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError("outside the file")
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise ValueError("short read")
        return data

    def file_offset(self, vaddr: int) -> int | None:
        for start, offset, filesz in self.loads:
            if start <= vaddr < start + filesz:
                return vaddr - start + offset
        return None

    def entries(self) -> list[tuple[int, int, int]]:
        """The dynamic section as (file offset of the entry, tag, value), up to DT_NULL."""
        if self.dynamic is None:
            return []
        offset, size = self.dynamic
        data = self.read(offset, min(size, _MAX_DYNAMIC))
        entry_format = self.order + ("qQ" if self.is64 else "iI")
        step = 2 * self.word
        found = []
        for position in range(0, len(data) - step + 1, step):
            tag, value = struct.unpack_from(entry_format, data, position)
            if tag == _DT_NULL:
                break
            found.append((offset + position, tag, value))
        return found


def make_soname_private(fd: int) -> tuple[str | None, tuple[int, bytes] | None]:
    """Give the ELF file open read-write as ``fd`` a soname no other code asks for.

    Returns (the new soname, (file offset, the bytes that were there)): the
    second lets a reader restore the original contents (to hash what the user
    built). (None, None) when there is nothing to change (no soname) or the
    file's layout is not one this module can follow; the new soname is ""
    when it was removed instead of renamed (see the module docstring).
    """
    try:
        layout = _Layout(fd)
        entries = layout.entries()
        tags = {tag: (position, value) for position, tag, value in entries}
        if _DT_SONAME not in tags or _DT_STRTAB not in tags:
            return None, None
        strtab = layout.file_offset(tags[_DT_STRTAB][1])
        strsz = tags.get(_DT_STRSZ, (0, 0))[1]
        name_at = tags[_DT_SONAME][1]
        if strtab is None or name_at >= strsz:
            return None, None
        text = layout.read(strtab + name_at, min(256, strsz - name_at, layout.size - strtab - name_at))
        length = text.find(b"\0")
        if length <= 0:
            return None, None
        shared = any(name_at < value < name_at + length for _, tag, value in entries
                     if tag in (_DT_NEEDED, _DT_RPATH, _DT_RUNPATH))
        if shared:
            position = tags[_DT_SONAME][0]
            tag_format = layout.order + ("q" if layout.is64 else "i")
            original = layout.read(position, struct.calcsize(tag_format))
            os.pwrite(fd, struct.pack(tag_format, _DT_IGNORED), position)
            return "", (position, original)
        new = ("nr-" + secrets.token_hex(length))[:length].encode()
        os.pwrite(fd, new, strtab + name_at)
        return new.decode(), (strtab + name_at, text[:length])
    except (ValueError, struct.error, OSError):
        return None, None


def why_still_mapped(path: str) -> str:
    """Why glibc may have kept the library at ``path`` mapped after dlclose(), as a phrase."""
    reasons = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None
    if fd is not None:
        try:
            reasons = _reasons_in_file(_Layout(fd))
        except (ValueError, struct.error, OSError):
            reasons = []
        finally:
            os.close(fd)
    if not reasons:
        return ("something else in the process holds another reference to it: code that dlopen()ed the copy's "
                "path (or a library that depends on it) keeps it loaded until that reference is closed")
    return "; ".join(reasons)


def _reasons_in_file(layout: _Layout) -> list[str]:
    reasons = []
    flags_1 = {tag: value for _, tag, value in layout.entries()}.get(_DT_FLAGS_1, 0)
    if flags_1 & _DF_1_NODELETE:
        reasons.append("it is marked NODELETE (linked with -z nodelete, or opened with RTLD_NODELETE): the loader "
                       "never unloads it")
    unique, tls_dtors = _dynamic_symbols(layout)
    if unique:
        shown = ", ".join(unique[:3]) + (", ..." if len(unique) > 3 else "")
        reasons.append(f"it defines STB_GNU_UNIQUE symbols ({shown}: C++ inline or template statics), which "
                       "glibc never unloads; later images share those objects with it — build with "
                       "-fno-gnu-unique (nativereload_add_module does)")
    if tls_dtors:
        reasons.append("it registers thread_local destructors (__cxa_thread_atexit), which keep it loaded until "
                       "every thread that used them has exited — avoid thread_local objects with destructors in "
                       "reloadable code")
    return reasons


def _dynamic_symbols(layout: _Layout) -> tuple[list[str], bool]:
    """(names of STB_GNU_UNIQUE symbols, whether a thread_local destructor hook is referenced), from .dynsym."""
    if not layout.shoff or not layout.shnum:
        return [], False
    sh_format = layout.order + ("IIQQQQIIQQ" if layout.is64 else "IIIIIIIIII")
    table = layout.read(layout.shoff, layout.shnum * layout.shentsize)
    sections = [struct.unpack_from(sh_format, table, i * layout.shentsize) for i in range(layout.shnum)]
    unique, tls = [], False
    for section in sections:
        _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize = section
        if sh_type != _SHT_DYNSYM or not entsize or link >= len(sections):
            continue
        strings = layout.read(sections[link][4], sections[link][5])
        symbols = layout.read(offset, size)
        for position in range(0, size - entsize + 1, entsize):
            if layout.is64:
                st_name, st_info, _other, shndx, _value, _size = struct.unpack_from(layout.order + "IBBHQQ",
                                                                                     symbols, position)
            else:
                st_name, _value, _size, st_info, _other, shndx = struct.unpack_from(layout.order + "IIIBBH",
                                                                                     symbols, position)
            name = strings[st_name:strings.find(b"\0", st_name)]
            if st_info >> 4 == _STB_GNU_UNIQUE:
                unique.append(name.decode(errors="replace"))
            elif shndx == 0 and name in _TLS_DTOR_SYMBOLS:
                tls = True
    return unique, tls
