"""The ELF readers (elf.find_section, read_section, defined_symbols): what they find in real libraries, as readelf
does, and the ELFError they give for every file they cannot read, in each ELF class and byte order.

These readers run before any check or load: `nativereload cdef` reads a library's exported names, and the
interface reader its embedded header. So each defect here is tested on the reader itself, not through
elfcheck.check, which refuses most of them first.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess

import pytest

from nativereload import elf

from conftest import open_fds
from elfedit import ElfEdit

SHT_PROGBITS, SHT_STRTAB, SHT_NOBITS, SHT_DYNSYM = 1, 3, 8, 11
STB_LOCAL, STB_GLOBAL, STB_WEAK, STB_GNU_UNIQUE = 0, 1, 2, 10
STV_DEFAULT, STV_HIDDEN, STV_PROTECTED = 0, 2, 3


def readelf(*args):
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True, check=True).stdout


def sections_by_readelf(path):
    """name -> (offset, size) as readelf lists them (NOBITS sections with size 0)."""
    found = {}
    for line in readelf("-S", str(path)).splitlines():
        match = re.match(r"\s*\[\s*[1-9]\d*\]\s+(\S+)\s+(\S+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if match:
            name, kind, offset, size = match.groups()
            found[name] = (int(offset, 16), 0 if kind == "NOBITS" else int(size, 16))
    return found


def exports_by_readelf(path):
    """The symbols dlsym can find, as readelf --dyn-syms lists them: defined, global/weak/unique, not hidden."""
    names = set()
    for line in readelf("--dyn-syms", str(path)).splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0].endswith(":") and fields[6] != "UND" and \
                fields[4] in ("GLOBAL", "WEAK", "UNIQUE") and fields[5] in ("DEFAULT", "PROTECTED"):
            names.add(fields[7].split("@")[0])
    return names


def with_fd(path, reader, *args):
    fd = os.open(path, os.O_RDONLY)
    try:
        return reader(fd, *args)
    finally:
        os.close(fd)


# -- real libraries, 64-bit and 32-bit, against readelf ----------------------------------------------------


@pytest.mark.parametrize("which", ["v1", "objects1", "contract", "x32"])
def test_every_section_and_export_is_found_as_readelf_finds_it(samples, x32, which):
    path = x32 if which == "x32" else samples[which]
    listed = sections_by_readelf(path)
    assert ".dynstr" in listed and ".dynsym" in listed
    for name, where in listed.items():
        assert with_fd(path, elf.find_section, name) == where, name
    assert with_fd(path, elf.find_section, ".no-such-section") is None
    dynstr_offset, dynstr_size = listed[".dynstr"]
    assert with_fd(path, elf.read_section, ".dynstr") == path.read_bytes()[dynstr_offset:dynstr_offset + dynstr_size]
    assert elf.defined_symbols(path) == exports_by_readelf(path) != set()


def test_a_name_that_is_the_tail_of_another_is_found(samples):
    # The linker stores ".plt" as the end of ".rela.plt": a section's name may start inside another name.
    path = samples["v1"]
    names = with_fd(path, elf.read_section, ".shstrtab")
    assert b"\0.plt\0" not in names and b".rela.plt\0" in names
    assert with_fd(path, elf.find_section, ".plt") == sections_by_readelf(path)[".plt"]
    # ... while a tail that names no section is not a section.
    assert with_fd(path, elf.find_section, "plt") is None
    assert with_fd(path, elf.find_section, "dynstr") is None


def test_a_section_without_file_space_has_size_zero(samples):
    path = samples["v1"]
    offset, size = with_fd(path, elf.find_section, ".bss")
    assert size == 0 and offset == sections_by_readelf(path)[".bss"][0]
    assert with_fd(path, elf.read_section, ".bss") == b""


def test_a_library_without_section_headers_has_no_sections_and_no_exports(samples, tmp_path):
    edit = ElfEdit(samples["v1"].read_bytes())
    edit.strip_sections()
    path = tmp_path / "stripped.so"
    path.write_bytes(bytes(edit.data))
    assert with_fd(path, elf.find_section, ".dynstr") is None
    assert elf.defined_symbols(path) == set()


# -- a small ELF file of any class and byte order, built here ----------------------------------------------


def tiny_elf(wide=True, order="<", symbols=(("exported", STB_GLOBAL, STV_DEFAULT, 1),), last=".shstrtab"):
    """An ELF shared-object file with only a header, section headers and three sections (.dynsym, .dynstr,
    .shstrtab), laid out as: header, section-header table, then the sections with ``last`` at the end of the file.

    ``symbols``: (name, binding, visibility, section index) each; section index 0 is undefined, and a name of
    None is the string table's offset 0 (the empty name).
    """
    names = b"\0.dynsym\0.dynstr\0.shstrtab\0"
    dynstr = b"\0" + b"".join(name.encode() + b"\0" for name, *_ in symbols if name is not None)
    entries, at = [bytes(24 if wide else 16)], 1
    for name, binding, visibility, shndx in symbols:
        info, st_name = (binding << 4) | 2, at if name is not None else 0        # STT_FUNC
        entries.append(struct.pack(order + "IBBHQQ", st_name, info, visibility, shndx, 0x1000, 8) if wide else
                       struct.pack(order + "IIIBBH", st_name, 0x1000, 8, info, visibility, shndx))
        at += len(name) + 1 if name is not None else 0
    contents = {".dynsym": b"".join(entries), ".dynstr": dynstr, ".shstrtab": names}
    header_size, entry_size = (64, 64) if wide else (52, 40)
    offset = header_size + 4 * entry_size
    placed = {}
    for name in sorted(contents, key=lambda name: name == last):
        placed[name] = offset
        offset += len(contents[name])
    headers = [(0, 0, 0, 0, 0, 0)]      # (name, type, offset, size, link, entry size)
    headers.append((names.index(b".dynsym"), SHT_DYNSYM, placed[".dynsym"], len(contents[".dynsym"]), 2,
                    24 if wide else 16))
    headers.append((names.index(b".dynstr"), SHT_STRTAB, placed[".dynstr"], len(dynstr), 0, 0))
    headers.append((names.index(b".shstrtab"), SHT_STRTAB, placed[".shstrtab"], len(names), 0, 0))
    table = b"".join(struct.pack(order + "IIQQQQIIQQ", name, kind, 0, 0, at, size, link, 0, 1, entsize) if wide else
                     struct.pack(order + "IIIIIIIIII", name, kind, 0, 0, at, size, link, 0, 1, entsize)
                     for name, kind, at, size, link, entsize in headers)
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if order == "<" else 2, 1]) + bytes(9)
    rest = struct.pack(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"), 3, 62, 1, 0, 0, header_size, 0,
                       header_size, 0, 0, entry_size, len(headers), 3)
    data = ident + rest + table + b"".join(contents[name] for name in placed)
    assert len(ident + rest) == header_size
    return data


class Tiny:
    """A tiny_elf() file, and the offsets of its header's section fields."""

    def __init__(self, tmp_path, wide=True, order="<", **options):
        self.wide, self.order = wide, order
        self.data = bytearray(tiny_elf(wide, order, **options))
        self.path = tmp_path / f"tiny{64 if wide else 32}{'le' if order == '<' else 'be'}.so"
        self.shoff_at, self.shentsize_at = (40, 58) if wide else (32, 46)
        self.entry_size = 64 if wide else 40

    def put(self, at, value, size):
        self.data[at:at + size] = value.to_bytes(size, "little" if self.order == "<" else "big")

    def get(self, at, size):
        return int.from_bytes(self.data[at:at + size], "little" if self.order == "<" else "big")

    def section_field(self, index, field):
        """File offset and size of a field of section ``index``'s header: name, type, offset, size or link."""
        wide_fields = {"name": (0, 4), "type": (4, 4), "offset": (24, 8), "size": (32, 8), "link": (40, 4)}
        narrow_fields = {"name": (0, 4), "type": (4, 4), "offset": (16, 4), "size": (20, 4), "link": (24, 4)}
        at, size = (wide_fields if self.wide else narrow_fields)[field]
        return self.get(self.shoff_at, 8 if self.wide else 4) + index * self.entry_size + at, size

    def set_section(self, index, field, value):
        at, size = self.section_field(index, field)
        self.put(at, value, size)

    def write(self, data=None):
        self.path.write_bytes(bytes(self.data if data is None else data))
        return self.path


SHAPES = [pytest.param(wide, order, id=f"{64 if wide else 32}-bit {'little' if order == '<' else 'big'}-endian")
          for wide in (True, False) for order in ("<", ">")]


@pytest.mark.parametrize("wide, order", SHAPES)
def test_each_class_and_byte_order(tmp_path, wide, order):
    symbols = [("global_function", STB_GLOBAL, STV_DEFAULT, 1), ("weak_function", STB_WEAK, STV_DEFAULT, 1),
               ("unique_object", STB_GNU_UNIQUE, STV_DEFAULT, 1), ("protected_function", STB_GLOBAL, STV_PROTECTED, 1),
               ("hidden_function", STB_GLOBAL, STV_HIDDEN, 1), ("local_function", STB_LOCAL, STV_DEFAULT, 1),
               ("imported_function", STB_GLOBAL, STV_DEFAULT, 0), (None, STB_GLOBAL, STV_DEFAULT, 1)]
    tiny = Tiny(tmp_path, wide, order, symbols=symbols)
    path = tiny.write()
    assert elf.defined_symbols(path) == {"global_function", "weak_function", "unique_object", "protected_function"}
    assert with_fd(path, elf.read_section, ".dynstr").startswith(b"\0global_function\0weak_function\0")
    assert with_fd(path, elf.find_section, ".shstrtab") == (len(tiny.data) - 27, 27)


@pytest.mark.parametrize("wide, order", SHAPES)
@pytest.mark.parametrize("last", [".shstrtab", ".dynstr", ".dynsym"])
def test_a_section_may_end_exactly_at_the_end_of_the_file(tmp_path, wide, order, last):
    path = Tiny(tmp_path, wide, order, last=last).write()
    assert elf.defined_symbols(path) == {"exported"}
    offset, size = with_fd(path, elf.find_section, last)
    assert offset + size == path.stat().st_size


@pytest.mark.parametrize("wide, order", SHAPES)
def test_more_sections_than_the_header_can_count(tmp_path, wide, order):
    # Past 0xff00 sections the ELF header holds 0 (count) and SHN_XINDEX (name table's index), and section 0
    # holds the real values: its size the count, its link the index. Each indirection alone, then both.
    for count_in_section_0, index_in_section_0 in ((True, False), (False, True), (True, True)):
        tiny = Tiny(tmp_path, wide, order)
        shnum_at = tiny.shentsize_at + 2
        if count_in_section_0:
            tiny.set_section(0, "size", tiny.get(shnum_at, 2))
            tiny.put(shnum_at, 0, 2)
        if index_in_section_0:
            tiny.set_section(0, "link", tiny.get(shnum_at + 2, 2))
            tiny.put(shnum_at + 2, 0xFFFF, 2)
        path = tiny.write()
        assert elf.defined_symbols(path) == {"exported"}, (count_in_section_0, index_in_section_0)
        assert with_fd(path, elf.find_section, ".dynstr") is not None


@pytest.mark.parametrize("wide, order", SHAPES)
def test_a_file_whose_only_section_is_the_null_one(tmp_path, wide, order):
    # Counted in section 0, whose header is the last thing in the file: no sections, no names, no exports.
    tiny = Tiny(tmp_path, wide, order)
    table = tiny.get(tiny.shoff_at, 8 if wide else 4)
    del tiny.data[table + tiny.entry_size:]
    tiny.set_section(0, "size", 1)
    tiny.put(tiny.shentsize_at + 2, 0, 2)       # e_shnum: see section 0
    tiny.put(tiny.shentsize_at + 4, 0, 2)       # e_shstrndx: no section names
    path = tiny.write()
    assert with_fd(path, elf.find_section, ".dynstr") is None and elf.defined_symbols(path) == set()


# -- every file the readers cannot read is an ELFError that says why ---------------------------------------


def refused_by_every_reader(path, pattern):
    for read in (lambda: with_fd(path, elf.find_section, ".dynstr"), lambda: with_fd(path, elf.read_section, ".dynstr"),
                 lambda: elf.defined_symbols(path)):
        with pytest.raises(elf.ELFError, match=pattern):
            read()


def test_not_an_elf_file(tmp_path):
    path = tmp_path / "text.so"
    for data in (b"", b"\x7fEL", b"hello, this is not a library at all, but it is long enough to be one\n" * 2):
        path.write_bytes(data)
        refused_by_every_reader(path, "^not an ELF file$")
    for at, value in ((4, 0), (4, 3), (5, 0), (5, 3)):       # the class, then the byte order
        data = bytearray(tiny_elf())
        data[at] = value
        path.write_bytes(bytes(data))
        refused_by_every_reader(path, "^not an ELF file$")


@pytest.mark.parametrize("wide, order", SHAPES)
def test_a_header_cut_short(tmp_path, wide, order):
    tiny = Tiny(tmp_path, wide, order)
    header_size = 64 if wide else 52
    for size in (16, header_size - 1):
        refused_by_every_reader(tiny.write(tiny.data[:size]), "truncated: the file ends inside its ELF header")
    # The header alone, saying there are no section headers: a file with no sections, not a defect.
    header = bytearray(tiny.data[:header_size])
    header[tiny.shoff_at:tiny.shoff_at + (8 if wide else 4)] = bytes(8 if wide else 4)
    path = tiny.write(header)
    assert with_fd(path, elf.find_section, ".dynstr") is None and elf.defined_symbols(path) == set()


@pytest.mark.parametrize("wide, order", SHAPES)
def test_a_section_header_table_cut_short(tmp_path, wide, order):
    tiny = Tiny(tmp_path, wide, order)
    table = tiny.get(tiny.shoff_at, 8 if wide else 4)
    tiny.data[table + 4 * tiny.entry_size:] = b""      # the file ends with the table: no sections after it
    for size in (table + 2 * tiny.entry_size, table + 4 * tiny.entry_size - 1, table + 10):
        refused_by_every_reader(tiny.write(tiny.data[:size]), "truncated: the section-header table ends past")
    # The same, where section 0 must be read for the count.
    shnum_at = tiny.shentsize_at + 2
    tiny.set_section(0, "size", 4)
    tiny.put(shnum_at, 0, 2)
    for size in (table + 10, table + 2 * tiny.entry_size):
        refused_by_every_reader(tiny.write(tiny.data[:size]), "truncated: the section-header table ends past")


@pytest.mark.parametrize("wide, order", SHAPES)
def test_a_corrupt_section_header_table(tmp_path, wide, order):
    tiny = Tiny(tmp_path, wide, order)
    tiny.put(tiny.shentsize_at, tiny.entry_size + 1, 2)
    refused_by_every_reader(tiny.write(), fr"corrupt section-header table \(entries of {tiny.entry_size + 1} bytes, "
                                          fr"expected {tiny.entry_size}\)")
    tiny = Tiny(tmp_path, wide, order)
    tiny.put(tiny.shentsize_at + 4, 4, 2)       # the names are in section 4, of 4
    refused_by_every_reader(tiny.write(), r"corrupt section-header table \(the section names are in section 4, of 4\)")


@pytest.mark.parametrize("wide, order", SHAPES)
@pytest.mark.parametrize("section", [1, 2, 3])
def test_a_section_past_the_end_of_the_file(tmp_path, wide, order, section):
    tiny = Tiny(tmp_path, wide, order)
    offset = tiny.get(*tiny.section_field(section, "offset"))
    tiny.set_section(section, "size", len(tiny.data) - offset + 1)      # one byte past the end
    path = tiny.write()
    with pytest.raises(elf.ELFError, match=r"truncated: a section ends past the end of the file \(still being"):
        elf.defined_symbols(path)
    if section != 1:    # .dynsym is found by type, not looked up by name
        refused_by_every_reader(path, "truncated: a section ends past the end of the file")


def shrink_reads(monkeypatch, when):
    """Each pread for which ``when(size, offset)`` holds returns a byte less: the file shrank after its fstat."""
    real_pread = os.pread
    monkeypatch.setattr(elf.os, "pread", lambda fd, size, offset: real_pread(fd, size, offset)[:-1]
                        if when(size, offset) else real_pread(fd, size, offset))


@pytest.mark.parametrize("what, when", [
    ("the section-header table", lambda size, offset: offset == 64),      # it follows the 64-byte header
    ("the section names", lambda size, offset: size == len(b"\0.dynsym\0.dynstr\0.shstrtab\0")),
    ("a section", lambda size, offset: size == len(b"\0exported\0"))], ids=["table", "names", "dynstr"])
def test_a_file_that_shrinks_while_read(tmp_path, monkeypatch, what, when):
    path = Tiny(tmp_path).write()
    shrink_reads(monkeypatch, when)
    with pytest.raises(elf.ELFError, match=f"^truncated while reading {what} \\(the file shrank while being read\\)$"):
        elf.defined_symbols(path)
    with pytest.raises(elf.ELFError, match=f"^truncated while reading {what} "):
        with_fd(path, elf.read_section, ".dynstr")


def test_the_readers_leave_no_descriptor_open(tmp_path):
    good, bad = Tiny(tmp_path).write(), tmp_path / "bad.so"
    bad.write_bytes(b"not ELF")
    before = open_fds()
    for _ in range(3):
        elf.defined_symbols(good)
        with pytest.raises(elf.ELFError):
            elf.defined_symbols(bad)
    assert open_fds() == before


@pytest.mark.parametrize("wide, order", SHAPES)
def test_a_corrupt_symbol_table(tmp_path, wide, order):
    tiny = Tiny(tmp_path, wide, order)
    tiny.set_section(1, "link", 4)
    with pytest.raises(elf.ELFError, match=r"corrupt dynamic symbol table \(its names are in section 4, of 4\)"):
        elf.defined_symbols(tiny.write())
    tiny = Tiny(tmp_path, wide, order)
    entry = 24 if wide else 16
    tiny.set_section(1, "size", 2 * entry - 1)      # the last entry cut short
    with pytest.raises(elf.ELFError, match=fr"corrupt dynamic symbol table \({2 * entry - 1} bytes: not a whole "
                                            fr"number of {entry}-byte entries\)"):
        elf.defined_symbols(tiny.write())
