"""The interface commands: `nativereload cdef`, `embed`, `check` and `--include-dir`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cffi
import pytest

from nativereload import interface
from nativereload.cli import main

from conftest import ROOT, SYSTEM_LIBDIR, require_real_library


def test_include_dir(capsys):
    assert main(["--include-dir"]) == 0
    directory = Path(capsys.readouterr().out.strip())
    assert (directory / "nativereload.h").is_file()
    assert "NATIVERELOAD_CDEF" in (directory / "nativereload.h").read_text()


def test_shipped_header_compiles_in_both_views(tmp_path):
    source = tmp_path / "uses.c"
    source.write_text("#include <nativereload.h>\nNATIVERELOAD_EXPORT int f(void) { return 1; }\n")
    include = ROOT / "nativereload" / "include"
    for extra in ([], ["-DNATIVERELOAD_CDEF=1"], ["-x", "c++"]):
        subprocess.run(["cc", "-c", "-Wall", "-Werror", *extra, "-I", str(include), "-o", str(tmp_path / "u.o"),
                        str(source)], check=True)


@pytest.mark.parametrize("new, code, verdict", [
    ("contract_v2", 0, "no change: a reload would be accepted"),
    ("contract_add", 0, "1 added (compatible): a reload would be accepted"),
    ("contract_return", 1, "1 changed (incompatible): a reload would be refused"),
    ("contract_drop", 1, "1 removed (incompatible): a reload would be refused"),
])
def test_check_exit_codes(samples, capsys, new, code, verdict):
    assert main(["check", str(samples["contract"]), str(samples[new])]) == code
    out = capsys.readouterr().out
    assert verdict in out.splitlines()[0]


def test_check_shows_old_and_new_declarations(samples, capsys):
    assert main(["check", str(samples["contract"]), str(samples["contract_param"])]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["  changed function contract_add: parameter 2 is int, was long",
                         "      old: long contract_add(long, long)",
                         "      new: long contract_add(long, int)"]


def test_check_json(samples, capsys):
    assert main(["check", str(samples["contract"]), str(samples["contract_struct"]), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["compatible"] is False
    assert doc["old"]["digest"] == interface.read(samples["contract"]).digest
    (change,) = doc["changed"]
    assert change["name"] == "struct contract_point" and "size 16, was 8" in change["details"]


def test_check_without_an_interface_exits_2(samples, capsys, tmp_path):
    assert main(["check", str(samples["contract"]), str(samples["v1"])]) == 2
    err = capsys.readouterr().err
    assert f"error: {samples['v1']} has no embedded interface" in err and "hint: " in err
    assert main(["check", str(tmp_path / "missing.so"), str(samples["v1"]), "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is False and "No such file" in err


def test_check_end_to_end(samples):
    proc = subprocess.run([sys.executable, "-m", "nativereload", "check", str(samples["contract"]),
                           str(samples["contract_enum"])], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "CONTRACT_SAFE = 3, was 2" in proc.stdout


def test_cdef_command_with_library(capsys, tmp_path):
    library = str(SYSTEM_LIBDIR / "libsqlite3.so.0")
    require_real_library("/usr/include/sqlite3.h", library)
    assert main(["cdef", "/usr/include/sqlite3.h", "--library", library]) == 0
    out, err = capsys.readouterr()
    ffi = cffi.FFI()
    ffi.cdef(out)
    assert "are not exported by" in err and "sqlite3_snapshot_get" in err and 'missing="lazy"' in err
    assert "left out: sqlite3_vmprintf" in err
    assert main(["cdef", "/usr/include/sqlite3.h", "-o", str(tmp_path / "sqlite.cdef")]) == 0
    assert (tmp_path / "sqlite.cdef").read_text() == out


def test_cdef_command_reports_compiler_errors(capsys, tmp_path):
    header = tmp_path / "h.h"
    header.write_text("#include <no/such/thing.h>\n")
    assert main(["cdef", str(header)]) == 1
    assert "no/such/thing.h" in capsys.readouterr().err


def test_embed_command(tmp_path, capsys):
    header = tmp_path / "m.h"
    header.write_text("#define M_WIDTH 8\nstruct m { int a; };\nint m_get(struct m *);\n")
    assert main(["embed", str(header), "-D", "UNUSED=1", "-o", str(tmp_path / "m_interface.c")]) == 0
    assert "1 function(s), 1 type(s), 1 constant(s)" in capsys.readouterr().out
    library = tmp_path / "m.so"
    (tmp_path / "m.c").write_text('#include "m.h"\nint m_get(struct m *p) { return p->a; }\n')
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(tmp_path / "m.c"),
                    str(tmp_path / "m_interface.c")], check=True)
    embedded = interface.read(library)
    assert embedded.constants == {"M_WIDTH": 8} and embedded.functions["m_get"].params == ("struct m *",)
