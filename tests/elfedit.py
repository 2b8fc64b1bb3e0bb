"""A small editor for 64-bit little-endian ELF shared libraries: the tests' way to break one field at a time.

    edit = ElfEdit(path.read_bytes())
    edit.set_dyn(DT_INIT, 0)                      # the value of a dynamic entry
    edit.set_ph(edit.ph_index(PT_DYNAMIC), "vaddr", 0x100000)
    data = edit.data                              # bytes to write somewhere and check

Only what the tests need; every offset it writes is computed from the file.
"""

from __future__ import annotations

import struct

PT_NULL, PT_LOAD, PT_DYNAMIC, PT_NOTE, PT_PHDR, PT_TLS = 0, 1, 2, 4, 6, 7
PT_GNU_EH_FRAME, PT_GNU_STACK, PT_GNU_RELRO = 0x6474E550, 0x6474E551, 0x6474E552
PF_X, PF_W, PF_R = 1, 2, 4
DT_NULL, DT_NEEDED, DT_PLTRELSZ, DT_PLTGOT, DT_HASH, DT_STRTAB, DT_SYMTAB = 0, 1, 2, 3, 4, 5, 6
DT_RELA, DT_RELASZ, DT_RELAENT, DT_STRSZ, DT_SYMENT, DT_INIT, DT_FINI = 7, 8, 9, 10, 11, 12, 13
DT_SONAME, DT_SYMBOLIC, DT_REL, DT_RELSZ, DT_RELENT, DT_PLTREL, DT_DEBUG = 14, 16, 17, 18, 19, 20, 21
DT_TEXTREL, DT_JMPREL, DT_INIT_ARRAY, DT_FINI_ARRAY, DT_INIT_ARRAYSZ, DT_FINI_ARRAYSZ = 22, 23, 25, 26, 27, 28
DT_FLAGS, DT_PREINIT_ARRAY, DT_PREINIT_ARRAYSZ, DT_RELRSZ, DT_RELR, DT_RELRENT = 30, 32, 33, 35, 36, 37
DT_GNU_HASH, DT_VERSYM, DT_RELACOUNT = 0x6FFFFEF5, 0x6FFFFFF0, 0x6FFFFFF9
DT_VERDEF, DT_VERDEFNUM, DT_VERNEED, DT_VERNEEDNUM = 0x6FFFFFFC, 0x6FFFFFFD, 0x6FFFFFFE, 0x6FFFFFFF
DT_FILTER = 0x7FFFFFFF

_PH_FIELDS = {"type": (0, "I"), "flags": (4, "I"), "offset": (8, "Q"), "vaddr": (16, "Q"), "paddr": (24, "Q"),
              "filesz": (32, "Q"), "memsz": (40, "Q"), "align": (48, "Q")}


class ElfEdit:
    def __init__(self, data: bytes) -> None:
        assert data[:6] == b"\x7fELF\x02\x01", "a 64-bit little-endian ELF file"
        self.data = bytearray(data)

    # -- raw -------------------------------------------------------------------------------

    def u(self, offset: int, size: int = 8) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def put(self, offset: int, value: int, size: int = 8) -> None:
        self.data[offset:offset + size] = (value % (1 << (8 * size))).to_bytes(size, "little")

    # -- ELF header ------------------------------------------------------------------------

    @property
    def phoff(self) -> int:
        return self.u(32)

    @property
    def phnum(self) -> int:
        return self.u(56, 2)

    def strip_sections(self) -> None:
        """Remove the section-header table from the header (what sstrip does)."""
        self.put(40, 0)
        self.put(58, 0, 2)
        self.put(60, 0, 2)
        self.put(62, 0, 2)

    # -- program headers ---------------------------------------------------------------------

    def ph(self, index: int) -> dict[str, int]:
        base = self.phoff + 56 * index
        return {name: self.u(base + at, struct.calcsize(code)) for name, (at, code) in _PH_FIELDS.items()}

    def set_ph(self, index: int, field: str, value: int) -> None:
        at, code = _PH_FIELDS[field]
        self.put(self.phoff + 56 * index + at, value, struct.calcsize(code))

    def ph_index(self, p_type: int, flags: int | None = None, nth: int = 0) -> int:
        found = [i for i in range(self.phnum)
                 if self.ph(i)["type"] == p_type and (flags is None or self.ph(i)["flags"] == flags)]
        return found[nth]

    def offset_of(self, vaddr: int) -> int:
        """The file offset the loader maps at ``vaddr``."""
        for i in range(self.phnum):
            ph = self.ph(i)
            if ph["type"] == PT_LOAD and ph["vaddr"] <= vaddr < ph["vaddr"] + ph["filesz"]:
                return ph["offset"] + vaddr - ph["vaddr"]
        raise KeyError(hex(vaddr))

    # -- dynamic section -------------------------------------------------------------------

    def dyn_offset(self) -> int:
        return self.offset_of(self.ph(self.ph_index(PT_DYNAMIC))["vaddr"])

    def dyn_entries(self) -> list[tuple[int, int, int]]:
        """(file offset of the entry, tag, value), up to and including DT_NULL."""
        entries = []
        at = self.dyn_offset()
        while True:
            tag, value = self.u(at), self.u(at + 8)
            entries.append((at, tag, value))
            if tag == DT_NULL:
                return entries
            at += 16

    def dyn(self, tag: int) -> int:
        values = [value for _at, t, value in self.dyn_entries() if t == tag]
        return values[-1]

    def has_dyn(self, tag: int) -> bool:
        return any(t == tag for _at, t, _v in self.dyn_entries())

    def set_dyn(self, tag: int, value: int) -> None:
        for at, t, _value in self.dyn_entries():
            if t == tag:
                self.put(at + 8, value)
        assert self.has_dyn(tag), hex(tag)

    def retag(self, tag: int, new_tag: int, value: int | None = None) -> None:
        """Change the first entry with ``tag`` to ``new_tag`` (DT_DEBUG: ld.so ignores it in a library)."""
        at = next(at for at, t, _v in self.dyn_entries() if t == tag)
        self.put(at, new_tag)
        if value is not None:
            self.put(at + 8, value)

    # -- sections ----------------------------------------------------------------------------

    def section(self, name: str) -> dict[str, int]:
        shoff, shnum, shstrndx = self.u(40), self.u(60, 2), self.u(62, 2)
        names_at = self.u(shoff + 64 * shstrndx + 24)
        for i in range(shnum):
            base = shoff + 64 * i
            start = names_at + self.u(base, 4)
            if bytes(self.data[start:self.data.index(b"\0", start)]).decode() == name:
                return {"type": self.u(base + 4, 4), "flags": self.u(base + 8), "addr": self.u(base + 16),
                        "offset": self.u(base + 24), "size": self.u(base + 32), "index": i}
        raise KeyError(name)

    # -- symbols and relocations -----------------------------------------------------------------

    def string_offset(self, text: bytes) -> int:
        strtab = self.offset_of(self.dyn(DT_STRTAB))
        return self.data.index(text + b"\0", strtab) - strtab

    def symbol_index(self, name: bytes) -> int:
        symtab = self.offset_of(self.dyn(DT_SYMTAB))
        wanted = self.string_offset(name)
        index = 0
        while self.u(symtab + 24 * index, 4) != wanted:
            index += 1
        return index

    def symbol_offset(self, index: int) -> int:
        return self.offset_of(self.dyn(DT_SYMTAB)) + 24 * index

    def relocations(self, tag: int = DT_RELA, size_tag: int = DT_RELASZ) -> list[tuple[int, int, int, int]]:
        """(file offset of the entry, r_offset, r_info, r_addend)."""
        at = self.offset_of(self.dyn(tag))
        return [(at + i, self.u(at + i), self.u(at + i + 8), self.u(at + i + 16))
                for i in range(0, self.dyn(size_tag), 24)]
