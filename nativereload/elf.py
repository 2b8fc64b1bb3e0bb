"""Is this file a complete ELF shared library that this process could load?

glibc's ``dlopen`` trusts the file: a truncated or half-written library (a
linker still writing it, a copy cut short) makes it map pages past the end of
the file, and the first touch kills the process with SIGBUS. So before any
``dlopen`` the loader checks, with one or two ``pread`` calls (~10 µs):
  - the ELF magic, and that the class (32/64-bit), byte order and machine
    match this interpreter's own executable;
  - that it is a shared object (``ET_DYN``);
  - that the program-header table, every ``PT_LOAD`` and ``PT_DYNAMIC``
    segment, and the section-header table lie inside the file.
Checking these rejected every crashing truncation measured on this machine
(see shared/RESEARCH.md, glibc fact 3).
"""

from __future__ import annotations

import os
import struct
import sys

__all__ = ["ELFError", "check", "check_fd", "defined_symbols", "find_section", "read_section"]

_MAGIC = b"\x7fELF"
_CLASS_NAMES = {1: "32-bit", 2: "64-bit"}
_DATA_NAMES = {1: "little-endian", 2: "big-endian"}
_MACHINE_NAMES = {3: "x86", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390", 40: "ARM",
                  62: "x86-64", 183: "AArch64", 243: "RISC-V", 258: "LoongArch"}
_ET_DYN = 3
_PT_LOAD = 1
_PT_DYNAMIC = 2
_PN_XNUM = 0xFFFF


class ELFError(ValueError):
    """The file is not a complete, loadable ELF shared library for this machine.

    The message is the defect, phrased to follow "cannot load PATH: ".
    """


def _host_identity() -> tuple[int, int, int]:
    """(class, byte order, machine) of the running interpreter, read from its own ELF header."""
    for candidate in ("/proc/self/exe", sys.executable):
        try:
            with open(candidate, "rb") as f:
                header = f.read(20)
        except OSError:
            continue
        if header[:4] == _MAGIC:
            order = "<" if header[5] == 1 else ">"
            (machine,) = struct.unpack_from(order + "H", header, 18)
            return header[4], header[5], machine
    # No readable executable (unusual sandbox): fall back to what Python itself reports.
    return (2 if sys.maxsize > 2**32 else 1), (1 if sys.byteorder == "little" else 2), 0


HOST_CLASS, HOST_DATA, HOST_MACHINE = _host_identity()


def _describe_machine(machine: int) -> str:
    return _MACHINE_NAMES.get(machine, f"machine {machine}")


# The ELF header and the program headers of a shared library sit in its first
# page: one read of it serves both (a reload is measured in microseconds).
_HEAD_SIZE = 4096


def _read_exact(fd: int, size: int, offset: int, what: str, file_size: int, head: bytes) -> bytes:
    if offset + size > file_size:
        raise ELFError(f"truncated: the {what} ends at byte {offset + size} but the file has {file_size} bytes "
                       "(still being written?)")
    if offset + size <= len(head):
        return head[offset:offset + size]
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ELFError(f"truncated while reading the {what} (the file shrank while being checked)")
    return data


def check_fd(fd: int) -> None:
    """Check the open file ``fd`` (read with pread; the file offset is not moved).

    Raises:
        ELFError: with the defect found.
    """
    file_size = os.fstat(fd).st_size
    if file_size < 16:
        raise ELFError(f"not an ELF file: only {file_size} bytes" if file_size else "empty file (0 bytes)")
    head = os.pread(fd, _HEAD_SIZE, 0)
    ident = head[:16]
    if ident[:4] != _MAGIC:
        raise ELFError(f"not an ELF file (starts with {ident[:4]!r}, expected b'\\x7fELF')")
    elf_class, data = ident[4], ident[5]
    if elf_class not in _CLASS_NAMES or data not in _DATA_NAMES:
        raise ELFError(f"corrupt ELF identification (class {elf_class}, data {data})")
    if elf_class != HOST_CLASS or data != HOST_DATA:
        raise ELFError(f"wrong ELF class: the file is {_CLASS_NAMES[elf_class]} {_DATA_NAMES[data]}, "
                       f"this process is {_CLASS_NAMES.get(HOST_CLASS)} {_DATA_NAMES.get(HOST_DATA)}")
    order = "<" if data == 1 else ">"
    if elf_class == 2:
        header_format, ph_format = order + "HHIQQQIHHHHHH", order + "IIQQQQQQ"
    else:
        header_format, ph_format = order + "HHIIIIIHHHHHH", order + "IIIIIIII"
    header_size = 16 + struct.calcsize(header_format)
    header = _read_exact(fd, header_size - 16, 16, "ELF header", file_size, head)
    (e_type, e_machine, _version, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, _shstrndx) = struct.unpack(header_format, header)
    if HOST_MACHINE and e_machine != HOST_MACHINE:
        raise ELFError(f"built for {_describe_machine(e_machine)}, but this process runs on "
                       f"{_describe_machine(HOST_MACHINE)} (wrong architecture: rebuild it for this machine)")
    if e_type != _ET_DYN:
        kinds = {1: "a relocatable object (.o)", 2: "an executable", 4: "a core dump"}
        raise ELFError(f"not a shared library: it is {kinds.get(e_type, f'ELF type {e_type}')} "
                       "(build it with -shared -fPIC)")
    ph_size = struct.calcsize(ph_format)
    if e_phnum == 0 or e_phnum == _PN_XNUM or e_phentsize < ph_size:
        raise ELFError(f"corrupt program-header table ({e_phnum} entries of {e_phentsize} bytes)")
    table = _read_exact(fd, e_phnum * e_phentsize, e_phoff, "program-header table", file_size, head)
    loads = 0
    for index in range(e_phnum):
        fields = struct.unpack_from(ph_format, table, index * e_phentsize)
        if elf_class == 2:
            p_type, _p_flags, p_offset, _vaddr, _paddr, p_filesz, _memsz, _align = fields
        else:
            p_type, p_offset, _vaddr, _paddr, p_filesz, _memsz, _p_flags, _align = fields
        if p_type in (_PT_LOAD, _PT_DYNAMIC) and p_offset + p_filesz > file_size:
            kind = "loadable segment" if p_type == _PT_LOAD else "dynamic segment"
            raise ELFError(f"truncated: {kind} {index} ends at byte {p_offset + p_filesz} but the file has "
                           f"{file_size} bytes (still being written?)")
        loads += p_type == _PT_LOAD
    if loads == 0:
        raise ELFError("no loadable segment (not a usable shared library)")
    if e_shoff:
        end = e_shoff + e_shnum * e_shentsize
        if end > file_size:
            raise ELFError(f"truncated: the section-header table ends at byte {end} but the file has "
                           f"{file_size} bytes (still being written?)")


def check(path: str | os.PathLike) -> None:
    """Check the file at ``path``; see :func:`check_fd`.

    Raises:
        ELFError: with the defect found.
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        check_fd(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- sections and symbols
# Reading named sections and the dynamic symbol table from the file, never
# through dlopen: an embedded interface is checked before any of the image's
# code (its constructors included) can run.

_SHT_NOBITS = 8
_SHT_DYNSYM = 11
_SHN_XINDEX = 0xFFFF


def _section_headers(fd: int) -> tuple[str, list[tuple[int, int, int, int, int]], bytes, int]:
    """(byte order, [(name offset, type, file offset, size, link)], section-name string table, file size)."""
    file_size = os.fstat(fd).st_size
    ident = os.pread(fd, 64, 0)
    if len(ident) < 52 or ident[:4] != _MAGIC or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        raise ELFError("not an ELF file")
    order = "<" if ident[5] == 1 else ">"
    if ident[4] == 2:
        e_shoff, = struct.unpack_from(order + "Q", ident, 40)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from(order + "HHH", ident, 58)
        sh_format, picks = order + "IIQQQQIIQQ", (0, 1, 4, 5, 6)
    else:
        e_shoff, = struct.unpack_from(order + "I", ident, 32)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from(order + "HHH", ident, 46)
        sh_format, picks = order + "IIIIIIIIII", (0, 1, 4, 5, 6)
    if e_shoff == 0:
        return order, [], b"", file_size
    sh_size = struct.calcsize(sh_format)
    if e_shentsize != sh_size:
        raise ELFError(f"corrupt section-header table (entries of {e_shentsize} bytes, expected {sh_size})")
    if e_shnum == 0 or e_shstrndx == _SHN_XINDEX:
        # More than 0xff00 sections: the real count and index live in section 0 (ELF gABI).
        first = struct.unpack(sh_format, os.pread(fd, sh_size, e_shoff))
        e_shnum = e_shnum or first[5]
        e_shstrndx = first[6] if e_shstrndx == _SHN_XINDEX else e_shstrndx
    if e_shoff + e_shnum * sh_size > file_size:
        raise ELFError("truncated: the section-header table ends past the end of the file")
    a, b, c, d, e = picks
    sections = [(h[a], h[b], h[c], h[d], h[e])
                for h in struct.iter_unpack(sh_format, os.pread(fd, e_shnum * sh_size, e_shoff))]
    names = b""
    if e_shstrndx < len(sections):
        _name, _kind, offset, size, _link = sections[e_shstrndx]
        if offset + size <= file_size:
            names = os.pread(fd, size, offset)
    return order, sections, names, file_size


def _section_data(fd: int, section: tuple[int, int, int, int, int], file_size: int) -> bytes:
    _name, kind, offset, size, _link = section
    if kind == _SHT_NOBITS:
        return b""
    if offset + size > file_size:
        raise ELFError("truncated: a section ends past the end of the file (still being written?)")
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ELFError("truncated while reading a section (the file shrank while being read)")
    return data


def find_section(fd: int, name: str) -> tuple[int, int] | None:
    """(file offset, size) of the section called ``name`` in the ELF file open as ``fd``; None if it has none.

    A section that occupies no file space (``SHT_NOBITS``) has size 0.

    Raises:
        ELFError: not an ELF file, or its section headers or that section lie
            past the end of the file.
    """
    _order, sections, names, file_size = _section_headers(fd)
    wanted = name.encode() + b"\0"
    start = names.find(wanted)
    while start >= 0:
        if start == 0 or names[start - 1] == 0:     # a whole name, not the tail of a longer one
            for section in sections:
                if section[0] == start:
                    _name, kind, offset, size, _link = section
                    if kind == _SHT_NOBITS:
                        return offset, 0
                    if offset + size > file_size:
                        raise ELFError("truncated: a section ends past the end of the file (still being written?)")
                    return offset, size
        start = names.find(wanted, start + 1)
    return None


def read_section(fd: int, name: str) -> bytes | None:
    """The contents of the section called ``name`` in the ELF file open as ``fd``; None if it has none.

    Reads with pread (the file offset is not moved).

    Raises:
        ELFError: as :func:`find_section`, or the file shrank while being read.
    """
    where = find_section(fd, name)
    if where is None:
        return None
    offset, size = where
    data = os.pread(fd, size, offset) if size else b""
    if len(data) != size:
        raise ELFError("truncated while reading a section (the file shrank while being read)")
    return data


def defined_symbols(path: str | os.PathLike) -> set[str]:
    """Names of the symbols the shared library at ``path`` exports (its dynamic symbol table, read from the file).

    Exported means defined in the library, global or weak (or GNU unique), and
    visible (default or protected visibility): what ``dlsym`` can find.

    Raises:
        ELFError: not an ELF file, or a table lies past the end of the file.
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        order, sections, _names, file_size = _section_headers(fd)
        wide = os.pread(fd, 5, 0)[4] == 2
        sym_format = order + ("IBBHQQ" if wide else "IIIBBH")
        sym_size = struct.calcsize(sym_format)
        exported: set[str] = set()
        for section in sections:
            if section[1] != _SHT_DYNSYM or section[4] >= len(sections):
                continue
            symbols = _section_data(fd, section, file_size)
            strings = _section_data(fd, sections[section[4]], file_size)
            for offset in range(sym_size, len(symbols) - sym_size + 1, sym_size):   # entry 0 is the null symbol
                fields = struct.unpack_from(sym_format, symbols, offset)
                if wide:
                    st_name, st_info, st_other, st_shndx = fields[0], fields[1], fields[2], fields[3]
                else:
                    st_name, st_info, st_other, st_shndx = fields[0], fields[3], fields[4], fields[5]
                if st_shndx == 0 or (st_info >> 4) not in (1, 2, 10) or (st_other & 3) not in (0, 3):
                    continue
                end = strings.find(b"\0", st_name)
                exported.add(strings[st_name:end if end >= 0 else None].decode(errors="replace"))
        return exported
    finally:
        os.close(fd)
