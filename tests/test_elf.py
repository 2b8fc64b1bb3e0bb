"""The ELF check that stands between a damaged library and a crash inside glibc's dlopen or dlclose.

Each rule of nativereload/elfcheck.py is pinned by a test that breaks exactly what
the rule guards in a real library (the sample) and expects the check to say
so. The libraries these start from load fine; each broken one crashed the
process in dlopen or dlclose (issue 13's fuzzing) before the check refused it.
"""

from __future__ import annotations

import os
import random
import stat
import struct
import subprocess
import threading

import pytest

from nativereload import elf, elfcheck

from conftest import open_fds, run_python
from elfedit import (DT_DEBUG, DT_FILTER, DT_FINI, DT_FINI_ARRAY, DT_FINI_ARRAYSZ, DT_FLAGS, DT_GNU_HASH, DT_HASH, DT_INIT,
                     DT_INIT_ARRAY, DT_INIT_ARRAYSZ, DT_JMPREL, DT_NEEDED, DT_PLTREL, DT_PLTRELSZ, DT_PREINIT_ARRAY,
                     DT_PREINIT_ARRAYSZ, DT_REL, DT_RELA, DT_RELACOUNT, DT_RELAENT, DT_RELASZ, DT_RELR, DT_RELRENT,
                     DT_RELRSZ, DT_SONAME, DT_STRSZ, DT_STRTAB, DT_SYMENT, DT_SYMTAB, DT_TEXTREL, DT_VERNEED,
                     DT_VERSYM, PF_R, PF_W, PF_X, PT_DYNAMIC, PT_GNU_EH_FRAME, PT_GNU_RELRO, PT_GNU_STACK, PT_LOAD,
                     PT_NOTE, PT_NULL, PT_PHDR, PT_TLS, ElfEdit)

EXTRA_SOURCE = r"""
__thread int per_thread = 7;
__thread int zero_tls;
static int counter;
static void early(void) __attribute__((constructor));
static void early(void) { counter = 1; }
int get(void) { return counter + per_thread + zero_tls; }
int (*table[4])(void) = {get, get, get, get};
int call(int i) { return table[i & 3](); }
"""


@pytest.fixture(scope="module")
def extras(tmp_path_factory):
    """Libraries in other shapes than the sample: with DT_HASH, with DT_RELR, with TLS; built with cc."""
    base = tmp_path_factory.mktemp("elf-extras")
    source = base / "extra.c"
    source.write_text(EXTRA_SOURCE)
    built = {}
    for name, flags in (("hash", ["-Wl,--hash-style=both"]), ("sysv", ["-Wl,--hash-style=sysv"]),
                        ("relr", ["-Wl,-z,pack-relative-relocs"]), ("plain", [])):
        output = base / f"{name}.so"
        result = subprocess.run(["cc", "-shared", "-fPIC", "-O2", *flags, "-o", str(output), str(source)],
                                capture_output=True, text=True)
        if result.returncode == 0:
            built[name] = output
    return built


def edited(samples, tmp_path, change, source="v1", name="edited.so"):
    """Apply ``change(ElfEdit)`` to a copy of a sample library; return the new file's path."""
    edit = ElfEdit(samples[source].read_bytes() if isinstance(samples, dict) else samples.read_bytes())
    change(edit)
    path = tmp_path / name
    path.write_bytes(bytes(edit.data))
    return path


def refused(path, pattern):
    with pytest.raises(elf.ELFError, match=pattern) as info:
        elfcheck.check(path)
    return str(info.value)


# -- the libraries we build, and every library on this machine, pass ------------------------------------


def test_a_built_library_passes(samples, extras):
    for path in [*samples.values(), *extras.values()]:
        elfcheck.check(path)


def test_the_libraries_on_this_machine_pass():
    # The rules must never refuse a library a linker wrote: try the system's.
    checked = 0
    for directory in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib/x86_64-linux-gnu"):
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if ".so" not in name or os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    continue
            elfcheck.check(path)
            checked += 1
            if checked >= 150:
                return
    if not checked:
        pytest.skip("no system libraries found")


# -- truncation ------------------------------------------------------------------------------------------


def test_every_truncation_is_rejected(samples, tmp_path):
    data = samples["v1"].read_bytes()
    cut = tmp_path / "cut.so"
    for size in list(range(0, 128)) + list(range(128, len(data), 61)) + [len(data) - 1]:
        cut.write_bytes(data[:size])
        with pytest.raises(elf.ELFError):
            elfcheck.check(cut)


def test_truncations_of_a_library_without_section_headers_are_rejected(samples, tmp_path):
    # The section-header table is the last thing in the file, so it catches
    # most cuts: without it, the segment checks alone must catch every one.
    edit = ElfEdit(samples["v1"].read_bytes())
    edit.strip_sections()
    end = max(edit.ph(i)["offset"] + edit.ph(i)["filesz"] for i in range(edit.phnum) if edit.ph(i)["type"] == 1)
    whole = bytes(edit.data[:end])
    cut = tmp_path / "cut.so"
    cut.write_bytes(whole)
    elfcheck.check(cut)
    for size in [644] + list(range(0, end, 37)) + [end - 1]:
        cut.write_bytes(whole[:size])
        with pytest.raises(elf.ELFError, match="truncated|not an ELF|empty"):
            elfcheck.check(cut)


def test_headers_beyond_the_first_read_are_read_with_pread(samples, tmp_path):
    # Program headers at the end of a file larger than the first read (64 KiB).
    edit = ElfEdit(samples["v1"].read_bytes())
    table = bytes(edit.data[edit.phoff:edit.phoff + 56 * edit.phnum])
    padded = bytes(edit.data) + bytes(70_000 - len(edit.data) % 8)
    edit.data = bytearray(padded + table)
    edit.put(32, len(padded))
    moved = tmp_path / "moved.so"
    moved.write_bytes(bytes(edit.data))
    elfcheck.check(moved)
    moved.write_bytes(bytes(edit.data[:-1]))
    refused(moved, "truncated: the program-header table ends at byte")


def test_a_file_that_shrinks_while_checked(samples, tmp_path, monkeypatch):
    big = tmp_path / "big.so"
    edit = ElfEdit(samples["v1"].read_bytes())
    table = bytes(edit.data[edit.phoff:edit.phoff + 56 * edit.phnum])
    padded = bytes(edit.data) + bytes(70_000)
    edit.data = bytearray(padded + table)
    edit.put(32, len(padded))
    big.write_bytes(bytes(edit.data))
    real_pread = os.pread
    monkeypatch.setattr(elfcheck.os, "pread", lambda fd, size, offset: real_pread(fd, size, offset)[:-1]
                        if offset else real_pread(fd, size, offset))
    refused(big, "the file shrank while being checked")


# -- identity and headers ----------------------------------------------------------------------------------


def test_wrong_class_and_machine(samples, tmp_path):
    data = bytearray(samples["v1"].read_bytes())
    other = tmp_path / "other.so"
    wrong_class = bytearray(data)
    wrong_class[4] = 1 if data[4] == 2 else 2
    other.write_bytes(bytes(wrong_class))
    message = refused(other, "wrong ELF class")
    assert "the file is 32-bit little-endian, this process is 64-bit little-endian" in message
    wrong_order = bytearray(data)
    wrong_order[5] = 2
    other.write_bytes(bytes(wrong_order))
    refused(other, "the file is 64-bit big-endian")
    wrong_machine = bytearray(data)
    wrong_machine[18:20] = (40).to_bytes(2, "little")         # ARM
    other.write_bytes(bytes(wrong_machine))
    refused(other, "built for ARM, but this process runs on x86-64 .wrong architecture")


@pytest.mark.parametrize("machine, name", sorted(elf._MACHINE_NAMES.items()) + [(4242, "machine 4242")])
def test_every_machine_is_named(samples, tmp_path, machine, name):
    if machine == elfcheck.HOST_MACHINE:
        pytest.skip("this machine")
    path = edited(samples, tmp_path, lambda e: e.put(18, machine, 2))
    assert f"built for {name}, but" in refused(path, "wrong architecture")


@pytest.mark.parametrize("ident", [(4, 0), (4, 3), (5, 0), (5, 3)])
def test_corrupt_identification_is_an_elf_error(samples, tmp_path, ident):
    # Not a KeyError from a lookup: Image._copy turns only ELFError into a LoadError.
    position, value = ident
    path = edited(samples, tmp_path, lambda e: e.data.__setitem__(position, value))
    refused(path, r"corrupt ELF identification \(class \d, data \d\)")


def test_not_elf_and_not_shared(tmp_path):
    text = tmp_path / "text.so"
    text.write_text("hello, this is not a library at all\n")
    refused(text, r"not an ELF file \(starts with b'hell'")
    text.write_bytes(b"")
    refused(text, r"^empty file \(0 bytes\)$")
    text.write_bytes(b"\x7fELF" + bytes(11))
    refused(text, "^not an ELF file: only 15 bytes$")
    text.write_bytes(b"\x7fELF\x02\x01" + bytes(30))
    refused(text, "truncated: the ELF header ends at byte 64 but the file has 36 bytes")
    source = tmp_path / "obj.c"
    source.write_text("int f(void) { return 1; }\n")
    subprocess.run(["cc", "-c", "-fPIC", str(source), "-o", str(tmp_path / "obj.o")], check=True)
    refused(tmp_path / "obj.o", r"not a shared library: it is a relocatable object \(.o\) \(build it with")


@pytest.mark.parametrize("e_type, kind", [(2, "an executable"), (4, "a core dump"), (9, "ELF type 9")])
def test_other_elf_types(samples, tmp_path, e_type, kind):
    path = edited(samples, tmp_path, lambda e: e.put(16, e_type, 2))
    refused(path, f"not a shared library: it is {kind}")


@pytest.mark.parametrize("field, value", [(54, 55), (54, 57), (56, 0), (56, 0xFFFF)])
def test_program_header_table_sanity(samples, tmp_path, field, value):
    path = edited(samples, tmp_path, lambda e: e.put(field, value, 2))
    refused(path, r"corrupt program-header table \(\d+ entries of \d+ bytes\)")


def test_section_header_table_must_fit(samples, tmp_path):
    path = edited(samples, tmp_path, lambda e: e.put(60, e.u(60, 2) + 1, 2))
    refused(path, "truncated: the section-header table ends at byte")
    path = edited(samples, tmp_path, lambda e: e.put(58, 40, 2))
    refused(path, r"corrupt section-header table \(entries of 40 bytes\)")


# -- segments ----------------------------------------------------------------------------------------------


def test_no_loadable_segment(samples, tmp_path):
    def drop_loads(e):
        for i in range(e.phnum):
            if e.ph(i)["type"] == PT_LOAD:
                e.set_ph(i, "type", PT_NULL)
    refused(edited(samples, tmp_path, drop_loads), r"^no loadable segment \(not a usable shared library\)$")


def test_a_segment_must_lie_inside_the_file(samples, tmp_path):
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_W), "offset", 0x100000))
    refused(path, "truncated: loadable segment 3 ends at byte")
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_DYNAMIC), "filesz", 0x100000))
    refused(path, "truncated: dynamic segment 4 ends at byte")


def test_no_executable_segment(samples, tmp_path):
    # "an executable PT_LOAD with p_flags=0" crashed dlopen (issue 13)
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_X), "flags", 0))
    refused(path, "program headers: no executable loadable segment")
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_X), "filesz", 0))
    refused(path, "no executable loadable segment")


def test_segment_sizes_order_and_alignment(samples, tmp_path):
    data_segment = lambda e: e.ph_index(PT_LOAD, PF_R | PF_W)      # noqa: E731
    path = edited(samples, tmp_path, lambda e: e.set_ph(data_segment(e), "memsz", e.ph(data_segment(e))["filesz"] - 8))
    refused(path, r"loadable segment 3 \(file size 0x248, memory size 0x240")
    path = edited(samples, tmp_path, lambda e: e.set_ph(data_segment(e), "memsz", 2**64 - 0x1000))
    refused(path, r"loadable segment 3 \(file size")
    path = edited(samples, tmp_path, lambda e: e.set_ph(data_segment(e), "vaddr", e.ph(data_segment(e))["vaddr"] + 8))
    refused(path, "not congruent modulo the page size")

    def swap(e):
        first, second = e.ph_index(PT_LOAD, PF_R | PF_X), e.ph_index(PT_LOAD, PF_R, nth=1)
        a, b = e.phoff + 56 * first, e.phoff + 56 * second
        e.data[a:a + 56], e.data[b:b + 56] = e.data[b:b + 56], e.data[a:a + 56]
    refused(edited(samples, tmp_path, swap), "loadable segment 2 .it overlaps or precedes segment 1")


def test_dynamic_segment(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_DYNAMIC), "type", PT_NULL)),
            r"program headers: 0 dynamic segments \(a shared library has one\)")

    def two(e):
        e.data[e.phoff + 56 * e.ph_index(PT_GNU_STACK):][:56] = e.data[e.phoff + 56 * e.ph_index(PT_DYNAMIC):][:56]
        index = e.ph_index(PT_GNU_STACK)
        e.data[e.phoff + 56 * index:e.phoff + 56 * index + 56] = \
            e.data[e.phoff + 56 * e.ph_index(PT_DYNAMIC):e.phoff + 56 * e.ph_index(PT_DYNAMIC) + 56]
    refused(edited(samples, tmp_path, two), "program headers: 2 dynamic segments")
    refused(edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_DYNAMIC), "filesz", 0)),
            "the dynamic segment is empty")
    # "PT_DYNAMIC at an address no segment maps" crashed dlopen (issue 13). (Without
    # section headers: with them, the dynamic section's address disagrees first.)
    refused(edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_DYNAMIC), "vaddr", 0x100000)),
            "PT_DYNAMIC is at 0x100000, the dynamic section at 0x3dd8")
    refused(edited(samples, tmp_path, lambda e: e.strip_sections() or
                   e.set_ph(e.ph_index(PT_DYNAMIC), "vaddr", 0x100000)),
            r"dynamic section: \[0x100000, 0x1001f0\) is not inside a loaded segment")
    # PF_W: ld.so relocates it in place, so it must be in a writable segment.
    refused(edited(samples, tmp_path, lambda e: e.strip_sections() or
                   e.set_ph(e.ph_index(PT_DYNAMIC), "vaddr", 0x2000) or
                   e.set_ph(e.ph_index(PT_DYNAMIC), "filesz", 0x100)),
            "dynamic section: it lies in loadable segment 2, which is not readable.writable")
    refused(edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_DYNAMIC), "filesz", 16)),
            "dynamic section: no DT_NULL entry ends it")


def test_dynamic_segment_matches_the_dynamic_section(samples, tmp_path):
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_DYNAMIC), "vaddr",
                                                         e.ph(e.ph_index(PT_DYNAMIC))["vaddr"] - 8))
    refused(path, "PT_DYNAMIC is at 0x3dd0, the dynamic section at 0x3dd8")


def test_program_headers_must_map_every_section(samples, tmp_path):
    # A segment dropped: .rodata would not be mapped, and the code reading it would crash.
    refused(edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R, nth=1), "type", PT_NULL)),
            r"program headers: section 14: \[0x2000, 0x2020\) is not inside a loaded segment")
    # Moved in the file: the code would be read from the wrong bytes.
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_X), "offset", 0))
    refused(path, "program headers: loadable segment 1 maps section 9 from byte 0, but it is at byte 4096")
    # Write access removed: the library's own stores would fault.
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_W), "flags", PF_R))
    refused(path, "it lies in loadable segment 3, which is not readable.writable")
    # Shrunk: the end of .bss would not be mapped.
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_W), "memsz",
                                                         e.ph(e.ph_index(PT_LOAD, PF_R | PF_W))["filesz"]))
    refused(path, r"section 23: \[0x4010, 0x4020\) is not inside a loaded segment")


def test_relro_must_stay_in_its_writable_segment(samples, tmp_path):
    relro = lambda e: e.ph_index(PT_GNU_RELRO)      # noqa: E731
    refused(edited(samples, tmp_path, lambda e: e.set_ph(relro(e), "vaddr", 0x2000)),
            "PT_GNU_RELRO: it lies in loadable segment 2, which is not readable.writable")
    refused(edited(samples, tmp_path, lambda e: e.set_ph(relro(e), "memsz", 0x2000)),
            "PT_GNU_RELRO: it runs past loadable segment 3")
    refused(edited(samples, tmp_path, lambda e: e.set_ph(relro(e), "vaddr", 0x100000)),
            "PT_GNU_RELRO: .* is not inside a loaded segment")
    # lld extends it to the end of the segment's last page: that is fine.
    elfcheck.check(edited(samples, tmp_path, lambda e: e.set_ph(relro(e), "memsz", 0x1000 - 0xdc8 + 0x1000)))


def test_program_header_segment(samples, tmp_path):
    def phdr(vaddr):
        def change(e):
            index = e.ph_index(PT_GNU_STACK)
            for field, value in (("type", PT_PHDR), ("flags", PF_R), ("offset", e.phoff), ("vaddr", vaddr),
                                 ("filesz", 56 * e.phnum), ("memsz", 56 * e.phnum), ("align", 8)):
                e.set_ph(index, field, value)
        return change
    elfcheck.check(edited(samples, tmp_path, phdr(0x40)))
    refused(edited(samples, tmp_path, phdr(0x48)), "PT_PHDR: address 0x48 does not map the program headers")
    refused(edited(samples, tmp_path, phdr(0x100000)), "PT_PHDR: .* is not inside a loaded segment")


def test_tls_segment(samples, tmp_path, extras):
    if "plain" not in extras:
        pytest.skip("cc failed")
    tls = lambda e: e.ph_index(PT_TLS)      # noqa: E731
    elfcheck.check(extras["plain"])
    refused(edited(extras["plain"], tmp_path, lambda e: e.set_ph(tls(e), "filesz", e.ph(tls(e))["memsz"] + 4)),
            "corrupt TLS segment")
    refused(edited(extras["plain"], tmp_path, lambda e: e.set_ph(tls(e), "align", 3)), r"alignment 0x3\)")
    refused(edited(extras["plain"], tmp_path, lambda e: e.set_ph(tls(e), "vaddr", 0x100000)),
            r"TLS segment \d+: .* is not inside a loaded segment")
    elfcheck.check(edited(extras["plain"], tmp_path, lambda e: e.set_ph(tls(e), "align", 0)))


def test_notes_must_fit_their_segment(samples, tmp_path):
    note = lambda e: e.offset_of(e.ph(e.ph_index(PT_NOTE))["vaddr"])      # noqa: E731
    refused(edited(samples, tmp_path, lambda e: e.put(note(e) + 4, 0x1000, 4)),
            "note segment 5: a note of 4096 bytes runs past the segment's end")
    refused(edited(samples, tmp_path, lambda e: e.put(note(e), 0x1000, 4)), "note segment 5")
    # Notes of another alignment are not parsed by ld.so: nothing to check in them.
    elfcheck.check(edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_NOTE), "align", 16) or
                     e.put(note(e) + 4, 0x1000, 4)))
    refused(edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_NOTE), "vaddr", 0x100000)),
            r"note segment 5: .* is not inside a loaded segment")


# -- the dynamic section ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag, name, needed_by", [(DT_STRTAB, "DT_STRTAB", "a library"),
                                                  (DT_SYMTAB, "DT_SYMTAB", "a library"),
                                                  (DT_STRSZ, "DT_STRSZ", "DT_STRTAB"),
                                                  (DT_INIT_ARRAYSZ, "DT_INIT_ARRAYSZ", "DT_INIT_ARRAY"),
                                                  (DT_FINI_ARRAYSZ, "DT_FINI_ARRAYSZ", "DT_FINI_ARRAY"),
                                                  (DT_RELASZ, "DT_RELASZ", "DT_RELA"),
                                                  (DT_RELAENT, "DT_RELAENT", "DT_RELA"),
                                                  (DT_PLTRELSZ, "DT_PLTRELSZ", "DT_JMPREL"),
                                                  (DT_JMPREL, "DT_JMPREL", "DT_PLTREL")])
def test_entries_ld_so_dereferences_must_exist(samples, tmp_path, tag, name, needed_by):
    path = edited(samples, tmp_path, lambda e: e.retag(tag, DT_DEBUG))
    refused(path, f"dynamic section: {needed_by} without {name} .ld.so dereferences it")


def test_jmprel_needs_pltrel(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.retag(DT_PLTREL, DT_DEBUG)),
            "DT_JMPREL without DT_PLTREL .ld.so would not apply them")


@pytest.mark.parametrize("value", [0, 1, 17, 0x7FFFFFFF])
def test_pltrel_must_be_rela_here(samples, tmp_path, value):
    # "DT_PLTREL=1" made ld.so fail an assertion: _exit(127) (issue 13)
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_PLTREL, value)),
            f"DT_PLTREL is {value} .ld.so asserts DT_RELA")


def test_rel_relocations_are_refused_on_a_rela_machine(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.retag(DT_SYMBOLIC_TAG, DT_REL, 0x4f8)),
            "REL relocations, which ld.so on x86-64 ignores")


DT_SYMBOLIC_TAG = 16


def test_relocation_entry_sizes(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_RELAENT, 16)), r"DT_RELAENT is 16 \(ld.so asserts 24\)")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_RELASZ, 100)), "DT_RELASZ is 100, not a multiple of 24")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_PLTRELSZ, 25)), "DT_PLTRELSZ is 25, not a multiple of 24")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_SYMENT, 16)), r"DT_SYMENT is 16 \(expected 24\)")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_RELASZ, 0x24000)), r"relocations \(DT_RELA\)")


def test_strings(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_STRTAB, 0x100000)),
            r"string table \(DT_STRTAB\): .* is not inside a loaded segment")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_STRSZ, e.dyn(DT_STRSZ) - 1)),
            "string table .DT_STRTAB.: it does not end with a NUL byte")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_STRSZ, 0)), "does not end with a NUL byte")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_NEEDED, e.dyn(DT_STRSZ))),
            "DT_NEEDED names offset 192, past the string table's 192 bytes")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_SONAME, 5000)), "DT_SONAME names offset 5000")
    # An empty name would make ld.so load the main program as a dependency.
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_NEEDED, 0)), "DT_NEEDED names an empty file name")
    refused(edited(samples, tmp_path, lambda e: e.retag(DT_SYMBOLIC_TAG, DT_FILTER, 0)),
            "DT_FILTER names an empty file name")
    elfcheck.check(edited(samples, tmp_path, lambda e: e.retag(DT_SYMBOLIC_TAG, DT_FILTER, e.dyn(DT_NEEDED))))
    elfcheck.check(edited(samples, tmp_path, lambda e: e.set_dyn(DT_SONAME, 0)))        # an empty soname harms nothing


def test_code_pointers(samples, tmp_path):
    # "DT_INIT=0" crashed dlopen (issue 13): ld.so calls it.
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_INIT, 0)),
            r"dynamic section: DT_INIT \(0x0\) is not in an executable segment")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_FINI, 0x2000)), r"DT_FINI \(0x2000\) is not in an exec")
    # Inside .init, or inside a function the unwind tables know: not a function's start.
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_INIT, 0x1001)),
            r"DT_INIT \(0x1001\) is not the start of a function")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_FINI, e.section(".text")["addr"] + 0x101)),
            "DT_FINI .* is not the start of a function")
    # A function's start, as the unwind index or the symbol table tells: fine (the linker's -init=f).
    elfcheck.check(edited(samples, tmp_path, lambda e: e.set_dyn(DT_INIT, 0x1110)))
    elfcheck.check(edited(samples, tmp_path,
                          lambda e: e.set_dyn(DT_FINI, e.u(e.symbol_offset(e.symbol_index(b"add")) + 8))))
    # Without section headers and an unwind index, nobody can tell: accepted.
    def blind(e):
        e.strip_sections()
        e.set_ph(e.ph_index(PT_GNU_EH_FRAME), "type", PT_NULL)
        e.set_dyn(DT_FINI, 0x1001)
    elfcheck.check(edited(samples, tmp_path, blind))


def test_init_and_fini_arrays(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_INIT_ARRAYSZ, 12)),
            "DT_INIT_ARRAYSZ is 12, not a multiple of 8")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_FINI_ARRAY, 0x100000)),
            r"DT_FINI_ARRAY: \[0x100000, 0x100008\) is not inside a loaded segment")
    refused(edited(samples, tmp_path, lambda e: e.retag(DT_SYMBOLIC_TAG, DT_PREINIT_ARRAY, 0x3dc8)),
            "DT_PREINIT_ARRAY without DT_PREINIT_ARRAYSZ")
    # ld.so calls every slot as relocated: one relocated to data crashes it.
    def init_to_data(e):
        at, _offset, _info, _addend = next(r for r in e.relocations() if r[1] == e.dyn(DT_INIT_ARRAY))
        e.put(at + 16, 0x2000)
    refused(edited(samples, tmp_path, init_to_data),
            "DT_INIT_ARRAY slot at 0x3dc8 is relocated to 0x2000, which is not in an executable segment")
    # A slot no relocation fills, or one filled from a weak symbol that may be absent (0): refused.
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_FINI_ARRAY, 0x3ff0)),
            "DT_FINI_ARRAY slot at 0x3ff0 is not relocated to a function")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_INIT_ARRAY, 0x3fc8)),
            "DT_INIT_ARRAY slot at 0x3fc8 is not relocated to a function")
    # One filled from a function this library defines: fine; from one it imports: dlopen resolves it.
    def symbolic(e, name):
        at, _offset, _info, _addend = next(r for r in e.relocations() if r[1] == e.dyn(DT_INIT_ARRAY))
        e.put(at + 8, (e.symbol_index(name) << 32) | 1)
        e.put(at + 16, 0)
        e.set_dyn(DT_RELACOUNT, 0)
    elfcheck.check(edited(samples, tmp_path, lambda e: symbolic(e, b"add")))
    elfcheck.check(edited(samples, tmp_path, lambda e: symbolic(e, b"read")))
    refused(edited(samples, tmp_path, lambda e: symbolic(e, b"__gmon_start__")), "is not relocated to a function")


def test_relocations(samples, tmp_path):
    # Targets: ld.so writes a word there.
    refused(edited(samples, tmp_path, lambda e: e.put(e.relocations()[3][0], 0x1000)),
            r"relocations at 0x4f8: one writes to 0x1000, outside every writable segment")
    refused(edited(samples, tmp_path, lambda e: e.put(e.relocations()[3][0], 0x5000)), "one writes to 0x5000")
    refused(edited(samples, tmp_path, lambda e: e.put(e.relocations()[0][0], 0x3dc0)), "one writes to 0x3dc0")
    # With DT_TEXTREL, ld.so makes every segment writable while relocating.
    elfcheck.check(edited(samples, tmp_path, lambda e: e.put(e.relocations()[4][0], 0x1008) or
                     e.retag(DT_SYMBOLIC_TAG, DT_TEXTREL, 0)))
    elfcheck.check(edited(samples, tmp_path, lambda e: e.put(e.relocations()[4][0], 0x1008) or
                     e.set_dyn(DT_FLAGS, e.dyn(DT_FLAGS) | 4)))
    # The first DT_RELACOUNT are applied as relative ones: ld.so asserts it, and does not stop at the end.
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_RELACOUNT, 4)),
            r"one of the first 4 \(DT_RELACOUNT\) is not a relative relocation")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_RELACOUNT, 8)),
            "DT_RELACOUNT .8. exceeds the 7 relocations")
    elfcheck.check(edited(samples, tmp_path, lambda e: e.put(e.relocations()[1][0] + 8, 38)))      # RELATIVE64
    # Symbols relocations name.
    refused(edited(samples, tmp_path, lambda e: e.put(e.relocations()[3][0] + 8, (5000 << 32) | 6)),
            r"symbol table \(DT_SYMTAB, 5001 symbols\)")

    def local_undefined(e):
        at = e.symbol_offset(e.symbol_index(b"__cxa_finalize"))
        e.data[at + 4] = 0x02          # STB_LOCAL, STT_FUNC: resolved to the load address
    refused(edited(samples, tmp_path, local_undefined), "symbol 5 binds locally but is not defined in the file")

    def hidden_undefined(e):
        e.data[e.symbol_offset(e.symbol_index(b"__cxa_finalize")) + 5] = 2       # STV_HIDDEN
    refused(edited(samples, tmp_path, hidden_undefined), "symbol 5 binds locally")

    def hidden_defined(e):
        e.data[e.symbol_offset(e.symbol_index(b"add")) + 5] = 2
        at = e.relocations()[3][0]
        e.put(at + 8, (e.symbol_index(b"add") << 32) | 6)
    elfcheck.check(edited(samples, tmp_path, hidden_defined))
    # An IFUNC resolver is called by ld.so.
    def irelative(target):
        def change(e):
            at = e.relocations()[3][0]
            e.put(at + 8, 37)
            e.put(at + 16, target)
        return change
    refused(edited(samples, tmp_path, irelative(0x2000)), "IFUNC resolver at 0x2000 is not in an executable segment")
    elfcheck.check(edited(samples, tmp_path, irelative(0x1110)))


def test_relr_relocations(samples, tmp_path, extras):
    if "relr" not in extras:
        pytest.skip("this linker cannot write DT_RELR")
    edit = ElfEdit(extras["relr"].read_bytes())
    if not edit.has_dyn(DT_RELR):
        pytest.skip("no DT_RELR written")
    elfcheck.check(extras["relr"])
    refused(edited(extras["relr"], tmp_path, lambda e: e.set_dyn(DT_RELRENT, 16)), r"DT_RELRENT is 16 \(ld.so asserts 8\)")
    refused(edited(extras["relr"], tmp_path, lambda e: e.put(e.offset_of(e.dyn(DT_RELR)), 0x10)),
            r"relative relocations \(DT_RELR\): one writes to 0x10")
    # Init array slots relocated through RELR: their in-file word is the function's address.
    def init_word(e, value):
        e.put(e.offset_of(e.dyn(DT_INIT_ARRAY)), value)
    refused(edited(extras["relr"], tmp_path, lambda e: init_word(e, 0x200)), "DT_INIT_ARRAY slot .* is relocated to 0x200")


def test_gnu_hash(samples, tmp_path):
    table = lambda e: e.offset_of(e.dyn(DT_GNU_HASH))      # noqa: E731
    # "a .gnu.hash symoffset or bloom size of 0x7fffffff" crashed dlopen (issue 13)
    for bloom in (0, 3, 0x7FFFFFFF):
        refused(edited(samples, tmp_path, lambda e: e.put(table(e) + 8, bloom, 4)),
                f"GNU hash table .DT_GNU_HASH.: bloom filter of {bloom} words" if bloom != 0x7FFFFFFF else
                "GNU hash table")
    refused(edited(samples, tmp_path, lambda e: e.put(table(e) + 4, 0x7FFFFFFF, 4)),
            r"a bucket names symbol \d+, before symoffset 2147483647")
    refused(edited(samples, tmp_path, lambda e: e.put(table(e), 0x7FFFFFFF, 4)), "GNU hash table")

    def endless(e):
        nbuckets, _symoffset, bloom = e.u(table(e), 4), e.u(table(e) + 4, 4), e.u(table(e) + 8, 4)
        chains = table(e) + 16 + 8 * bloom + 4 * nbuckets
        first = e.ph(e.ph_index(PT_LOAD))
        for at in range(chains, first["offset"] + first["filesz"] - 3, 4):     # to the end of the segment
            e.put(at, e.u(at, 4) & ~1, 4)
    refused(edited(samples, tmp_path, endless), r"GNU hash table \(DT_GNU_HASH\), its last chain: .* is not inside")

    def no_symbols(e):
        nbuckets, bloom = e.u(table(e), 4), e.u(table(e) + 8, 4)
        for at in range(table(e) + 16 + 8 * bloom, table(e) + 16 + 8 * bloom + 4 * nbuckets, 4):
            e.put(at, 0, 4)
    elfcheck.check(edited(samples, tmp_path, no_symbols))       # an empty table: nothing exported, nothing to read


def test_sysv_hash(extras, tmp_path):
    for name in ("hash", "sysv"):
        if name not in extras:
            pytest.skip("cc failed")
        elfcheck.check(extras[name])
        refused(edited(extras[name], tmp_path, lambda e: e.put(e.offset_of(e.dyn(DT_HASH)) + 4, 1, 4)),
                r"hash table \(DT_HASH\): it names a symbol past its 1 chains")
        refused(edited(extras[name], tmp_path, lambda e: e.put(e.offset_of(e.dyn(DT_HASH)), 0x7FFFFFF, 4)),
                r"hash table \(DT_HASH\)")


def test_symbols(samples, tmp_path):
    add = lambda e: e.symbol_offset(e.symbol_index(b"add"))      # noqa: E731
    refused(edited(samples, tmp_path, lambda e: e.put(add(e) + 8, 0x2000)),
            "function symbol at 0x2000 is not in an executable segment")
    refused(edited(samples, tmp_path, lambda e: e.put(add(e), 5000, 4)), "a symbol name lies past the string table")
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_SYMTAB, 0x100000)),
            r"symbol table \(DT_SYMTAB, \d+ symbols\): .* is not inside a loaded segment")


def test_versions(samples, tmp_path):
    verneed = lambda e: e.offset_of(e.dyn(DT_VERNEED))      # noqa: E731
    # ld.so asserts that the file a version comes from is one it loaded.
    refused(edited(samples, tmp_path, lambda e: e.put(verneed(e) + 4, e.string_offset(b"sample.so"), 4)),
            r"version needs \(DT_VERNEED\): a version of a file that is not a DT_NEEDED entry")
    refused(edited(samples, tmp_path, lambda e: e.put(verneed(e) + 4, 5000, 4)), "not a DT_NEEDED entry")
    refused(edited(samples, tmp_path, lambda e: e.put(verneed(e) + 16 + 8, 5000, 4)),
            "version needs .DT_VERNEED.: a version name past the string table")
    refused(edited(samples, tmp_path, lambda e: e.put(verneed(e) + 8, 0x100000, 4)), r"version needs \(DT_VERNEED\)")
    refused(edited(samples, tmp_path, lambda e: e.put(verneed(e) + 12, 0x100000, 4)), r"version needs \(DT_VERNEED\)")
    # A first entry of another version: ld.so refuses it.
    refused(edited(samples, tmp_path, lambda e: e.put(verneed(e), 2, 2)),
            r"version needs \(DT_VERNEED\): version 2 of the structure \(1 expected\)")
    refused(edited(samples, tmp_path, lambda e: e.retag(DT_VERSYM, DT_DEBUG)),
            "versions without DT_VERSYM .ld.so dereferences it")
    # Version indexes past those defined or needed read a wild pointer in ld.so.
    refused(edited(samples, tmp_path, lambda e: e.put(e.offset_of(e.dyn(DT_VERSYM)) + 2, 0x7FFF, 2)),
            "version index 32767 is not defined or needed")
    refused(edited(samples, tmp_path, lambda e: e.put(e.offset_of(e.dyn(DT_VERSYM)) + 2, 0x0005, 2)),
            "version index 5 is not defined or needed")
    elfcheck.check(edited(samples, tmp_path, lambda e: e.put(e.offset_of(e.dyn(DT_VERSYM)) + 2, 0x8001, 2)))   # hidden


def versioned_library(tmp_path):
    """A library whose one function ``f`` has a version definition (``V1``), built with a version script."""
    source = tmp_path / "v.c"
    source.write_text("int f(void) { return 1; }\n")
    script = tmp_path / "v.map"
    script.write_text("V1 { global: f; local: *; };\n")
    library = tmp_path / "v.so"
    subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,--version-script={script}", "-o", str(library), str(source)],
                   check=True)
    return library


def test_version_definitions(tmp_path):
    library = versioned_library(tmp_path)
    elfcheck.check(library)
    verdef = lambda e: e.offset_of(e.dyn(0x6FFFFFFC))      # noqa: E731
    refused(edited(library, tmp_path, lambda e: e.put(e.offset_of(e.dyn(0x6FFFFFFC) + e.u(verdef(e) + 12, 4)),
                                                       5000, 4)),
            r"version definitions \(DT_VERDEF\): a version name past the string table")
    refused(edited(library, tmp_path, lambda e: e.put(verdef(e) + 16, 0x100000, 4)), r"version definitions")


# -- files that are not regular, descriptors, and other errors -----------------------------------------------


def test_not_a_regular_file_never_blocks(tmp_path):
    fifo = tmp_path / "fifo.so"
    os.mkfifo(fifo)
    done = []
    thread = threading.Thread(target=lambda: done.append(pytest.raises(elf.ELFError, elfcheck.check, fifo)),
                              daemon=True)
    thread.start()
    thread.join(10)
    assert done, "elfcheck.check blocked on a FIFO"
    assert "not a regular file (a FIFO (named pipe))" in str(done[0].value)
    refused(tmp_path, r"not a regular file \(a directory\)")
    refused("/dev/null", r"not a regular file \(a character device\)")


def test_file_type_names():
    assert elf.file_type(stat.S_IFSOCK) == "a socket"
    assert elf.file_type(stat.S_IFBLK) == "a block device"
    assert elf.file_type(stat.S_IFLNK) == "a symbolic link"
    assert elf.file_type(stat.S_IFREG) == "a regular file"
    assert elf.file_type(0) == "file mode 0o0"


def test_check_leaks_no_descriptor(samples, tmp_path):
    bad = tmp_path / "bad.so"
    bad.write_bytes(samples["v1"].read_bytes()[:1000])
    before = open_fds()
    for _ in range(20):
        elfcheck.check(samples["v1"])
        with pytest.raises(elf.ELFError):
            elfcheck.check(bad)
        with pytest.raises(OSError):
            elfcheck.check(tmp_path / "missing.so")
    assert open_fds() == before


def test_random_damage_is_only_ever_an_elf_error(samples):
    # Thousands of random single-field changes: the check refuses or passes, never raises anything else.
    data = samples["v1"].read_bytes()
    rng = random.Random(13)
    read, write = os.pipe()
    os.close(write)
    import tempfile
    with tempfile.TemporaryFile() as f:
        for _ in range(3000):
            mutant = bytearray(data)
            width = rng.choice((1, 2, 4, 8))
            at = rng.randrange(0, len(data) - width)
            value = rng.choice((0, 1, 0x7FFFFFFF, 2**(8 * width) - 1, rng.randrange(2**(8 * width))))
            mutant[at:at + width] = (value % 2**(8 * width)).to_bytes(width, "little")
            f.seek(0)
            f.truncate()
            f.write(mutant)
            f.flush()
            try:
                elfcheck.check_fd(f.fileno())
            except elf.ELFError:
                pass
    os.close(read)


HOST_MACHINES = {"x86_64": 62, "aarch64": 183, "i686": 3, "armv7l": 40, "ppc64le": 21, "s390x": 22,
                 "riscv64": 243, "loongarch64": 258}


def expected_host():
    import platform
    import sys

    machine = HOST_MACHINES.get(platform.machine())
    if machine is None:
        pytest.skip(f"no ELF machine number known for {platform.machine()}")
    return (2 if sys.maxsize > 2**32 else 1), (1 if sys.byteorder == "little" else 2), machine


def test_the_host_identity(monkeypatch):
    import sys

    assert elfcheck._host_identity() == expected_host() == (elfcheck.HOST_CLASS, elfcheck.HOST_DATA,
                                                            elfcheck.HOST_MACHINE)
    real_open = open
    refused_paths = set()

    def without(*paths):
        refused_paths.clear()
        refused_paths.update(paths)

    def fake_open(path, *args, **kwargs):
        if path in refused_paths:
            raise OSError("hidden")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("builtins.open", fake_open)
    without("/proc/self/exe")                       # then the interpreter's own file
    assert elfcheck._host_identity() == expected_host()
    without("/proc/self/exe", sys.executable)       # then what Python reports (no machine)
    assert elfcheck._host_identity() == expected_host()[:2] + (0,)
    monkeypatch.setattr(sys, "executable", "/dev/null")          # not an ELF file: skipped
    without("/proc/self/exe")
    assert elfcheck._host_identity() == expected_host()[:2] + (0,)


def test_a_crash_it_prevents(samples, tmp_path):
    # Proof that a check matters: without it, glibc's dlopen dies on this file (DT_INIT=0).
    path = edited(samples, tmp_path, lambda e: e.set_dyn(DT_INIT, 0))
    result = run_python(f"import ctypes; ctypes.CDLL({str(path)!r})")
    assert result.returncode < 0 or result.returncode == 127
    refused(path, "DT_INIT")


DT_RELSZ, DT_RELENT, DT_RELCOUNT = 18, 19, 0x6FFFFFFA


# -- what the check knows of other machines (exercised here by pretending to be one) -----------------------

# From each psABI (glibc's elf.h): machine -> (name, RELATIVE, symbolic word relocations, IRELATIVE, RELA only).
MACHINES = {
    3: ("x86", 8, (1, 6), 42, False),
    8: ("MIPS", None, (), None, False),
    20: ("PowerPC", 22, (1, 20), 248, True),
    21: ("PowerPC64", 22, (20, 38), 248, True),
    22: ("s390", 12, (4, 10, 22), 61, True),
    40: ("ARM", 23, (2, 21), 160, False),
    62: ("x86-64", 8, (1, 6), 37, True),
    183: ("AArch64", 1027, (257, 1025), 1032, True),
    243: ("RISC-V", 3, (1, 2), 58, True),
    258: ("LoongArch", 3, (1, 2), 12, True),
    2: ("machine 2", None, (), None, True),
    15: ("machine 15", None, (), None, True),
    18: ("machine 18", None, (), None, True),
    43: ("machine 43", None, (), None, True),
    4242: ("machine 4242", None, (), None, False),
}


def test_machine_names_are_the_real_ones():
    assert {m: name for m, (name, *_rest) in MACHINES.items() if not name.startswith("machine")} == \
        elf._MACHINE_NAMES


def as_machine(monkeypatch, machine):
    """Make the check believe this process runs on ``machine``; return an edit that retypes the sample for it."""
    monkeypatch.setattr(elfcheck, "HOST_MACHINE", machine)
    _name, relative, _symbolic, _irelative, _rela_only = MACHINES[machine]

    def change(e):
        e.put(18, machine, 2)
        for table, size in ((DT_RELA, DT_RELASZ), (DT_JMPREL, DT_PLTRELSZ)):
            for at, _offset, info, _addend in e.relocations(table, size):
                if info & 0xFFFFFFFF == 8 and relative is not None:
                    e.put(at + 8, (info & ~0xFFFFFFFF) | relative)
    return change


@pytest.mark.parametrize("machine", sorted(m for m in MACHINES if MACHINES[m][1] is not None))
def test_relocation_types_of_each_machine(samples, tmp_path, monkeypatch, machine):
    name, relative, symbolic, irelative, rela_only = MACHINES[machine]
    retype = as_machine(monkeypatch, machine)
    elfcheck.check(edited(samples, tmp_path, retype))
    # An x86-64 RELATIVE where this machine expects its own is not relative here.
    if relative != 8:
        refused(edited(samples, tmp_path, lambda e: retype(e) or e.put(e.relocations()[0][0] + 8, 8)),
                r"\(DT_RELACOUNT\) is not a relative relocation|not relocated to a function|is relocated to")
    # Every symbolic word relocation fills an init array slot from a symbol.
    for kind in symbolic:
        def from_symbol(e, kind=kind):
            retype(e)
            at = e.relocations()[0][0]
            e.put(at + 8, (e.symbol_index(b"add") << 32) | kind)
            e.put(at + 16, 0)
            e.set_dyn(DT_RELACOUNT, 0)
        elfcheck.check(edited(samples, tmp_path, from_symbol))
    # This machine's IFUNC relocation calls its addend.
    def ifunc(e):
        retype(e)
        at = e.relocations()[3][0]
        e.put(at + 8, irelative)
        e.put(at + 16, 0x2000)
    refused(edited(samples, tmp_path, ifunc), "IFUNC resolver at 0x2000")


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_rel_or_rela_per_machine(samples, tmp_path, monkeypatch, machine):
    name, _relative, _symbolic, _irelative, rela_only = MACHINES[machine]
    retype = as_machine(monkeypatch, machine)
    pltrel_rel = edited(samples, tmp_path, lambda e: retype(e) or e.set_dyn(DT_PLTREL, 17))
    if rela_only:
        refused(pltrel_rel, r"DT_PLTREL is 17 \(ld.so asserts DT_RELA\)")
        refused(edited(samples, tmp_path, lambda e: retype(e) or e.retag(DT_SYMBOLIC_TAG, DT_REL, 0x4f8)),
                f"REL relocations, which ld.so on {name} ignores")
    else:
        # REL is allowed: the PLT table is then read as REL (16-byte entries)
        with pytest.raises(elf.ELFError) as info:
            elfcheck.check(pltrel_rel)
        assert "DT_PLTREL is" not in str(info.value) and "DT_PLTRELSZ is 24, not a multiple of 16" in str(info.value)
        refused(edited(samples, tmp_path, lambda e: retype(e) or e.set_dyn(DT_PLTREL, 18)),
                r"DT_PLTREL is 18 \(ld.so asserts DT_RELA or DT_REL\)")


def test_rel_tables_where_the_machine_takes_them(samples, tmp_path, monkeypatch):
    retype = as_machine(monkeypatch, 3)             # x86 (32-bit) takes REL tables too

    def rel(*, entry_size=16, drop=None, count=None):
        def change(e):
            retype(e)
            e.retag(DT_SYMBOLIC_TAG, DT_REL, e.dyn(DT_RELA))
            e.retag(DT_INIT, DT_RELSZ, 32)                  # two 16-byte entries
            e.retag(DT_FINI, DT_RELENT, entry_size)
            if drop is not None:
                e.retag(drop, DT_DEBUG)
            if count is not None:
                e.retag(DT_RELACOUNT, DT_RELCOUNT, count)
        return change
    refused(edited(samples, tmp_path, rel(entry_size=8)), r"DT_RELENT is 8 \(ld.so asserts 16\)")
    refused(edited(samples, tmp_path, rel(drop=DT_RELSZ)), "DT_REL without DT_RELSZ")
    refused(edited(samples, tmp_path, rel(drop=DT_RELENT)), "DT_REL without DT_RELENT")
    refused(edited(samples, tmp_path, rel(count=5)), r"DT_RELCOUNT \(5\) exceeds the 2 relocations")


def test_more_string_tags(samples, tmp_path):
    for tag, name in ((15, "DT_RPATH"), (29, "DT_RUNPATH"), (0x7FFFFFFD, "DT_AUXILIARY")):
        refused(edited(samples, tmp_path, lambda e: e.retag(DT_SYMBOLIC_TAG, tag, 5000)),
                f"{name} names offset 5000")
    refused(edited(samples, tmp_path, lambda e: e.retag(DT_SYMBOLIC_TAG, 0x7FFFFFFD, 0)),
            "DT_AUXILIARY names an empty file name")
    elfcheck.check(edited(samples, tmp_path, lambda e: e.retag(DT_SYMBOLIC_TAG, 15, 0)))     # an empty rpath: harmless


def test_preinit_array_bounds(samples, tmp_path):
    def preinit(size):
        def change(e):
            e.retag(DT_SYMBOLIC_TAG, DT_PREINIT_ARRAY, 0x3dc8)
            e.retag(DT_FLAGS, DT_PREINIT_ARRAYSZ, size)
        return change
    elfcheck.check(edited(samples, tmp_path, preinit(8)))
    refused(edited(samples, tmp_path, preinit(0x100000)), r"DT_PREINIT_ARRAY: \[0x3dc8")
    refused(edited(samples, tmp_path, preinit(4)), "DT_PREINIT_ARRAYSZ is 4, not a multiple of 8")


def test_only_df_textrel_makes_text_writable(samples, tmp_path):
    for flags in (0x1, 0x2, 0x8, 0x10):
        refused(edited(samples, tmp_path, lambda e: e.put(e.relocations()[4][0], 0x1008) or
                       e.set_dyn(DT_FLAGS, flags)), "one writes to 0x1008")


# -- a 32-bit library (i386: REL relocations), checked as a 32-bit process would --------------------------

class Edit32:
    """Just enough of a 32-bit little-endian ELF editor for these tests."""

    def __init__(self, data):
        self.data = bytearray(data)

    def u(self, at, size=4):
        return int.from_bytes(self.data[at:at + size], "little")

    def put(self, at, value, size=4):
        self.data[at:at + size] = (value % (1 << (8 * size))).to_bytes(size, "little")

    def ph(self, index):
        base = self.u(28) + 32 * index
        names = ("type", "offset", "vaddr", "paddr", "filesz", "memsz", "flags", "align")
        return {name: self.u(base + 4 * i) for i, name in enumerate(names)}, base

    def offset_of(self, vaddr):
        for i in range(self.u(44, 2)):
            ph, _base = self.ph(i)
            if ph["type"] == PT_LOAD and ph["vaddr"] <= vaddr < ph["vaddr"] + ph["filesz"]:
                return ph["offset"] + vaddr - ph["vaddr"]
        raise KeyError(vaddr)

    def dyn_at(self, tag):
        dynamic = next(self.ph(i)[0] for i in range(self.u(44, 2)) if self.ph(i)[0]["type"] == PT_DYNAMIC)
        at = self.offset_of(dynamic["vaddr"])
        while self.u(at):
            if self.u(at) == tag:
                return at
            at += 8
        raise KeyError(tag)

    def dyn(self, tag):
        return self.u(self.dyn_at(tag) + 4)

    def set_dyn(self, tag, value):
        self.put(self.dyn_at(tag) + 4, value)


@pytest.fixture
def as_32bit(monkeypatch):
    monkeypatch.setattr(elfcheck, "HOST_CLASS", 1)
    monkeypatch.setattr(elfcheck, "HOST_MACHINE", 3)


def edited32(x32, tmp_path, change):
    edit = Edit32(x32.read_bytes())
    change(edit)
    path = tmp_path / "edited32.so"
    path.write_bytes(bytes(edit.data))
    return path


def test_a_32_bit_library(x32, tmp_path, as_32bit):
    elfcheck.check(x32)
    rel = lambda e: [(e.offset_of(e.dyn(DT_REL)) + i, e.u(e.offset_of(e.dyn(DT_REL)) + i),      # noqa: E731
                      e.u(e.offset_of(e.dyn(DT_REL)) + i + 4)) for i in range(0, e.dyn(18), 8)]
    init = lambda e: e.offset_of(e.dyn(DT_INIT_ARRAY))      # noqa: E731
    # The init slot's REL addend is the word at the slot: make it point at data.
    refused(edited32(x32, tmp_path, lambda e: e.put(init(e), 0x2000)),
            "DT_INIT_ARRAY slot at 0x[0-9a-f]+ is relocated to 0x2000")
    # Slots filled by R_386_32 from a function symbol (the function table): fine.
    table = lambda e: min(offset for _at, offset, info in rel(e) if info & 0xFF == 1)      # noqa: E731
    elfcheck.check(edited32(x32, tmp_path,
                            lambda e: e.set_dyn(DT_INIT_ARRAY, table(e)) or e.set_dyn(DT_INIT_ARRAYSZ, 8)))
    refused(edited32(x32, tmp_path, lambda e: e.set_dyn(0x6FFFFFFA, 3)),
            r"one of the first 3 \(DT_RELACOUNT\) is not a relative relocation")
    refused(edited32(x32, tmp_path, lambda e: e.put(rel(e)[1][0], 0x1004)), "one writes to 0x1004")
    refused(edited32(x32, tmp_path, lambda e: e.put(rel(e)[1][0] + 4, (40 << 8) | 1)),
            r"symbol table \(DT_SYMTAB, 41 symbols\)")
    # 32-bit symbols: st_value is the second word.
    symtab = lambda e: e.offset_of(e.dyn(DT_SYMTAB))      # noqa: E731
    refused(edited32(x32, tmp_path, lambda e: [e.put(symtab(e) + 16 * i + 4, 0x2000) for i in range(1, 4)
                                               if e.data[symtab(e) + 16 * i + 12] & 0xF == 2]),
            "function symbol at 0x2000")
    # 32-bit program and section headers.
    refused(edited32(x32, tmp_path, lambda e: e.put(e.ph(1)[1] + 24, 4)), "no executable loadable segment")
    refused(edited32(x32, tmp_path, lambda e: e.put(46, 64, 2)), r"corrupt section-header table \(entries of 64")


def test_a_version_list_that_loops_back(x32, tmp_path, as_32bit):
    # In 32-bit arithmetic an offset can lead back to an earlier entry: ld.so would walk it for ever.
    def loop(e):
        first = e.offset_of(e.dyn(0x6FFFFFFC))
        step = e.u(first + 16)
        e.put(first + step + 16, (1 << 32) - step)        # the second entry's vd_next: back to the first
    refused(edited32(x32, tmp_path, loop), r"version definitions \(DT_VERDEF\): a list that loops back on itself")


def test_gnu_property_notes_are_checked_too(samples, tmp_path):
    def property_note(e):
        index = e.ph_index(PT_NOTE)
        e.set_ph(index, "type", 0x6474E553)
        e.put(e.offset_of(e.ph(index)["vaddr"]) + 4, 0x1000, 4)
    refused(edited(samples, tmp_path, property_note), "note segment 5: a note of 4096 bytes runs past")


def test_a_64_bit_process_refuses_it(x32):
    refused(x32, "wrong ELF class: the file is 32-bit little-endian, this process is 64-bit little-endian")


# -- boundaries and helpers ---------------------------------------------------------------------------------


def test_tables_must_be_in_the_file_backed_part(samples, tmp_path):
    # .bss is mapped, but zero-filled: a table there is not the one in the file.
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_STRTAB, 0x4010) or e.set_dyn(DT_STRSZ, 8)),
            r"string table \(DT_STRTAB\): \[0x4010, 0x4018\) is not inside a loaded segment")


def test_code_boundaries(samples, tmp_path):
    text = lambda e: e.ph(e.ph_index(PT_LOAD, PF_R | PF_X))      # noqa: E731
    add = lambda e: e.symbol_offset(e.symbol_index(b"add"))      # noqa: E731
    end = lambda e: text(e)["vaddr"] + text(e)["filesz"]      # noqa: E731
    refused(edited(samples, tmp_path, lambda e: e.put(add(e) + 8, end(e))), "function symbol at 0x13e1")
    refused(edited(samples, tmp_path, lambda e: e.put(add(e) + 8, text(e)["vaddr"] - 1)), "function symbol at 0xfff")
    elfcheck.check(edited(samples, tmp_path, lambda e: e.put(add(e) + 8, end(e) - 1)))
    elfcheck.check(edited(samples, tmp_path, lambda e: e.put(add(e) + 8, text(e)["vaddr"])))
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_INIT, 0x13e1)), r"DT_INIT \(0x13e1\) is not in an exec")


def test_locally_bound_symbols_must_be_inside_the_image(samples, tmp_path):
    def hidden_at(value):
        def change(e):
            index = e.symbol_index(b"add")
            e.data[e.symbol_offset(index) + 4] = 0x11              # STB_GLOBAL, STT_OBJECT (not checked as code)
            e.data[e.symbol_offset(index) + 5] = 2                 # STV_HIDDEN: binds locally
            e.put(e.symbol_offset(index) + 8, value)
            e.put(e.relocations()[3][0] + 8, (index << 32) | 6)
        return change
    elfcheck.check(edited(samples, tmp_path, hidden_at(0x401f)))
    elfcheck.check(edited(samples, tmp_path, hidden_at(0)))
    refused(edited(samples, tmp_path, hidden_at(0x4020)), "binds locally but is not defined in the file")


def test_flags_are_named_in_messages(samples, tmp_path):
    path = edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_W), "flags", PF_R))
    assert "which is not readable+writable (" in refused(path, "not readable")
    assert elfcheck._describe_flags(PF_R | PF_W | PF_X) == "readable+writable+executable"
    assert elfcheck._describe_flags(PF_X) == "executable"


def test_a_16_byte_file(tmp_path):
    short = tmp_path / "short.so"
    short.write_bytes(b"\x7fELF" + bytes(12))
    refused(short, r"corrupt ELF identification \(class 0, data 0\)")


def test_internal_parsing_errors_are_elf_errors(samples, monkeypatch):
    # Whatever a damaged table makes the parser trip on, the caller sees an ELFError.
    for error in (struct.error("unpack requires a buffer"), IndexError("index out of range"),
                  TypeError("memoryview: length is not a multiple of itemsize"), ValueError("x")):
        monkeypatch.setattr(elfcheck, "_check_dynamic", lambda *args, error=error: (_ for _ in ()).throw(error))
        refused(samples["v1"], f"corrupt tables \\({error}\\)")


def test_symbol_kinds_that_matter(samples, tmp_path):
    add = lambda e: e.symbol_offset(e.symbol_index(b"add"))      # noqa: E731
    # An IFUNC resolver is called by ld.so: it must be code too.
    refused(edited(samples, tmp_path, lambda e: e.data.__setitem__(add(e) + 4, 0x1A) or e.put(add(e) + 8, 0x2000)),
            "function symbol at 0x2000")
    # An object may live anywhere in the image.
    elfcheck.check(edited(samples, tmp_path,
                          lambda e: e.data.__setitem__(add(e) + 4, 0x11) or e.put(add(e) + 8, 0x2000)))
    # Internal visibility binds locally, as hidden does (protected does not).
    for visibility, local in ((1, True), (2, True), (3, False)):
        def undefined_with(e, visibility=visibility):
            e.data[e.symbol_offset(e.symbol_index(b"__cxa_finalize")) + 5] = visibility
        path = edited(samples, tmp_path, undefined_with)
        if local:
            refused(path, "binds locally but is not defined")
        else:
            elfcheck.check(path)


def test_sections_that_are_not_allocated_are_not_mapped(samples, tmp_path):
    # .comment is in the file only: whatever its flags say besides SHF_ALLOC, no segment need map it.
    def comment_flags(flags):
        return lambda e: e.put(e.u(40) + 64 * e.section(".comment")["index"] + 8, flags)      # sh_flags
    elfcheck.check(edited(samples, tmp_path, comment_flags(0x1)))           # SHF_WRITE
    elfcheck.check(edited(samples, tmp_path, comment_flags(0x4 | 0x30)))    # SHF_EXECINSTR
    refused(edited(samples, tmp_path, comment_flags(0x2)), "maps section 24 from byte 0, but it is at byte")


# -- more boundaries, each a mutant the first mutation pass left alive ------------------------------------


def no_unwind_index(e):
    e.set_ph(e.ph_index(PT_GNU_EH_FRAME), "type", PT_NULL)


def test_gnu_hash_symbol_count(samples):
    # The count the hash table implies is what sizes the symbol and version tables.
    edit = ElfEdit(samples["v1"].read_bytes())
    f = elfcheck._File(0, len(edit.data), bytes(edit.data), 2, "<")
    elfcheck._check_program_headers(f, bytes(edit.data[edit.phoff:edit.phoff + 56 * edit.phnum]), "<IIQQQQQQ",
                               edit.phoff)
    assert elfcheck._check_gnu_hash(f, edit.dyn(DT_GNU_HASH)) == (edit.dyn(DT_STRTAB) - edit.dyn(DT_SYMTAB)) // 24


def test_no_hash_table_at_all(samples, tmp_path):
    elfcheck.check(edited(samples, tmp_path, lambda e: e.retag(DT_GNU_HASH, DT_DEBUG)))


def test_the_sysv_hash_counts_every_symbol(extras, tmp_path):
    if "sysv" not in extras:
        pytest.skip("cc failed")

    def last_function_to_data(e):
        count = e.u(e.offset_of(e.dyn(DT_HASH)) + 4, 4)
        symtab = e.offset_of(e.dyn(DT_SYMTAB))
        last = max(i for i in range(count) if e.data[symtab + 24 * i + 4] & 0xF == 2)
        e.put(symtab + 24 * last + 8, e.dyn(DT_STRTAB))
    refused(edited(extras["sysv"], tmp_path, last_function_to_data), "function symbol at")


def test_segment_boundaries(samples, tmp_path):
    text = lambda e: e.ph_index(PT_LOAD, PF_R | PF_X)      # noqa: E731
    # Adjacent segments are fine; one starting inside the previous one is not.
    elfcheck.check(edited(samples, tmp_path, lambda e: e.set_ph(text(e), "memsz", 0x1000)))
    refused(edited(samples, tmp_path, lambda e: e.set_ph(text(e), "memsz", 0x1100)),
            "loadable segment 2 .it overlaps or precedes segment 1")
    # The last address that does not wrap.
    data = lambda e: e.ph_index(PT_LOAD, PF_R | PF_W)      # noqa: E731
    refused(edited(samples, tmp_path, lambda e: e.set_ph(data(e), "memsz", 2**64 - e.ph(data(e))["vaddr"])),
            r"loadable segment 3 \(file size")


def test_truncation_past_the_tables_is_the_segment_checks_to_catch(samples, tmp_path):
    # Without section headers, a cut after the dynamic section cuts nothing the check reads: only the
    # extent of the last loadable segment says it is short.
    edit = ElfEdit(samples["v1"].read_bytes())
    edit.strip_sections()
    last = edit.ph(edit.ph_index(PT_LOAD, PF_R | PF_W))
    cut = tmp_path / "cut.so"
    cut.write_bytes(bytes(edit.data[:last["offset"] + last["filesz"] - 4]))
    refused(cut, "truncated: loadable segment 3 ends at byte")


def test_relro_bounds(samples, tmp_path):
    relro = lambda e: e.ph_index(PT_GNU_RELRO)      # noqa: E731
    elfcheck.check(edited(samples, tmp_path, lambda e: e.set_ph(relro(e), "vaddr", 0x4010) or
                     e.set_ph(relro(e), "memsz", 0x10)))                         # in .bss: still the segment
    refused(edited(samples, tmp_path, lambda e: e.set_ph(relro(e), "memsz", 0x1000 - 0xdc8 + 0x1001)),
            "PT_GNU_RELRO: it runs past loadable segment 3")


def test_section_access_without_relro_in_the_way(samples, tmp_path):
    def read_only_data(e):
        e.set_ph(e.ph_index(PT_GNU_RELRO), "type", PT_NULL)
        e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_W), "flags", PF_R)
        e.retag(DT_SYMBOLIC_TAG, DT_TEXTREL, 0)              # (relocations may still write it)
    refused(edited(samples, tmp_path, read_only_data), "section 17: it lies in loadable segment 3, which is not "
                                                           r"readable\+writable")

    def text_not_executable(e):
        text, rodata = e.ph_index(PT_LOAD, PF_R | PF_X), e.ph_index(PT_LOAD, PF_R, nth=1)
        e.set_ph(text, "flags", PF_R)
        e.set_ph(rodata, "flags", PF_R | PF_X)              # some other segment is executable
    refused(edited(samples, tmp_path, text_not_executable), r"section 9: it lies in loadable segment 1, which is not "
                                                                r"readable\+executable")


def test_a_read_only_dynamic_section_needs_no_write_access(samples, tmp_path):
    def read_only(e):
        e.strip_sections()
        e.set_ph(e.ph_index(PT_GNU_RELRO), "type", PT_NULL)
        e.set_ph(e.ph_index(PT_DYNAMIC), "flags", PF_R)                     # ld.so will not write it
        e.set_ph(e.ph_index(PT_LOAD, PF_R | PF_W), "flags", PF_R)
        e.retag(DT_SYMBOLIC_TAG, DT_TEXTREL, 0)
    elfcheck.check(edited(samples, tmp_path, read_only))


def test_function_starts_from_sections_alone(samples, tmp_path):
    # No unwind index: the .init and .fini sections still say where their one function starts.
    refused(edited(samples, tmp_path, lambda e: no_unwind_index(e) or e.set_dyn(DT_INIT, 0x1001)),
            r"DT_INIT \(0x1001\) is not the start of a function")
    refused(edited(samples, tmp_path, lambda e: no_unwind_index(e) or
                   e.set_dyn(DT_FINI, e.section(".fini")["addr"] + 4)), "is not the start of a function")
    refused(edited(samples, tmp_path, lambda e: no_unwind_index(e) or e.set_dyn(DT_INIT, 0x1010)),
            "is not the start of a function")
    # The end of .init is not inside it; nobody can tell what is there.
    elfcheck.check(edited(samples, tmp_path, lambda e: no_unwind_index(e) or
                     e.set_dyn(DT_INIT, e.section(".init")["addr"] + e.section(".init")["size"])))
    # Section names come from the table e_shstrndx names; an index past the table: no names, no error.
    elfcheck.check(edited(samples, tmp_path, lambda e: no_unwind_index(e) or e.put(62, e.u(60, 2), 2)))


def test_function_starts_known_from_each_source(samples, tmp_path):
    add = lambda e: e.symbol_offset(e.symbol_index(b"add"))      # noqa: E731
    # A non-code section's start inside an executable segment is not a function's.
    refused(edited(samples, tmp_path, lambda e: e.set_ph(e.ph_index(PT_LOAD, PF_R, nth=1), "flags", PF_R | PF_X) or
                   e.set_dyn(DT_FINI, 0x2000)), r"DT_FINI \(0x2000\) is not the start of a function")

    def only_the_unwind_index_knows(e):
        # The last function the index lists (reading the index from the wrong place loses the last ones).
        hdr_address = e.ph(e.ph_index(PT_GNU_EH_FRAME))["vaddr"]
        hdr = e.offset_of(hdr_address)
        count = e.u(hdr + 8, 4)
        address = (e.u(hdr + 12 + 8 * (count - 1), 4) + hdr_address) % 2**32
        symtab = e.offset_of(e.dyn(DT_SYMTAB))
        for i in range(1, (e.dyn(DT_STRTAB) - e.dyn(DT_SYMTAB)) // 24):
            if e.u(symtab + 24 * i + 8) == address:
                e.put(symtab + 24 * i + 8, e.u(add(e) + 8))       # the symbol no longer says so
        e.set_dyn(DT_FINI, address)
    elfcheck.check(edited(samples, tmp_path, only_the_unwind_index_knows))

    def only_the_symbol_knows(e):
        address = e.u(add(e) + 8)
        hdr = e.offset_of(e.ph(e.ph_index(PT_GNU_EH_FRAME))["vaddr"])
        count = e.u(hdr + 8, 4)
        for i in range(count):                                          # hide add's unwind entry
            at = hdr + 12 + 8 * i
            if (e.u(at, 4) + e.ph(e.ph_index(PT_GNU_EH_FRAME))["vaddr"]) % 2**32 == address:
                e.put(at, e.u(at, 4) + 1, 4)
        e.set_dyn(DT_FINI, address)
    elfcheck.check(edited(samples, tmp_path, only_the_symbol_knows))

    def bad_index(field, value):
        def change(e):
            e.data[e.offset_of(e.ph(e.ph_index(PT_GNU_EH_FRAME))["vaddr"]) + field] = value
            e.set_dyn(DT_FINI, e.section(".text")["addr"] + 0x101)
        return change
    for field, value in ((0, 2), (2, 0x1B), (3, 0x1B)):                # version, count encoding, table encoding
        elfcheck.check(edited(samples, tmp_path, bad_index(field, value)))   # an index we cannot read: nobody can tell

    def empty_index(e):
        e.put(e.offset_of(e.ph(e.ph_index(PT_GNU_EH_FRAME))["vaddr"]) + 8, 0, 4)
        e.set_dyn(DT_FINI, e.section(".text")["addr"] + 0x101)
    elfcheck.check(edited(samples, tmp_path, empty_index))


def test_string_offsets_at_the_boundary(samples, tmp_path):
    strsz = lambda e: e.dyn(DT_STRSZ)      # noqa: E731
    verneed = lambda e: e.offset_of(e.dyn(DT_VERNEED))      # noqa: E731
    refused(edited(samples, tmp_path, lambda e: e.put(verneed(e) + 4, strsz(e), 4)), "not a DT_NEEDED entry")
    refused(edited(samples, tmp_path, lambda e: e.put(verneed(e) + 16 + 8, strsz(e), 4)), "a version name past")
    refused(edited(samples, tmp_path, lambda e: e.put(e.symbol_offset(e.symbol_index(b"add")), strsz(e), 4)),
            "a symbol name lies past")


def test_version_definitions_index_the_version_table(tmp_path):
    library = versioned_library(tmp_path)
    versym = lambda e: e.offset_of(e.dyn(DT_VERSYM))      # noqa: E731
    refused(edited(library, tmp_path, lambda e: e.put(versym(e) + 2, 9, 2)), "version index 9 is not defined")

    def name_past_the_strings(e):
        verdef = e.offset_of(e.dyn(0x6FFFFFFC))
        e.put(verdef + e.u(verdef + 12, 4), e.dyn(DT_STRSZ), 4)     # the first entry's first name
    refused(edited(library, tmp_path, name_past_the_strings),
            "version definitions .DT_VERDEF.: a version name past")


def test_code_pointer_loops_check_each_tag(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.retag(DT_INIT, DT_DEBUG) or e.set_dyn(DT_FINI, 0)),
            r"DT_FINI \(0x0\)")
    refused(edited(samples, tmp_path, lambda e: e.retag(DT_INIT_ARRAY, DT_DEBUG) or e.set_dyn(DT_FINI_ARRAYSZ, 4)),
            "DT_FINI_ARRAYSZ is 4")


def test_zero_relocation_table_addresses(samples, tmp_path):
    # DT_RELA 0 means "none" (DT_RELR-only libraries): the init array is then not relocated.
    refused(edited(samples, tmp_path, lambda e: e.set_dyn(DT_RELA, 0) or e.retag(DT_RELACOUNT, DT_DEBUG)),
            "DT_INIT_ARRAY slot at 0x3dc8 is not relocated to a function")
    # DT_JMPREL 0 is read like any other (ld.so does).
    with pytest.raises(elf.ELFError):
        elfcheck.check(edited(samples, tmp_path, lambda e: e.set_dyn(DT_JMPREL, 0)))


def test_rel_count_defaults_to_none(x32, tmp_path, as_32bit):
    def no_count(e):
        at = e.dyn_at(0x6FFFFFFA)
        e.put(at, DT_DEBUG)
        rel = e.offset_of(e.dyn(DT_REL))
        first, second = bytes(e.data[rel:rel + 8]), bytes(e.data[rel + 8:rel + 16])
        e.data[rel:rel + 8], e.data[rel + 8:rel + 16] = second, first          # a symbolic one first
    elfcheck.check(edited32(x32, tmp_path, no_count))


def test_plt_relocations_are_checked(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.put(e.relocations(DT_JMPREL, DT_PLTRELSZ)[0][0], 0x1000)),
            r"relocations at 0x5a0: one writes to 0x1000")

    def empty_rela(e):
        e.set_dyn(DT_RELASZ, 0)
        e.set_dyn(DT_RELACOUNT, 0)
        e.put(e.relocations(DT_JMPREL, DT_PLTRELSZ)[0][0], 0x1000)
    refused(edited(samples, tmp_path, empty_rela), "one writes to 0x1000")


def test_jmprel_nested_in_rela(samples, tmp_path):
    # Old linkers put the PLT relocations at the end of DT_RELA: ld.so subtracts them, fine...
    elfcheck.check(edited(samples, tmp_path, lambda e: e.set_dyn(DT_RELASZ, e.dyn(DT_RELASZ) + e.dyn(DT_PLTRELSZ))))

    # ...but DT_RELA starting inside DT_JMPREL and ending with it would underflow that subtraction.
    def overlapping(e):
        e.set_dyn(DT_JMPREL, e.dyn(DT_RELA) + 24 * 4)
        e.set_dyn(DT_PLTRELSZ, 24 * 4)
        e.set_dyn(DT_RELA, e.dyn(DT_RELA) + 24 * 6)
        e.set_dyn(DT_RELASZ, 24 * 2)
        e.set_dyn(DT_RELACOUNT, 0)
    refused(edited(samples, tmp_path, overlapping), "DT_JMPREL overlaps the start of the other relocations")


def test_every_table_is_checked_on_a_machine_without_relocation_types(samples, tmp_path, monkeypatch):
    retype = as_machine(monkeypatch, 8)             # MIPS: no relocation types known here

    def hidden_import(e):
        retype(e)
        e.data[e.symbol_offset(e.symbol_index(b"read")) + 5] = 2
    refused(edited(samples, tmp_path, hidden_import), "relocations at 0x5a0: symbol 2 binds locally")


def test_symbolic_slots_add_their_addend(samples, tmp_path):
    def slot_from(name, addend):
        def change(e):
            at = e.relocations()[0][0]
            e.put(at + 8, (e.symbol_index(name) << 32) | 1)
            e.put(at + 16, addend)
            e.set_dyn(DT_RELACOUNT, 0)
        return change
    elfcheck.check(edited(samples, tmp_path, slot_from(b"add", 0x200)))
    refused(edited(samples, tmp_path, slot_from(b"add", 0x2000)), "is relocated to")
    refused(edited(samples, tmp_path, lambda e: e.put(e.relocations()[0][0] + 16, 0)),
            "slot at 0x3dc8 is relocated to 0x0, which is not in an executable segment")


def test_thread_local_zero_data_is_not_mapped_by_a_segment(extras, tmp_path):
    # .tbss (SHF_TLS, SHT_NOBITS) describes each thread's block, not memory the segments map.
    if "plain" not in extras:
        pytest.skip("cc failed")
    def tbss_elsewhere(e):
        e.put(e.u(40) + 64 * e.section(".tbss")["index"] + 16, 0x100000)       # sh_addr
    elfcheck.check(edited(extras["plain"], tmp_path, tbss_elsewhere))


# -- the last survivors of the mutation pass ------------------------------------------------------------


class NoteFile:
    """Just what _check_notes reads: notes from bytes, in this host's order."""

    order = "<"

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read_at(self, address, size, what, flags=PF_R):
        return self.data[address:address + size]


def note(namesz, descsz, name=b"", desc=b""):
    return struct.pack("<III", namesz, descsz, 5) + name + desc


@pytest.mark.parametrize("data, align, ok", [
    (note(4, 20, b"GNU\0", bytes(20)), 4, True),
    (note(1, 19, b"G\0\0\0", bytes(19)) + b"\0", 4, True),                     # rounded up to 4 twice
    (note(1, 21, b"G\0\0\0", bytes(20)), 4, False),                             # desc runs one byte past
    (note(4, 17, b"GNU\0", bytes(17)) + bytes(3) + note(0, 4, b"", bytes(3)), 4, False),
    (note(4, 17, b"GNU\0", bytes(17)) + bytes(3) + note(0, 4, b"", bytes(4)), 4, True),
    (note(4, 16, b"GNU\0", bytes(16)) + note(0, 9, b"", bytes(8)), 8, False),  # align 8: GNU properties
    (note(4, 20, b"GNU\0", bytes(20)) + note(0, 5), 4, False),                  # a header exactly at the end
])
def test_notes(data, align, ok):
    check = lambda: elfcheck._check_notes(NoteFile(data), 0, len(data), align, 5)      # noqa: E731
    if ok:
        check()
    else:
        with pytest.raises(elf.ELFError, match="note segment 5: a note of"):
            check()


def test_a_section_needing_write_and_execute(samples, tmp_path):
    def data_is_code(e):
        e.put(e.u(40) + 64 * e.section(".data")["index"] + 8, 0x7)          # SHF_WRITE | SHF_ALLOC | SHF_EXECINSTR
    refused(edited(samples, tmp_path, data_is_code),
            r"section 22: it lies in loadable segment 3, which is not readable\+writable\+executable \(")


def test_a_section_table_address_of_zero_means_none(samples, tmp_path):
    elfcheck.check(edited(samples, tmp_path, lambda e: e.put(40, 0)))             # e_shoff 0, e_shnum kept


def test_truncation_message_names_the_end(samples, tmp_path):
    edit = ElfEdit(samples["v1"].read_bytes())
    edit.strip_sections()
    last = edit.ph(edit.ph_index(PT_LOAD, PF_R | PF_W))
    end = last["offset"] + last["filesz"]
    cut = tmp_path / "cut.so"
    cut.write_bytes(bytes(edit.data[:end - 4]))
    refused(cut, f"truncated: loadable segment 3 ends at byte {end} but the file has {end - 4} bytes")


def test_tls_alignment_one(extras, tmp_path):
    if "plain" not in extras:
        pytest.skip("cc failed")
    elfcheck.check(edited(extras["plain"], tmp_path, lambda e: e.set_ph(e.ph_index(PT_TLS), "align", 1)))


def test_relro_of_one_byte_at_the_segment_end(samples, tmp_path):
    relro = lambda e: e.ph_index(PT_GNU_RELRO)      # noqa: E731
    data = lambda e: e.ph(e.ph_index(PT_LOAD, PF_R | PF_W))      # noqa: E731
    elfcheck.check(edited(samples, tmp_path,
                          lambda e: e.set_ph(relro(e), "vaddr", data(e)["vaddr"] + data(e)["memsz"] - 1)
                          or e.set_ph(relro(e), "memsz", 1)))


def test_a_section_below_the_first_segment(samples, tmp_path):
    def shifted(e):
        first = e.ph_index(PT_LOAD)
        for field, delta in (("offset", 0x100), ("vaddr", 0x100), ("paddr", 0x100), ("filesz", -0x100),
                             ("memsz", -0x100)):
            e.set_ph(first, field, e.ph(first)[field] + delta)
        comment = e.u(40) + 64 * e.section(".comment")["index"]
        e.put(comment + 8, 0x2)                 # SHF_ALLOC
        e.put(comment + 16, 0x10)               # sh_addr: below the first segment
        e.put(comment + 24, 0x10)               # sh_offset
    refused(edited(samples, tmp_path, shifted), r"program headers: section 24: \[0x10, 0x37\) is not inside a loaded")


def test_sysv_hash_boundaries(extras, tmp_path):
    if "sysv" not in extras:
        pytest.skip("cc failed")
    table = lambda e: e.offset_of(e.dyn(DT_HASH))      # noqa: E731

    def last_chain_is(value):
        def change(e):
            nbucket, nchain = e.u(table(e), 4), e.u(table(e) + 4, 4)
            e.put(table(e) + 8 + 4 * (nbucket + nchain - 1), value(nchain), 4)
        return change
    refused(edited(extras["sysv"], tmp_path, last_chain_is(lambda n: n)), "names a symbol past its")
    elfcheck.check(edited(extras["sysv"], tmp_path, last_chain_is(lambda n: n - 1)))

    def no_chains(e):
        e.put(table(e), 1, 4)                   # one bucket...
        e.put(table(e) + 4, 0, 4)               # ...no chains
        e.put(table(e) + 8, 1, 4)               # ...naming symbol 1
    refused(edited(extras["sysv"], tmp_path, no_chains), "names a symbol past its 0 chains")


def test_the_sysv_hash_sizes_the_symbol_table(extras, tmp_path):
    # The last function symbol, named by no relocation: only DT_HASH's count says the table reaches it.
    if "sysv" not in extras:
        pytest.skip("cc failed")
    edit = ElfEdit(extras["sysv"].read_bytes())
    count = edit.u(edit.offset_of(edit.dyn(DT_HASH)) + 4, 4)
    symtab = edit.offset_of(edit.dyn(DT_SYMTAB))
    last = max(i for i in range(count) if edit.data[symtab + 24 * i + 4] & 0xF == 2 and edit.u(symtab + 24 * i + 8))
    for table, size in ((DT_RELA, DT_RELASZ), (DT_JMPREL, DT_PLTRELSZ)):
        for at, _offset, info, _addend in edit.relocations(table, size):
            if info >> 32 >= last:
                edit.put(at + 8, 0)                     # R_X86_64_NONE: names no symbol
    path = tmp_path / "unnamed.so"
    path.write_bytes(bytes(edit.data))
    elfcheck.check(path)
    edit.put(symtab + 24 * last + 8, edit.dyn(DT_STRTAB))
    path.write_bytes(bytes(edit.data))
    refused(path, "function symbol at")


def test_32_bit_symbol_fields(x32, tmp_path, as_32bit):
    def hidden_undefined_f(e):
        symtab = e.offset_of(e.dyn(DT_SYMTAB))
        strtab = e.offset_of(e.dyn(DT_STRTAB))
        for i in range(1, 8):
            name = e.u(symtab + 16 * i)
            if bytes(e.data[strtab + name:strtab + name + 2]) == b"f\0":
                e.data[symtab + 16 * i + 13] = 2          # st_other: STV_HIDDEN
                e.put(symtab + 16 * i + 14, 0, 2)         # st_shndx: SHN_UNDEF
                return
        raise AssertionError("no symbol f")
    refused(edited32(x32, tmp_path, hidden_undefined_f), "binds locally but is not defined in the file")


def test_identical_rela_and_jmprel_tables_are_nested_not_overlapping(samples, tmp_path):
    def same(e):
        e.set_dyn(DT_RELA, e.dyn(DT_JMPREL))
        e.set_dyn(DT_RELASZ, e.dyn(DT_PLTRELSZ))
        e.set_dyn(DT_RELACOUNT, 0)
    refused(edited(samples, tmp_path, same), "DT_INIT_ARRAY slot at 0x3dc8 is not relocated to a function")


def test_negative_addends(samples, tmp_path):
    def slot_from_add_minus(delta):
        def change(e):
            at = e.relocations()[0][0]
            e.put(at + 8, (e.symbol_index(b"add") << 32) | 1)
            e.put(at + 16, -delta)
            e.set_dyn(DT_RELACOUNT, 0)
        return change
    elfcheck.check(edited(samples, tmp_path, slot_from_add_minus(0x10)))
    refused(edited(samples, tmp_path, slot_from_add_minus(0x1000)), "is relocated to")


def test_relocation_targets_up_to_the_last_mapped_word(samples, tmp_path):
    data = lambda e: e.ph(e.ph_index(PT_LOAD, PF_R | PF_W))      # noqa: E731
    page_end = lambda e: -(-(data(e)["vaddr"] + data(e)["memsz"]) // 4096) * 4096      # noqa: E731
    elfcheck.check(edited(samples, tmp_path, lambda e: e.put(e.relocations()[4][0], page_end(e) - 8)))
    refused(edited(samples, tmp_path, lambda e: e.put(e.relocations()[4][0], page_end(e) - 7)), "one writes to")


def test_relr_decoding():
    f = elfcheck._File(0, 0, b"", 2, "<")
    words = lambda *values: struct.pack(f"<{len(values)}Q", *values)      # noqa: E731
    # An address, then a bitmap of the 63 words after it (bit 0 marks a bitmap), then the next 63.
    assert elfcheck._decode_relr(f, words(0x1000, 0b1011, (1 << 63) | 1)) == {0x1000, 0x1008, 0x1018,
                                                                         0x1008 + 63 * 8 + 62 * 8}
    assert elfcheck._decode_relr(f, words(0x1000, 0b101)) == {0x1000, 0x1010}
    assert elfcheck._decode_relr(f, words(0b11)) == {0}                       # a bitmap first: from address 0
    f32 = elfcheck._File(0, 0, b"", 1, "<")
    assert elfcheck._decode_relr(f32, struct.pack("<3I", 0x100, 0b11, (1 << 31) | 1)) == {0x100, 0x104, 0x104 + 31 * 4 + 30 * 4}


def test_an_addend_that_is_large_but_not_negative(samples, tmp_path):
    refused(edited(samples, tmp_path, lambda e: e.put(e.relocations()[0][0] + 16, 1 << 62)),
            "slot at 0x3dc8 is relocated to 0x4000000000000000")
