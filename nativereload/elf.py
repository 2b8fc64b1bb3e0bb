"""The ELF format: its numbers and layouts, and reading named sections and exported symbols from a file.

The readers here take the file with ``pread``, never through ``dlopen``: an
embedded interface (``interface.py``) and the names a library exports
(``cdefgen.py``) are read before any of the library's code, its constructors
included, can run. They check only that what they read lies inside the file.
Whether glibc's loader can map, relocate and close the file safely is the
question :mod:`nativereload.elfcheck` answers, with the constants and
layouts defined here.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import NamedTuple

__all__ = ["ELFError", "defined_symbols", "file_type", "find_section", "read_section"]

# The format's numbers (the ELF gABI and glibc's elf.h), named as there.
_MAGIC = b"\x7fELF"
_CLASS_NAMES = {1: "32-bit", 2: "64-bit"}
_DATA_NAMES = {1: "little-endian", 2: "big-endian"}
_MACHINE_NAMES = {3: "x86", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390", 40: "ARM",
                  62: "x86-64", 183: "AArch64", 243: "RISC-V", 258: "LoongArch"}
_ET_DYN = 3
_PN_XNUM = 0xFFFF

_PT_LOAD, _PT_DYNAMIC, _PT_NOTE, _PT_PHDR, _PT_TLS = 1, 2, 4, 6, 7
_PT_GNU_EH_FRAME, _PT_GNU_RELRO, _PT_GNU_PROPERTY = 0x6474E550, 0x6474E552, 0x6474E553
_PF_X, _PF_W, _PF_R = 1, 2, 4

_DT_NULL, _DT_NEEDED, _DT_PLTRELSZ, _DT_HASH = 0, 1, 2, 4
_DT_STRTAB, _DT_SYMTAB, _DT_RELA, _DT_RELASZ, _DT_RELAENT = 5, 6, 7, 8, 9
_DT_STRSZ, _DT_SYMENT, _DT_INIT, _DT_FINI, _DT_SONAME, _DT_RPATH = 10, 11, 12, 13, 14, 15
_DT_REL, _DT_RELSZ, _DT_RELENT, _DT_PLTREL, _DT_TEXTREL, _DT_JMPREL = 17, 18, 19, 20, 22, 23
_DT_INIT_ARRAY, _DT_FINI_ARRAY, _DT_INIT_ARRAYSZ, _DT_FINI_ARRAYSZ = 25, 26, 27, 28
_DT_RUNPATH, _DT_FLAGS, _DT_PREINIT_ARRAY, _DT_PREINIT_ARRAYSZ = 29, 30, 32, 33
_DT_RELRSZ, _DT_RELR, _DT_RELRENT = 35, 36, 37
_DT_GNU_HASH = 0x6FFFFEF5
_DT_VERSYM, _DT_RELACOUNT, _DT_RELCOUNT = 0x6FFFFFF0, 0x6FFFFFF9, 0x6FFFFFFA
_DT_VERDEF, _DT_VERNEED = 0x6FFFFFFC, 0x6FFFFFFE
_DT_AUXILIARY, _DT_FILTER = 0x7FFFFFFD, 0x7FFFFFFF
_DF_TEXTREL = 0x4
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_STB_WEAK = 2
_SHN_UNDEF, _SHN_XINDEX = 0, 0xFFFF
_SHF_WRITE, _SHF_ALLOC, _SHF_EXECINSTR, _SHF_TLS = 0x1, 0x2, 0x4, 0x400
_SHT_DYNAMIC, _SHT_NOBITS, _SHT_DYNSYM = 6, 8, 11

# The structures' layouts for struct, after a byte-order prefix (glibc's elf.h):
# the ELF header after its 16-byte e_ident, a program header, a section header, a symbol.
_EHDR32, _EHDR64 = "HHIIIIIHHHHHH", "HHIQQQIHHHHHH"
_PHDR32, _PHDR64 = "IIIIIIII", "IIQQQQQQ"
_SHDR32, _SHDR64 = "IIIIIIIIII", "IIQQQQIIQQ"
_SYM32, _SYM64 = "IIIBBH", "IBBHQQ"


class ELFError(ValueError):
    """The file is not a complete, loadable ELF shared library for this machine.

    The message is the defect, phrased to follow "cannot load PATH: ". Raised by
    :mod:`nativereload.elfcheck` for what the loader would trip on, and by the
    readers here for a file they cannot read.
    """


def file_type(mode: int) -> str:
    """What kind of file ``mode`` describes, in words for an error message."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return f"file mode {mode:#o}"


class _Sections(NamedTuple):
    """What the section readers need of a file's section-header table."""

    order: str                  # struct's byte-order prefix
    wide: bool                  # 64-bit
    headers: list[tuple[int, int, int, int, int]]      # (name offset, type, file offset, size, link)
    names: bytes                # the section-name string table
    file_size: int


def _section_headers(fd: int) -> _Sections:
    """The section-header table of the ELF file open as ``fd``: ELFError unless all of it lies inside the file."""
    file_size = os.fstat(fd).st_size
    ident = os.pread(fd, 64, 0)
    if len(ident) < 16 or ident[:4] != _MAGIC or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        raise ELFError("not an ELF file")
    order, wide = ("<" if ident[5] == 1 else ">"), ident[4] == 2
    if len(ident) < (64 if wide else 52):
        raise ELFError("truncated: the file ends inside its ELF header")
    if wide:
        e_shoff, = struct.unpack_from(order + "Q", ident, 40)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from(order + "HHH", ident, 58)
    else:
        e_shoff, = struct.unpack_from(order + "I", ident, 32)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from(order + "HHH", ident, 46)
    if e_shoff == 0:
        return _Sections(order, wide, [], b"", file_size)
    sh_format = order + (_SHDR64 if wide else _SHDR32)
    sh_size = struct.calcsize(sh_format)
    if e_shentsize != sh_size:
        raise ELFError(f"corrupt section-header table (entries of {e_shentsize} bytes, expected {sh_size})")
    cut = "truncated: the section-header table ends past the end of the file"
    if e_shnum == 0 or e_shstrndx == _SHN_XINDEX:
        # More than 0xff00 sections: the real count and index live in section 0 (ELF gABI).
        if e_shoff + sh_size > file_size:
            raise ELFError(cut)
        first = struct.unpack(sh_format, _read(fd, e_shoff, sh_size, "the section-header table"))
        e_shnum = e_shnum or first[5]
        e_shstrndx = first[6] if e_shstrndx == _SHN_XINDEX else e_shstrndx
    if e_shoff + e_shnum * sh_size > file_size:
        raise ELFError(cut)
    headers = [(h[0], h[1], h[4], h[5], h[6])
               for h in struct.iter_unpack(sh_format, _read(fd, e_shoff, e_shnum * sh_size, "the section-header table"))]
    if e_shstrndx >= len(headers):
        raise ELFError(f"corrupt section-header table (the section names are in section {e_shstrndx}, "
                       f"of {len(headers)})")
    names = _read(fd, *_extent(headers[e_shstrndx], file_size), "the section names")
    return _Sections(order, wide, headers, names, file_size)


def _extent(section: tuple[int, int, int, int, int], file_size: int) -> tuple[int, int]:
    """(file offset, size) of a section; a section that occupies no file space (``SHT_NOBITS``) has size 0."""
    _name, kind, offset, size, _link = section
    if kind == _SHT_NOBITS:
        return offset, 0
    if offset + size > file_size:
        raise ELFError("truncated: a section ends past the end of the file (still being written?)")
    return offset, size


def _read(fd: int, offset: int, size: int, what: str) -> bytes:
    """``size`` bytes at ``offset``, which the caller checked lie inside the file as it was."""
    data = os.pread(fd, size, offset) if size else b""
    if len(data) != size:
        raise ELFError(f"truncated while reading {what} (the file shrank while being read)")
    return data


def find_section(fd: int, name: str) -> tuple[int, int] | None:
    """(file offset, size) of the section called ``name`` in the ELF file open as ``fd``; None if it has none.

    A section that occupies no file space (``SHT_NOBITS``) has size 0.

    Raises:
        ELFError: not an ELF file, or its section headers or that section lie
            past the end of the file.
    """
    table = _section_headers(fd)
    wanted = name.encode() + b"\0"
    for section in table.headers:
        # The name runs from its offset to the next NUL. Linkers share tails (".plt" is the end of ".rela.plt"),
        # so a name may start anywhere in the table.
        if table.names[section[0]:section[0] + len(wanted)] == wanted:
            return _extent(section, table.file_size)
    return None


def read_section(fd: int, name: str) -> bytes | None:
    """The contents of the section called ``name`` in the ELF file open as ``fd``; None if it has none.

    Reads with pread (the file offset is not moved).

    Raises:
        ELFError: as :func:`find_section`, or the file shrank while being read.
    """
    where = find_section(fd, name)
    return None if where is None else _read(fd, *where, "a section")


def defined_symbols(path: str | os.PathLike) -> set[str]:
    """Names of the symbols the shared library at ``path`` exports (its dynamic symbol table, read from the file).

    Exported means defined in the library, global or weak (or GNU unique), and
    visible (default or protected visibility): what ``dlsym`` can find.

    Raises:
        ELFError: not an ELF file, a table lies past the end of the file, or
            the symbol table is corrupt.
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        table = _section_headers(fd)
        # (layout, where st_name, st_info, st_other and st_shndx are in it)
        layout, picks = (_SYM64, (0, 1, 2, 3)) if table.wide else (_SYM32, (0, 3, 4, 5))
        sym_format = table.order + layout
        sym_size = struct.calcsize(sym_format)
        exported: set[str] = set()
        for section in table.headers:
            if section[1] != _SHT_DYNSYM:
                continue
            if section[4] >= len(table.headers):
                raise ELFError(f"corrupt dynamic symbol table (its names are in section {section[4]}, "
                               f"of {len(table.headers)})")
            symbols = _read(fd, *_extent(section, table.file_size), "a section")
            if len(symbols) % sym_size:
                raise ELFError(f"corrupt dynamic symbol table ({len(symbols)} bytes: not a whole number of "
                               f"{sym_size}-byte entries)")
            strings = _read(fd, *_extent(table.headers[section[4]], table.file_size), "a section")
            for fields in struct.iter_unpack(sym_format, symbols[sym_size:]):     # entry 0 is the null symbol
                st_name, st_info, st_other, st_shndx = (fields[i] for i in picks)
                if st_shndx == 0 or (st_info >> 4) not in (1, 2, 10) or (st_other & 3) not in (0, 3):
                    continue
                end = strings.find(b"\0", st_name)
                name = strings[st_name:end if end >= 0 else None].decode(errors="replace")
                if name:            # a nameless symbol is not one dlsym can find
                    exported.add(name)
        return exported
    finally:
        os.close(fd)
