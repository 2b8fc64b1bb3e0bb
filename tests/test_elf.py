"""The ELF check that stands between a half-written file and glibc's SIGBUS."""

from __future__ import annotations

import subprocess

import pytest

from nativereload import elf


def test_a_built_library_passes(samples):
    for path in samples.values():
        elf.check(path)


def test_every_truncation_is_rejected(samples, tmp_path):
    data = samples["v1"].read_bytes()
    cut = tmp_path / "cut.so"
    for size in list(range(0, 128)) + list(range(128, len(data), 61)) + [len(data) - 1]:
        cut.write_bytes(data[:size])
        with pytest.raises(elf.ELFError):
            elf.check(cut)


def test_wrong_class_and_machine(samples, tmp_path):
    data = bytearray(samples["v1"].read_bytes())
    other = tmp_path / "other.so"
    wrong_class = bytearray(data)
    wrong_class[4] = 1 if data[4] == 2 else 2
    other.write_bytes(bytes(wrong_class))
    with pytest.raises(elf.ELFError, match="wrong ELF class"):
        elf.check(other)
    wrong_machine = bytearray(data)
    wrong_machine[18:20] = (40).to_bytes(2, "little")         # ARM
    other.write_bytes(bytes(wrong_machine))
    with pytest.raises(elf.ELFError, match="built for ARM.*wrong architecture"):
        elf.check(other)


def test_not_elf_and_not_shared(tmp_path):
    text = tmp_path / "text.so"
    text.write_text("hello, this is not a library at all\n")
    with pytest.raises(elf.ELFError, match="not an ELF file"):
        elf.check(text)
    source = tmp_path / "obj.c"
    source.write_text("int f(void) { return 1; }\n")
    subprocess.run(["cc", "-c", "-fPIC", str(source), "-o", str(tmp_path / "obj.o")], check=True)
    with pytest.raises(elf.ELFError, match="relocatable object"):
        elf.check(tmp_path / "obj.o")
