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

__all__ = ["ELFError", "check", "check_fd"]

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
