"""Is this file a complete ELF shared library that glibc's loader can map, relocate and close safely?

glibc's ``dlopen`` trusts the file. A truncated library makes it map pages
past the end of the file (SIGBUS at the first touch); a corrupt header, program
header, dynamic section or hash table makes ``ld.so`` read or write through a
bad address (SIGSEGV), divide by zero, call an address that is not code, or
fail one of its assertions (``_exit(127)``) — inside ``dlopen`` or at
``dlclose``. So before any ``dlopen`` the loader checks, by reading the file
(a few ``pread`` calls, tens of µs: ``bench/elf_check.py``), everything the
dynamic loader relies on without checking it itself (glibc 2.36,
``elf/dl-load.c``, ``get-dynamic-info.h``, ``dl-setup_hash.c``,
``do-rel.h``, ``dl-version.c``, ``dl-init.c``, ``dl-fini.c``):

ELF header and program headers
  the magic, and that the class (32/64-bit), byte order and machine match
  this interpreter's own executable; a shared object (``ET_DYN``); program
  headers of the native size, inside the file; every ``PT_LOAD`` inside the
  file, ``p_filesz <= p_memsz``, in ascending non-overlapping order, with
  file offset and address congruent modulo the page size; at least one
  executable ``PT_LOAD``; ``PT_PHDR``, ``PT_NOTE``/``PT_GNU_PROPERTY``
  (and the notes in them), ``PT_TLS`` and ``PT_GNU_RELRO`` inside loaded
  segments; the section-header table (when there is one) inside the file.
Dynamic section
  exactly one ``PT_DYNAMIC``, inside the file-backed part of a readable
  ``PT_LOAD`` (a writable one if ``PT_DYNAMIC`` says ``PF_W``: ld.so
  relocates it in place), ending in ``DT_NULL``; ``DT_STRTAB``/``DT_STRSZ``,
  ``DT_SYMTAB``, the hash tables, ``DT_VERSYM``/``DT_VERNEED``/
  ``DT_VERDEF``, ``DT_RELA``/``DT_REL``/``DT_RELR``/``DT_JMPREL`` and their
  sizes, the init/fini arrays inside readable loaded segments, each with
  the size tag ld.so dereferences unconditionally; ``DT_INIT``/``DT_FINI``
  inside an executable segment; ``DT_PLTREL`` naming a relocation type this
  machine's ld.so processes, and the entry sizes its assertions insist on;
  every string offset (``DT_NEEDED``, ``DT_SONAME``, run paths, version
  names, symbol names) inside ``DT_STRSZ``.
Hash tables
  ``DT_GNU_HASH``: a power-of-two bloom filter, every bucket at or past
  ``symoffset``, and every chain ending inside the table; ``DT_HASH``:
  buckets and chains inside the table and naming symbols that exist. The
  symbol count they imply sizes the symbol and version tables, which must
  fit in the file.
Relocations and what they reach
  every relocation's target inside a writable segment (any segment with
  ``DT_TEXTREL``) and its symbol index inside the symbol table; every
  init/fini array slot relocated to an address in an executable segment;
  every defined function symbol (and IFUNC resolver) inside an executable
  segment; version indexes within the versions defined or needed.

What this cannot catch: a library whose own code crashes — corrupt machine
code, a constructor that faults, data its code misuses. The loader runs that
code (constructors at ``dlopen``, destructors at ``dlclose``); only running it
in another process first can tell (the crash canary).

The format's numbers and layouts, :class:`~nativereload.elf.ELFError` and
the readers of sections and symbols are :mod:`nativereload.elf`.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
import stat
import struct
import sys

from .elf import (_CLASS_NAMES, _DATA_NAMES, _DF_TEXTREL, _DT_AUXILIARY, _DT_FILTER, _DT_FINI, _DT_FINI_ARRAY,
                  _DT_FINI_ARRAYSZ, _DT_FLAGS, _DT_GNU_HASH, _DT_HASH, _DT_INIT, _DT_INIT_ARRAY, _DT_INIT_ARRAYSZ,
                  _DT_JMPREL, _DT_NEEDED, _DT_NULL, _DT_PLTREL, _DT_PLTRELSZ, _DT_PREINIT_ARRAY, _DT_PREINIT_ARRAYSZ,
                  _DT_REL, _DT_RELA, _DT_RELACOUNT, _DT_RELAENT, _DT_RELASZ, _DT_RELCOUNT, _DT_RELENT, _DT_RELR,
                  _DT_RELRENT, _DT_RELRSZ, _DT_RELSZ, _DT_RPATH, _DT_RUNPATH, _DT_SONAME, _DT_STRSZ, _DT_STRTAB,
                  _DT_SYMENT, _DT_SYMTAB, _DT_TEXTREL, _DT_VERDEF, _DT_VERNEED, _DT_VERSYM, _EHDR32, _EHDR64, _ET_DYN,
                  _MACHINE_NAMES, _MAGIC, _PF_R, _PF_W, _PF_X, _PHDR32, _PHDR64, _PN_XNUM, _PT_DYNAMIC,
                  _PT_GNU_EH_FRAME, _PT_GNU_PROPERTY, _PT_GNU_RELRO, _PT_LOAD, _PT_NOTE, _PT_PHDR, _PT_TLS,
                  _SHDR32, _SHDR64, _SHF_ALLOC, _SHF_EXECINSTR, _SHF_TLS, _SHF_WRITE, _SHN_UNDEF, _SHT_DYNAMIC,
                  _SHT_NOBITS, _STB_WEAK, _STT_FUNC, _STT_GNU_IFUNC, ELFError, file_type)

__all__ = ["check", "check_fd"]

# What the checks look up, derived from the format's numbers or from glibc's ld.so.
_CLEAR_TOP_BIT = bytes(value & 0x7F for value in range(256))
_STRING_TAGS = {_DT_NEEDED: "DT_NEEDED", _DT_SONAME: "DT_SONAME", _DT_RPATH: "DT_RPATH",
                _DT_RUNPATH: "DT_RUNPATH", _DT_AUXILIARY: "DT_AUXILIARY", _DT_FILTER: "DT_FILTER"}
_LIBRARY_TAGS = {_DT_NEEDED, _DT_AUXILIARY, _DT_FILTER}
_LOCAL_BINDING = re.compile(rb"[\x00-\x0f]")                       # st_info >> 4 == STB_LOCAL
_LOCAL_VISIBILITY = re.compile(b"[" + b"".join(re.escape(bytes([v])) for v in range(256) if v & 3 in (1, 2)) + b"]")
# The access a section's flags (SHF_WRITE, SHF_EXECINSTR) need from the segment that maps it.
_SECTION_ACCESS = {0: _PF_R, _SHF_WRITE: _PF_R | _PF_W, _SHF_EXECINSTR: _PF_R | _PF_X,
                   _SHF_WRITE | _SHF_EXECINSTR: _PF_R | _PF_W | _PF_X}

# Machines whose ld.so processes only RELA relocations (glibc's generic
# ELF_MACHINE_NO_REL); x86, ARM and MIPS also take REL, as may unlisted ones.
_RELA_ONLY = {2, 15, 18, 20, 21, 22, 43, 62, 183, 243, 258}
# (R_*_RELATIVE, symbolic word relocations, R_*_IRELATIVE) per machine: how an
# init/fini array slot gets its address, and which addends are IFUNC resolvers.
_RELOC_TYPES = {62: (8, {1, 6}, 37), 3: (8, {1, 6}, 42), 183: (1027, {257, 1025}, 1032), 40: (23, {2, 21}, 160),
                243: (3, {1, 2}, 58), 21: (22, {20, 38}, 248), 20: (22, {1, 20}, 248), 22: (12, {4, 10, 22}, 61),
                258: (3, {1, 2}, 12)}
_R_X86_64_RELATIVE64 = 38


def _host_identity() -> tuple[int, int, int]:
    """(class, byte order, machine) of the running interpreter, read from its own ELF header."""
    for candidate in ("/proc/self/exe", sys.executable):
        try:
            with open(candidate, "rb") as f:
                header = f.read(20)
        except OSError:
            continue
        if header[:4] == _MAGIC:
            elf_class, data = header[4:6]
            (machine,) = struct.unpack_from("<H" if data == 1 else ">H", header, 18)
            return elf_class, data, machine
    # No readable executable (unusual sandbox): fall back to what Python itself reports.
    return struct.calcsize("P") // 4, (sys.byteorder == "big") + 1, 0


HOST_CLASS, HOST_DATA, HOST_MACHINE = _host_identity()
_PAGE = os.sysconf("SC_PAGESIZE")


def _describe_machine(machine: int) -> str:
    return _MACHINE_NAMES.get(machine, f"machine {machine}")


# A small library (and the headers and dynamic tables of most large ones) sits
# in its first 64 KiB: one read of it serves every check.
_HEAD_SIZE = 65536


def _corrupt(what: str) -> ELFError:
    return ELFError(f"corrupt {what} (the file is damaged, or not built by a linker)")


class _Segment:
    __slots__ = ("index", "vaddr", "memsz", "offset", "filesz", "flags")

    def __init__(self, index: int, vaddr: int, memsz: int, offset: int, filesz: int, flags: int) -> None:
        self.index, self.vaddr, self.memsz = index, vaddr, memsz
        self.offset, self.filesz, self.flags = offset, filesz, flags

    def file_offset(self, address: int) -> int:
        """Where in the file the byte the loader maps at ``address`` comes from."""
        return self.offset + address - self.vaddr

    def mapped_end(self) -> int:
        """The end of the segment's last page: mapped, so a write there does not fault."""
        return -(-(self.vaddr + self.memsz) // _PAGE) * _PAGE


class _File:
    """The checked file: its reader, its word size and its loadable segments."""

    def __init__(self, fd: int, size: int, head: bytes, elf_class: int, order: str) -> None:
        self.fd, self.size, self.head = fd, size, head
        self.is64 = elf_class == 2
        self.word = 8 if self.is64 else 4
        self.order = order
        self.limit = 1 << (64 if self.is64 else 32)      # where the loader's address arithmetic wraps
        self.loads: list[_Segment] = []
        self.code_starts: set[int] | None = None     # where executable sections start (None: no sections)
        self.eh_frame_hdr: int | None = None         # address of the unwind table's index (PT_GNU_EH_FRAME)
        self.function_ranges: list[tuple[int, int]] = []     # known single-function sections (.init, .fini)

    def read(self, offset: int, size: int, what: str) -> bytes:
        if offset + size > self.size:
            raise ELFError(f"truncated: the {what} ends at byte {offset + size} but the file has {self.size} "
                           "bytes (still being written?)")
        if offset + size <= len(self.head):
            return self.head[offset:offset + size]
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise ELFError(f"truncated while reading the {what} (the file shrank while being checked)")
        return data

    def segment_at(self, address: int, size: int, what: str, flags: int = _PF_R, file_backed: bool = True
                   ) -> _Segment:
        """The PT_LOAD holding [address, address + size) (in its file-backed part), with ``flags`` set."""
        end = address + size
        for segment in self.loads:
            limit = segment.vaddr + (segment.filesz if file_backed else segment.memsz)
            if segment.vaddr <= address and end <= limit:
                if segment.flags & flags != flags:
                    raise _corrupt(f"{what}: it lies in loadable segment {segment.index}, which is not "
                                   f"{_describe_flags(flags)}")
                return segment
        raise _corrupt(f"{what}: [{address:#x}, {end:#x}) is not inside a loaded segment")

    def read_at(self, address: int, size: int, what: str, flags: int = _PF_R) -> bytes:
        """The bytes the loader sees at ``address`` once the segments are mapped."""
        offset = self.segment_at(address, size, what, flags).file_offset(address)
        if offset + size <= len(self.head):             # (inside the first read: the common case, inlined)
            return self.head[offset:offset + size]
        return self.read(offset, size, what)

    def in_image(self, address: int) -> bool:
        return any(s.vaddr <= address < s.vaddr + s.memsz for s in self.loads)

    def is_code(self, address: int) -> bool:
        return any(s.flags & _PF_X and s.vaddr <= address < s.vaddr + s.filesz for s in self.loads)

    def words(self, data: bytes, code: str) -> memoryview:
        """``data`` as an array of native integers (the file's byte order is the host's: checked first)."""
        return memoryview(data).cast(code)


def _describe_flags(flags: int) -> str:
    return "+".join(name for bit, name in ((_PF_R, "readable"), (_PF_W, "writable"), (_PF_X, "executable"))
                    if flags & bit)


def check_fd(fd: int) -> None:
    """Check the open file ``fd`` (read with pread; the file offset is not moved).

    Raises:
        ELFError: with the defect found.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ELFError(f"not a regular file ({file_type(st.st_mode)})")
    file_size = st.st_size
    if file_size < 16:
        raise ELFError(f"not an ELF file: only {file_size} bytes" if file_size else "empty file (0 bytes)")
    head = os.pread(fd, _HEAD_SIZE, 0)
    if head[:4] != _MAGIC:
        raise ELFError(f"not an ELF file (starts with {head[:4]!r}, expected b'\\x7fELF')")
    elf_class, data = head[4:6]
    if elf_class not in _CLASS_NAMES or data not in _DATA_NAMES:
        raise ELFError(f"corrupt ELF identification (class {elf_class}, data {data})")
    if elf_class != HOST_CLASS or data != HOST_DATA:
        raise ELFError(f"wrong ELF class: the file is {_CLASS_NAMES[elf_class]} {_DATA_NAMES[data]}, "
                       f"this process is {_CLASS_NAMES.get(HOST_CLASS)} {_DATA_NAMES.get(HOST_DATA)}")
    f = _File(fd, file_size, head, elf_class, "<" if data == 1 else ">")
    try:
        _check(f)
    except (struct.error, ValueError, IndexError, TypeError) as exc:
        if isinstance(exc, ELFError):
            raise
        raise _corrupt(f"tables ({exc})") from None


def _check(f: _File) -> None:
    if f.is64:
        header_format, ph_format = f.order + _EHDR64, f.order + _PHDR64
    else:
        header_format, ph_format = f.order + _EHDR32, f.order + _PHDR32
    header = f.read(16, struct.calcsize(header_format), "ELF header")
    (e_type, e_machine, _version, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, e_shstrndx) = struct.unpack(header_format, header)
    if HOST_MACHINE and e_machine != HOST_MACHINE:
        raise ELFError(f"built for {_describe_machine(e_machine)}, but this process runs on "
                       f"{_describe_machine(HOST_MACHINE)} (wrong architecture: rebuild it for this machine)")
    if e_type != _ET_DYN:
        kinds = {1: "a relocatable object (.o)", 2: "an executable", 4: "a core dump"}
        raise ELFError(f"not a shared library: it is {kinds.get(e_type, f'ELF type {e_type}')} "
                       "(build it with -shared -fPIC)")
    ph_size = struct.calcsize(ph_format)
    if e_phnum == 0 or e_phnum == _PN_XNUM or e_phentsize != ph_size:
        raise ELFError(f"corrupt program-header table ({e_phnum} entries of {e_phentsize} bytes)")
    table = f.read(e_phoff, e_phnum * ph_size, "program-header table")
    dynamic = _check_program_headers(f, table, ph_format, e_phoff)
    # The section-header table is the last thing a linker writes: reading it
    # also refuses most truncated files.
    if e_shoff and e_shnum:
        _check_sections(f, e_shoff, e_shnum, e_shentsize, e_shstrndx, dynamic[0])
    _check_dynamic(f, e_machine, dynamic)


def _check_program_headers(f: _File, table: bytes, ph_format: str, e_phoff: int) -> tuple:
    """Check the segments; return (vaddr, filesz, flags) of PT_DYNAMIC."""
    headers = []
    for index, fields in enumerate(struct.iter_unpack(ph_format, table)):
        if f.is64:
            p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, p_align = fields
        else:
            p_type, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, p_flags, p_align = fields
        headers.append((index, p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz, p_align))
        if p_type in (_PT_LOAD, _PT_DYNAMIC) and p_offset + p_filesz > f.size:
            kind = "loadable segment" if p_type == _PT_LOAD else "dynamic segment"
            raise ELFError(f"truncated: {kind} {index} ends at byte {p_offset + p_filesz} but the file has "
                           f"{f.size} bytes (still being written?)")
        if p_type == _PT_LOAD:
            # ld.so computes the whole mapping from the first and last segment
            # and maps each with MAP_FIXED inside it: one out of order, or one
            # whose file part outgrows its memory, maps over other memory.
            if p_filesz > p_memsz or p_vaddr + p_memsz >= f.limit:
                raise _corrupt(f"loadable segment {index} (file size {p_filesz:#x}, memory size {p_memsz:#x} "
                               f"at {p_vaddr:#x})")
            if (p_vaddr - p_offset) % _PAGE:
                raise _corrupt(f"loadable segment {index} (address {p_vaddr:#x} and offset {p_offset:#x} are "
                               "not congruent modulo the page size)")
            if f.loads and p_vaddr < f.loads[-1].vaddr + f.loads[-1].memsz:
                raise _corrupt(f"loadable segment {index} (it overlaps or precedes segment {f.loads[-1].index})")
            f.loads.append(_Segment(index, p_vaddr, p_memsz, p_offset, p_filesz, p_flags))
    if not f.loads:
        raise ELFError("no loadable segment (not a usable shared library)")
    if not any(s.flags & _PF_X and s.filesz for s in f.loads):
        raise _corrupt("program headers: no executable loadable segment")
    dynamics = [h for h in headers if h[1] == _PT_DYNAMIC]
    if len(dynamics) != 1:
        raise _corrupt(f"program headers: {len(dynamics)} dynamic segments (a shared library has one)")
    if dynamics[0][5] == 0:
        raise _corrupt("program headers: the dynamic segment is empty")
    for index, p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz, p_align in headers:
        if p_type == _PT_PHDR:
            # ld.so reads the program headers back from this address (dl_iterate_phdr, notes).
            segment = f.segment_at(p_vaddr, len(table), "PT_PHDR")
            if segment.file_offset(p_vaddr) != e_phoff:
                raise _corrupt(f"PT_PHDR: address {p_vaddr:#x} does not map the program headers at byte {e_phoff}")
        elif p_type in (_PT_NOTE, _PT_GNU_PROPERTY) and p_memsz:
            _check_notes(f, p_vaddr, p_memsz, p_align, index)
        elif p_type == _PT_TLS and p_memsz:
            if p_filesz > p_memsz or p_align & (p_align - 1):
                raise _corrupt(f"TLS segment {index} (file size {p_filesz:#x}, memory size {p_memsz:#x}, "
                               f"alignment {p_align:#x})")
            f.segment_at(p_vaddr, p_filesz, f"TLS segment {index}")
        elif p_type == _PT_GNU_EH_FRAME:
            f.eh_frame_hdr = p_vaddr
        elif p_type == _PT_GNU_RELRO and p_memsz:
            # After relocating, ld.so makes these pages read-only: outside one
            # writable segment that would remove access another mapping needs.
            # (lld extends it to the end of the segment's last page.)
            segment = f.segment_at(p_vaddr, 1, "PT_GNU_RELRO", _PF_R | _PF_W, file_backed=False)
            if p_vaddr + p_memsz > segment.mapped_end():
                raise _corrupt(f"PT_GNU_RELRO: it runs past loadable segment {segment.index}")
    _index, _type, flags, _offset, vaddr, filesz, _memsz, _align = dynamics[0]
    return vaddr, filesz, flags


def _check_sections(f: _File, e_shoff: int, e_shnum: int, e_shentsize: int, e_shstrndx: int,
                    dynamic_address: int) -> None:
    """Cross-check the program headers against the section headers, which the loader never reads.

    A linker places every allocated section inside a loadable segment with
    the access it needs, at the file offset the segment maps. Program
    headers that disagree (a segment dropped, shrunk, moved in the file, or
    stripped of write or execute access) map the library's code and data
    wrongly, and its own code would crash: refuse them while the section
    headers can still tell. (A library stripped of its section headers gets
    the other checks only.)
    """
    section_format = f.order + (_SHDR64 if f.is64 else _SHDR32)
    if e_shentsize != struct.calcsize(section_format):
        raise _corrupt(f"section-header table (entries of {e_shentsize} bytes)")
    f.code_starts = code_starts = set()
    table = f.read(e_shoff, e_shnum * e_shentsize, "section-header table")
    loads = f.loads
    starts = [segment.vaddr for segment in loads]
    # (vaddr, end of the file-backed part, end in memory, flags, file offset - vaddr), per segment: the loop
    # below runs for every section, on every load.
    bounds = [(s.vaddr, s.vaddr + s.filesz, s.vaddr + s.memsz, s.flags, s.offset - s.vaddr) for s in loads]
    code_sections = []
    sections = list(struct.iter_unpack(section_format, table))
    for index, (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, *_rest) in enumerate(sections):
        if sh_type == _SHT_DYNAMIC and sh_addr != dynamic_address:
            raise _corrupt(f"program headers: PT_DYNAMIC is at {dynamic_address:#x}, the dynamic section at "
                           f"{sh_addr:#x}")
        if not sh_flags & _SHF_ALLOC or not sh_size or (sh_flags & _SHF_TLS and sh_type == _SHT_NOBITS):
            continue
        in_file = sh_type != _SHT_NOBITS
        position = max(bisect.bisect_right(starts, sh_addr) - 1, 0)
        flags = _SECTION_ACCESS[sh_flags & (_SHF_WRITE | _SHF_EXECINSTR)]
        vaddr, file_end, memory_end, segment_flags, delta = bounds[position]
        if sh_addr < vaddr or sh_addr + sh_size > (file_end if in_file else memory_end) \
                or segment_flags & flags != flags or (in_file and sh_addr + delta != sh_offset):
            f.segment_at(sh_addr, sh_size, f"program headers: section {index}", flags, file_backed=in_file)
            raise _corrupt(f"program headers: loadable segment {loads[position].index} maps section {index} from "
                           f"byte {sh_addr + delta}, but it is at byte {sh_offset}")
        if sh_flags & _SHF_EXECINSTR:
            code_starts.add(sh_addr)
            code_sections.append((sh_name, sh_addr, sh_size))
    # .init and .fini each hold one function (_init, _fini), with no unwind
    # entry to say so: remember their extent for _function_start.
    if code_sections and e_shstrndx < len(sections):
        _n, _t, _f, _a, names_offset, names_size, *_rest = sections[e_shstrndx]
        names = f.read(names_offset, names_size, "section names")
        for sh_name, sh_addr, sh_size in code_sections:
            if names[sh_name:sh_name + 6] in (b".init\0", b".fini\0"):
                f.function_ranges.append((sh_addr, sh_addr + sh_size))


def _check_notes(f: _File, address: int, size: int, align: int, index: int) -> None:
    """x86 and AArch64 ld.so parse the notes of PT_NOTE/PT_GNU_PROPERTY in memory (GNU properties)."""
    data = f.read_at(address, size, f"note segment {index}")
    if align not in (4, 8):
        return                       # ld.so skips notes of other alignments
    position = 0
    while position + 12 <= size:
        namesz, descsz, _type = struct.unpack_from(f.order + "III", data, position)
        name_end = position + 12 + namesz
        desc_start = (name_end + align - 1) & -align
        if desc_start + descsz > size:
            raise _corrupt(f"note segment {index}: a note of {descsz} bytes runs past the segment's end")
        position = (desc_start + descsz + align - 1) & -align


class _Dynamic:
    """The dynamic entries (the last of each tag wins, as in ld.so), with readers for the tables they name."""

    def __init__(self, f: _File, entries: dict, needed: list[tuple[int, int]]) -> None:
        self.f, self.entries, self.needed = f, entries, needed
        self.get = entries.get            # tag -> value or None (the dict's own method: called often)

    def require(self, tag: int, names: tuple[str, str]) -> int:
        value = self.entries.get(tag)
        if value is None:
            raise _corrupt(f"dynamic section: {names[1]} without {names[0]} (ld.so dereferences it)")
        return value


def _check_dynamic(f: _File, machine: int, dynamic: tuple) -> None:
    vaddr, filesz, flags = dynamic
    entry_format = f.order + ("qQ" if f.is64 else "iI")
    entry_size = 2 * f.word
    # ld.so adds the load address to the dynamic entries in place unless PT_DYNAMIC is read-only.
    need = _PF_R | (flags & _PF_W)
    data = f.read_at(vaddr, filesz // entry_size * entry_size, "dynamic section", need)
    entries: dict[int, int] = {}
    needed = []
    for tag, value in struct.iter_unpack(entry_format, data):
        if tag == _DT_NULL:
            break
        if tag in _STRING_TAGS:
            needed.append((tag, value))
        entries[tag & (f.limit - 1)] = value
    else:
        raise _corrupt("dynamic section: no DT_NULL entry ends it")
    d = _Dynamic(f, entries, needed)
    strtab = _check_strings(f, d)
    nsyms = _check_hash_tables(f, d)
    tables = _relocation_tables(f, d, machine)
    # ld.so reads symtab[i] (and versym[i]) for every symbol a relocation
    # names, whether or not a hash table counts it (a library that exports
    # nothing has an empty one).
    nsyms = max([nsyms] + [max(indexes) + 1 for *_rest, indexes in tables if indexes])
    symbols = _check_symbols(f, d, nsyms, len(strtab))
    _check_versions(f, d, nsyms, strtab)
    _check_code_pointers(f, d, symbols)
    _check_relocations(f, d, machine, tables, nsyms, symbols)


def _check_strings(f: _File, d: _Dynamic) -> bytes:
    """Check DT_STRTAB and the names the dynamic section gives by offset into it; return the table."""
    # ld.so reads both tables unconditionally (relocating, looking up symbols).
    strtab = d.require(_DT_STRTAB, ("DT_STRTAB", "a library"))
    d.require(_DT_SYMTAB, ("DT_SYMTAB", "a library"))
    strsz = d.require(_DT_STRSZ, ("DT_STRSZ", "DT_STRTAB"))
    table = f.read_at(strtab, strsz, "string table (DT_STRTAB)")
    if not table.endswith(b"\0"):
        raise _corrupt("string table (DT_STRTAB): it does not end with a NUL byte")
    for tag, offset in d.needed:
        if offset >= strsz:
            raise _corrupt(f"dynamic section: {_STRING_TAGS[tag]} names offset {offset}, past the string "
                           f"table's {strsz} bytes")
        # An empty name would make ld.so load the main program as a dependency.
        if tag in _LIBRARY_TAGS and not table[offset]:
            raise _corrupt(f"dynamic section: {_STRING_TAGS[tag]} names an empty file name")
    return table


def _string(table: bytes, offset: int) -> bytes:
    return table[offset:table.index(b"\0", offset)]


def _check_hash_tables(f: _File, d: _Dynamic) -> int:
    """Check DT_GNU_HASH and DT_HASH; return the number of symbols they imply."""
    counts = []
    gnu = d.get(_DT_GNU_HASH)
    if gnu is not None:
        counts.append(_check_gnu_hash(f, gnu))
    sysv = d.get(_DT_HASH)
    if sysv is not None:
        nbucket, nchain = struct.unpack(f.order + "II", f.read_at(sysv, 8, "hash table (DT_HASH)"))
        table = f.words(f.read_at(sysv + 8, 4 * (nbucket + nchain), "hash table (DT_HASH)"), "I")
        if table and max(table.tolist()) >= max(nchain, 1):
            raise _corrupt(f"hash table (DT_HASH): it names a symbol past its {nchain} chains")
        counts.append(nchain)
    if not counts:
        return 0
    return max(counts)


def _check_gnu_hash(f: _File, address: int) -> int:
    what = "GNU hash table (DT_GNU_HASH)"
    nbuckets, symoffset, bloom_size, _shift = struct.unpack(f.order + "IIII", f.read_at(address, 16, what))
    # ld.so asserts a power of two, then masks with bloom_size - 1: zero would index anywhere.
    if bloom_size == 0 or bloom_size & (bloom_size - 1):
        raise _corrupt(f"{what}: bloom filter of {bloom_size} words (must be a power of two)")
    buckets_at = address + 16 + bloom_size * f.word
    buckets = f.words(f.read_at(address + 16, bloom_size * f.word + 4 * nbuckets, what)[bloom_size * f.word:],
                      "I")
    chains_at = buckets_at + 4 * nbuckets
    used = list(filter(None, buckets.tolist()))
    if not used:
        return symoffset
    if min(used) < symoffset:
        raise _corrupt(f"{what}: a bucket names symbol {min(used)}, before symoffset {symoffset}")
    # Chains run in bucket order; the last one ends the table. ld.so follows a
    # chain until an entry with the low bit set: it must come inside the file
    # (the last chain is short: read it an entry at a time).
    index = max(used) - symoffset
    while not struct.unpack(f.order + "I", f.read_at(chains_at + 4 * index, 4, f"{what}, its last chain"))[0] & 1:
        index += 1
    return symoffset + index + 1


class _Symbols:
    """The dynamic symbol table, as columns (native integers: the byte order is the host's)."""

    def __init__(self, f: _File, data: bytes) -> None:
        # The columns of _SYM64 / _SYM32 (24 and 16 bytes), cut by stride.
        # (tolist(): iterating a strided memoryview is several times slower)
        if f.is64:
            self.names = f.words(data, "I")[0::6].tolist()
            self.info, self.other = data[4::24], data[5::24]
            self.shndx, self.values = f.words(data, "H")[3::12], f.words(data, "Q")[1::3].tolist()
        else:
            self.names, self.values = f.words(data, "I")[0::4].tolist(), f.words(data, "I")[1::4].tolist()
            self.info, self.other, self.shndx = data[12::16], data[13::16], f.words(data, "H")[7::8]

    def binding_locally(self) -> set[int]:
        """The symbols ld.so resolves to themselves without a lookup: STB_LOCAL, or hidden/internal visibility.

        (A regular-expression scan: few symbols match, and the table may hold thousands.)
        """
        return {match.start() for match in _LOCAL_BINDING.finditer(self.info)} | {
            match.start() for match in _LOCAL_VISIBILITY.finditer(self.other)}


# st_info -> 1 for functions and IFUNC resolvers (ld.so calls both), else 0.
_FUNCTION_TYPES = bytes(1 if kind & 0xF in (_STT_FUNC, _STT_GNU_IFUNC) else 0 for kind in range(256))


def _check_symbols(f: _File, d: _Dynamic, nsyms: int, strsz: int) -> _Symbols | None:
    sym_size = 24 if f.is64 else 16
    syment = d.get(_DT_SYMENT)
    if syment is not None and syment != sym_size:
        raise _corrupt(f"dynamic section: DT_SYMENT is {syment} (expected {sym_size})")
    data = f.read_at(d.entries[_DT_SYMTAB], nsyms * sym_size, f"symbol table (DT_SYMTAB, {nsyms} symbols)")
    if not nsyms:
        return None
    symbols = _Symbols(f, data)
    if max(symbols.names) >= strsz:                     # (strsz >= 1: the table ends with a NUL)
        raise _corrupt(f"symbol table: a symbol name lies past the string table's {strsz} bytes")
    # ld.so skips symbols whose value is 0 (undefined); any other function's
    # address is called, by the user or (an IFUNC resolver) by ld.so itself.
    functions = list(filter(None, itertools.compress(symbols.values, symbols.info.translate(_FUNCTION_TYPES))))
    if functions:
        _check_code(f, functions, "symbol table: function symbol")
    return symbols


def _check_code(f: _File, addresses: list[int], what: str) -> None:
    low, high = min(addresses), max(addresses)
    if any(s.flags & _PF_X and s.vaddr <= low and high < s.vaddr + s.filesz for s in f.loads):
        return
    for address in addresses:
        if not f.is_code(address):
            raise _corrupt(f"{what} at {address:#x} is not in an executable segment")


def _linked(f: _File, start: int, what: str):
    """The addresses of a list ld.so follows by relative offsets until one is 0 (the version tables).

    A generator: after each address, ``send()`` it the entry's offset to the
    next. Refuses a list that comes back to an entry (an address wraps in
    32-bit arithmetic): ld.so would follow it for ever.
    """
    seen = set()
    address = start
    while address not in seen:
        seen.add(address)
        step = yield address
        yield                                   # (the value send() returns)
        if not step:
            return
        address = (address + step) % f.limit
    raise _corrupt(f"{what}: a list that loops back on itself")


def _check_versions(f: _File, d: _Dynamic, nsyms: int, strtab: bytes) -> None:
    """The walk glibc's _dl_check_map_versions makes, and the version table it builds from it."""
    strsz = len(strtab)
    highest = 0
    verneed = d.get(_DT_VERNEED)
    if verneed is not None:
        # ld.so asserts that each file named here is one it loaded: a DT_NEEDED entry.
        needed = {_string(strtab, offset) for tag, offset in d.needed if tag == _DT_NEEDED}
        what = "version needs (DT_VERNEED)"
        entries = _linked(f, verneed, what)
        for entry in entries:
            version, _cnt, file, aux, next_entry = struct.unpack(f.order + "HHIII", f.read_at(entry, 16, what))
            if version != 1 and entry == verneed:
                # ld.so refuses it (and checks the first entry only)
                raise _corrupt(f"{what}: version {version} of the structure (1 expected)")
            if file >= strsz or _string(strtab, file) not in needed:
                raise _corrupt(f"{what}: a version of a file that is not a DT_NEEDED entry")
            items = _linked(f, entry + aux, what)
            for item in items:
                _hash, _flags, other, name, next_aux = struct.unpack(f.order + "IHHII", f.read_at(item, 16, what))
                if name >= strsz:
                    raise _corrupt(f"{what}: a version name past the string table")
                highest = max(highest, other & 0x7FFF)
                items.send(next_aux)
            entries.send(next_entry)
    verdef = d.get(_DT_VERDEF)
    if verdef is not None:
        what = "version definitions (DT_VERDEF)"
        entries = _linked(f, verdef, what)
        for entry in entries:
            _version, _flags, ndx, _cnt, _hash, aux, next_entry = struct.unpack(
                f.order + "HHHHIII", f.read_at(entry, 20, what))
            (name, _next) = struct.unpack(f.order + "II", f.read_at((entry + aux) % f.limit, 8, what))
            if name >= strsz:
                raise _corrupt(f"{what}: a version name past the string table")
            highest = max(highest, ndx & 0x7FFF)
            entries.send(next_entry)
    versym = d.get(_DT_VERSYM)
    if highest and versym is None:
        raise _corrupt("dynamic section: versions without DT_VERSYM (ld.so dereferences it)")
    if versym is not None and nsyms:
        # Relocations index the table ld.so built with each symbol's version:
        # an index past it reads a wild pointer.
        data = f.read_at(versym, 2 * nsyms, "symbol versions (DT_VERSYM)")
        if max(f.words(data, "H").tolist()) > highest:
            masked = bytearray(data)           # clear the "hidden" bit (bit 15) of each entry
            high = slice(1, None, 2) if sys.byteorder == "little" else slice(0, None, 2)
            masked[high] = masked[high].translate(_CLEAR_TOP_BIT)
            top = max(f.words(bytes(masked), "H").tolist())
            if top > highest:
                raise _corrupt(f"symbol versions (DT_VERSYM): version index {top} is not defined or needed")


def _check_code_pointers(f: _File, d: _Dynamic, symbols: _Symbols | None) -> None:
    """ld.so calls DT_INIT at dlopen and DT_FINI at dlclose, and reads the arrays' sizes unchecked."""
    for tag, name in ((_DT_INIT, "DT_INIT"), (_DT_FINI, "DT_FINI")):
        address = d.get(tag)
        if address is None:
            continue
        if not f.is_code(address):
            raise _corrupt(f"dynamic section: {name} ({address:#x}) is not in an executable segment")
        # ld.so calls it: it must be where a function starts, when that can be told.
        if _function_start(f, address, symbols) is False:
            raise _corrupt(f"dynamic section: {name} ({address:#x}) is not the start of a function")
    for tag, size_tag, name in ((_DT_INIT_ARRAY, _DT_INIT_ARRAYSZ, "DT_INIT_ARRAY"),
                                (_DT_FINI_ARRAY, _DT_FINI_ARRAYSZ, "DT_FINI_ARRAY"),
                                (_DT_PREINIT_ARRAY, _DT_PREINIT_ARRAYSZ, "DT_PREINIT_ARRAY")):
        address = d.get(tag)
        if address is None:
            continue
        size = d.require(size_tag, (name + "SZ", name))
        if size % f.word:
            raise _corrupt(f"dynamic section: {name}SZ is {size}, not a multiple of {f.word}")
        f.segment_at(address, size, name)


def _function_start(f: _File, address: int, symbols: _Symbols | None) -> bool | None:
    """Is ``address`` where a function starts? None: cannot tell.

    Known starts: executable sections (.init, .fini), exported functions, and
    the functions the unwind tables index (PT_GNU_EH_FRAME, the .eh_frame_hdr
    binary-search table, in the encoding GCC and LLVM use). Inside .init or
    .fini (one function each) is known not to be a start; elsewhere, without
    both the unwind index and the section headers, nobody can tell.
    """
    if f.code_starts and address in f.code_starts:
        return True
    if symbols is not None and address in symbols.values:
        return True
    if any(start < address < end for start, end in f.function_ranges):
        return False
    # .init and .fini have no unwind entry: without section headers to say
    # where they start, the unwind index cannot tell a start from a middle.
    if f.eh_frame_hdr is None or f.code_starts is None:
        return None
    try:
        header = f.read_at(f.eh_frame_hdr, 12, "unwind table index")
    except ELFError:
        return None                     # unwind tables are not the loader's business
    version, _ptr_enc, count_enc, table_enc = header[:4]
    if version != 1 or count_enc != 0x03 or table_enc != 0x3B:     # udata4 count, datarel sdata4 table
        return None
    (count,) = struct.unpack_from(f.order + "I", header, 8)
    try:
        table = f.words(f.read_at(f.eh_frame_hdr + 12, 8 * count, "unwind table index"), "i")
    except ELFError:
        return None
    if not count:
        return None                     # built without unwind tables: nothing to tell
    return (address - f.eh_frame_hdr) in table[0::2].tolist()


def _relocation_table(f: _File, d: _Dynamic, tag: int, size_tag: int, entry_tag: int, names: tuple,
                      entry_size: int) -> tuple[int, bytes] | None:
    address = d.get(tag)
    if address is None or (address == 0 and tag != _DT_JMPREL):
        return None
    size = d.require(size_tag, (names[1], names[0]))
    if entry_tag is not None:
        entry = d.require(entry_tag, (names[2], names[0]))
        if entry != entry_size:
            raise _corrupt(f"dynamic section: {names[2]} is {entry} (ld.so asserts {entry_size})")
    if size % entry_size:
        raise _corrupt(f"dynamic section: {names[1]} is {size}, not a multiple of {entry_size}")
    return address, f.read_at(address, size, f"relocations ({names[0]})")


def _relocation_tables(f: _File, d: _Dynamic, machine: int) -> list[tuple]:
    """The relocation tables ld.so applies, as glibc's _ELF_DYNAMIC_DO_RELOC finds them (RTLD_NOW: all now).

    Returns (kind, address, words, relative count, types, symbol indexes) for each.
    """
    word = f.word
    rela_size, rel_size = 3 * word, 2 * word
    pltrel = d.get(_DT_PLTREL)
    allowed = {_DT_RELA} if machine in _RELA_ONLY else {_DT_RELA, _DT_REL}
    if machine in _RELA_ONLY and d.get(_DT_REL):
        raise _corrupt(f"dynamic section: REL relocations, which ld.so on {_describe_machine(machine)} ignores")
    if pltrel is not None and pltrel not in allowed:
        raise _corrupt(f"dynamic section: DT_PLTREL is {pltrel} (ld.so asserts "
                       f"{' or '.join('DT_RELA' if a == _DT_RELA else 'DT_REL' for a in sorted(allowed))})")
    tables = []      # (kind, address, data, relative count): kind is "rela" or "rel"
    rela = _relocation_table(f, d, _DT_RELA, _DT_RELASZ, _DT_RELAENT, ("DT_RELA", "DT_RELASZ", "DT_RELAENT"),
                             rela_size)
    if rela:
        tables.append(("rela", *rela, d.get(_DT_RELACOUNT) or 0))
    if machine not in _RELA_ONLY:
        rel = _relocation_table(f, d, _DT_REL, _DT_RELSZ, _DT_RELENT, ("DT_REL", "DT_RELSZ", "DT_RELENT"),
                                rel_size)
        if rel:
            tables.append(("rel", *rel, d.get(_DT_RELCOUNT) or 0))
    for kind, _address, data, relative in tables:
        # ld.so applies the first DT_RELACOUNT entries as relative ones, and
        # does not stop at the end of the table.
        if relative > len(data) // (rela_size if kind == "rela" else rel_size):
            raise _corrupt(f"dynamic section: DT_{kind.upper()}COUNT ({relative}) exceeds the "
                           f"{len(data) // (rela_size if kind == 'rela' else rel_size)} relocations")
    # ld.so processes the PLT relocations when DT_PLTREL is present, reading
    # DT_JMPREL and DT_PLTRELSZ without checking they exist.
    if pltrel is not None or d.get(_DT_JMPREL) is not None:
        if pltrel is None:
            raise _corrupt("dynamic section: DT_JMPREL without DT_PLTREL (ld.so would not apply them)")
        d.require(_DT_JMPREL, ("DT_JMPREL", "DT_PLTREL"))
        kind = "rela" if pltrel == _DT_RELA else "rel"
        address, data = _relocation_table(f, d, _DT_JMPREL, _DT_PLTRELSZ, None,
                                          ("DT_JMPREL", "DT_PLTRELSZ", ""), rela_size if kind == "rela" else rel_size)
        for other_kind, other_address, other_data, _relative in tables:
            # ld.so takes a DT_JMPREL that ends where DT_RELA ends as nested in
            # it (old linkers) and subtracts its size: it must start inside.
            if other_kind == kind and other_address + len(other_data) == address + len(data) and \
                    address < other_address:
                raise _corrupt("dynamic section: DT_JMPREL overlaps the start of the other relocations")
        tables.append((kind, address, data, 0))
    code = "Q" if f.is64 else "I"
    result = []
    for kind, address, data, relative in tables:
        words = f.words(data, code)
        types, indexes = _split_info(f, words[1::3 if kind == "rela" else 2])
        result.append((kind, address, words, relative, types, indexes))
    return result


def _check_relocations(f: _File, d: _Dynamic, machine: int, tables: list[tuple], nsyms: int,
                       symbols: _Symbols | None) -> None:
    """Where the relocations write, what symbols they take, and what the init/fini arrays end up calling."""
    word = f.word
    relr = None
    if d.get(_DT_RELR) is not None:
        relr = _relocation_table(f, d, _DT_RELR, _DT_RELRSZ, _DT_RELRENT, ("DT_RELR", "DT_RELRSZ", "DT_RELRENT"),
                                 word)
    textrel = _DT_TEXTREL in d.entries or (d.get(_DT_FLAGS) or 0) & _DF_TEXTREL
    writable = [s for s in f.loads if textrel or s.flags & _PF_W]
    code = "Q" if f.is64 else "I"
    types_known = _RELOC_TYPES.get(machine)
    slots = _array_slots(f, d)
    local = symbols.binding_locally() if symbols is not None else set()
    relocated: dict[int, int] = {}
    for kind, address, words, relative, types, indexes in tables:
        columns = 3 if kind == "rela" else 2
        offsets = words[0::columns].tolist()
        if not offsets:
            continue
        what = f"relocations at {address:#x}"
        _check_targets(f, offsets, writable, what)
        if local:
            for index in local.intersection(indexes):
                # A symbol that binds locally is taken from this file without
                # a lookup: undefined, it would resolve to the load address.
                if index and not (symbols.shndx[index] != _SHN_UNDEF and f.in_image(symbols.values[index])):
                    raise _corrupt(f"{what}: symbol {index} binds locally but is not defined in the file")
        if types_known is None:
            continue
        relative_type, symbolic_types, irelative_type = types_known
        if relative and types[:relative] != [relative_type] * relative and any(
                kind_ not in (relative_type, _R_X86_64_RELATIVE64 if machine == 62 else relative_type)
                for kind_ in types[:relative]):
            raise _corrupt(f"{what}: one of the first {relative} (DT_RELACOUNT) is not a relative relocation "
                           "(ld.so asserts it)")
        addends = _addends(f, kind, words, columns, offsets)
        if irelative_type in types:
            # ld.so calls an IFUNC resolver at the load address plus the addend.
            _check_code(f, [addends(i) for i, t in enumerate(types) if t == irelative_type],
                        f"{what}: IFUNC resolver")
        if slots:
            positions = {slot: offsets.index(slot) for slot in slots if slot in offsets}
            for slot, i in positions.items():
                if i < relative or types[i] == relative_type:
                    relocated[slot] = addends(i)
                elif types[i] in symbolic_types and symbols is not None and symbols.values[indexes[i]]:
                    relocated[slot] = symbols.values[indexes[i]] + addends(i)
                elif types[i] in symbolic_types and symbols is not None and \
                        symbols.info[indexes[i]] >> 4 != _STB_WEAK:
                    relocated[slot] = -1          # another library's function (dlopen fails if it is missing)
    if relr:
        addresses = _decode_relr(f, relr[1])
        _check_targets(f, sorted(addresses), writable, "relative relocations (DT_RELR)")
        for slot in slots:
            if slot in addresses:
                relocated[slot] = struct.unpack(f.order + code, f.read_at(slot, word, "init/fini array"))[0]
    if types_known is not None:
        # ld.so calls every slot of the init/fini arrays, as relocated.
        for slot, name in slots.items():
            target = relocated.get(slot)
            if target is None:
                raise _corrupt(f"dynamic section: {name} slot at {slot:#x} is not relocated to a function")
            if target >= 0 and not f.is_code(target):
                raise _corrupt(f"dynamic section: {name} slot at {slot:#x} is relocated to {target:#x}, which "
                               "is not in an executable segment")


def _split_info(f: _File, infos: memoryview) -> tuple[list[int], list[int]]:
    """The (type, symbol index) columns of relocation r_info words."""
    if f.is64:
        halves = memoryview(infos.tobytes()).cast("I")
        low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
        return halves[low::2].tolist(), halves[high::2].tolist()
    values = infos.tolist()
    return [value & 0xFF for value in values], [value >> 8 for value in values]


def _addends(f: _File, kind: str, words: memoryview, columns: int, offsets: list[int]):
    """A function: relocation i -> its addend (RELA: r_addend, signed; REL: the word at its target)."""
    bits = 8 * f.word
    if kind == "rela":
        def addend(i: int) -> int:
            value = words[i * columns + 2]
            return value - (1 << bits) if value >> (bits - 1) else value
    else:
        def addend(i: int) -> int:
            target = offsets[i]
            return struct.unpack(f.order + ("Q" if f.is64 else "I"), f.read_at(target, f.word, "relocated word"))[0]
    return addend


def _array_slots(f: _File, d: _Dynamic) -> dict[int, str]:
    slots = {}
    for tag, size_tag, name in ((_DT_INIT_ARRAY, _DT_INIT_ARRAYSZ, "DT_INIT_ARRAY"),
                                (_DT_FINI_ARRAY, _DT_FINI_ARRAYSZ, "DT_FINI_ARRAY")):
        address = d.get(tag)
        if address is not None:
            for slot in range(address, address + d.entries[size_tag], f.word):
                slots[slot] = name
    return slots


def _check_targets(f: _File, offsets, writable: list[_Segment], what: str) -> None:
    """Every relocation writes a word at its offset: it must land in memory ld.so may write."""
    low, high = min(offsets), max(offsets)

    def holds(segment: _Segment, start: int, end: int) -> bool:
        limit = segment.mapped_end()
        return segment.vaddr <= start and end + f.word <= limit

    if any(holds(segment, low, high) for segment in writable):
        return
    starts = [segment.vaddr for segment in writable]
    for offset in offsets:
        position = bisect.bisect_right(starts, offset) - 1
        if position < 0 or not holds(writable[position], offset, offset):
            raise _corrupt(f"{what}: one writes to {offset:#x}, outside every writable segment")


def _decode_relr(f: _File, data: bytes) -> set[int]:
    """The addresses a DT_RELR table relocates (each word: an address, or a bitmap of the next words)."""
    addresses = set()
    bits = 8 * f.word - 1
    base = 0
    for entry in f.words(data, "Q" if f.is64 else "I"):
        if entry & 1 == 0:
            addresses.add(entry)
            base = entry + f.word
        else:
            bitmap, position = entry >> 1, 0
            while bitmap:
                if bitmap & 1:
                    addresses.add(base + position * f.word)
                bitmap >>= 1
                position += 1
            base += bits * f.word
    return addresses


def check(path: str | os.PathLike) -> None:
    """Check the file at ``path``; see :func:`check_fd`. Never blocks on a FIFO or device.

    Raises:
        ELFError: with the defect found (also: not a regular file).
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        check_fd(fd)
    finally:
        os.close(fd)
