"""Embedding a header's interface in a module: `nativereload embed` and nativereload_add_module(... INTERFACE h)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cffi
import pytest

from nativereload import build, cdefgen, interface
from nativereload.errors import InterfaceError

from conftest import ROOT, require_real_library

HEADER = """
#ifndef COUNTER_H
#define COUNTER_H
#include <nativereload.h>
#include "types.h"
#define COUNTER_STEP 3
NATIVERELOAD_EXPORT long counter_add(long a, long b);
NATIVERELOAD_EXPORT counter_t counter_next(struct counter_state *state);
#ifndef NATIVERELOAD_CDEF
static inline long counter_twice(long x) { return 2 * x; }
#endif
#endif
"""
TYPES = "typedef long counter_t;\nstruct counter_state { counter_t value; int calls; };\n"
SOURCE = """
#include "counter.h"
long counter_add(long a, long b) { return a + counter_twice(b) - b; }
counter_t counter_next(struct counter_state *state) { state->calls++; return state->value += COUNTER_STEP; }
"""


def _project(root: Path, cmake: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "include").mkdir(exist_ok=True)
    (root / "include" / "counter.h").write_text(HEADER)
    (root / "include" / "types.h").write_text(TYPES)
    (root / "counter.c").write_text(SOURCE)
    (root / "CMakeLists.txt").write_text(cmake or textwrap.dedent("""
        cmake_minimum_required(VERSION 3.16)
        project(counter C)
        find_package(nativereload REQUIRED)
        nativereload_add_module(counter SOURCES counter.c INTERFACE include/counter.h)
        target_include_directories(counter PRIVATE include)
        target_compile_options(counter PRIVATE -fvisibility=hidden)
        """))
    return root


def _call(path: Path, embedded: interface.Interface):
    ffi = cffi.FFI()
    ffi.cdef(embedded.cdef)
    return ffi, ffi.dlopen(str(path))


def test_cmake_interface_round_trip(tmp_path):
    project = _project(tmp_path / "project")
    result = build.build(project, project / "build", output=open(tmp_path / "log", "w"))
    (module,) = result.modules
    embedded = interface.read(module.path)
    assert embedded is not None
    assert set(embedded.functions) == {"counter_add", "counter_next"}
    assert embedded.types["struct counter_state"].size == 16 and embedded.constants == {"COUNTER_STEP": 3}
    ffi, lib = _call(module.path, embedded)
    state = ffi.new("struct counter_state *")
    assert lib.counter_add(2, 3) == 5 and lib.counter_next(state) == 3 and state.calls == 1

    # A header the interface header includes changes: the build embeds again (depfile).
    (project / "include" / "types.h").write_text(TYPES.replace("int calls;", "int calls; int extra;"))
    result = build.build(project, project / "build", output=open(tmp_path / "log", "w"))
    assert [m.name for m in result.built] == ["counter"]
    changed = interface.diff(embedded, interface.read(module.path))
    assert [c.name for c in changed.changed] == ["struct counter_state"] and not changed.compatible

    # Nothing changed: nothing rebuilt (the embedded file is not regenerated for nothing).
    result = build.build(project, project / "build", output=open(tmp_path / "log", "w"))
    assert result.built == ()


def test_cmake_interface_with_a_found_python(tmp_path):
    """Without NATIVERELOAD_PYTHON the helper runs the Python CMake finds, with PYTHONPATH set to the package."""
    project = _project(tmp_path / "project")
    build_dir = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(project), "-B", str(build_dir), *generator,
                    f"-Dnativereload_DIR={build.cmake_dir()}", f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir)], check=True, capture_output=True)
    assert interface.read(build_dir / "modules" / "counter.so") is not None


def test_cmake_refuses_a_python_without_nativereload(tmp_path):
    project = _project(tmp_path / "project")
    proc = subprocess.run(["cmake", "-S", str(project), "-B", str(tmp_path / "build"),
                           f"-Dnativereload_DIR={build.cmake_dir()}", "-DNATIVERELOAD_PYTHON=/bin/false"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    message = " ".join(proc.stderr.split())     # CMake wraps its messages
    assert "/bin/false cannot import nativereload" in message and "-DNATIVERELOAD_PYTHON=" in message


def test_cmake_cxx_only_project(tmp_path):
    if not shutil.which("c++") and not shutil.which("g++"):
        pytest.skip("no C++ compiler")
    project = _project(tmp_path / "project", textwrap.dedent("""
        cmake_minimum_required(VERSION 3.16)
        project(counter CXX)
        find_package(nativereload REQUIRED)
        nativereload_add_module(counter SOURCES counter.cpp INTERFACE include/counter.h)
        target_include_directories(counter PRIVATE include)
        """))
    (project / "counter.cpp").write_text('extern "C" {\n' + SOURCE + "}\n")
    result = build.build(project, project / "build", output=open(tmp_path / "log", "w"))
    (module,) = result.modules
    embedded = interface.read(module.path)
    ffi, lib = _call(module.path, embedded)
    assert lib.counter_add(1, 2) == 3


def test_embed_cli_output_compiles_into_the_module(tmp_path):
    project = _project(tmp_path)
    out = tmp_path / "gen" / "counter_interface.c"
    depfile = tmp_path / "gen" / "counter_interface.d"
    proc = subprocess.run([sys.executable, "-m", "nativereload", "embed", str(project / "include" / "counter.h"),
                           "-I", str(project / "include"), "-o", str(out), "--depfile", str(depfile)],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "2 function(s)" in proc.stdout
    deps = depfile.read_text()
    assert deps.startswith(f"{out}:") and str(project / "include" / "types.h") in deps
    assert str(cdefgen.include_dir() / "nativereload.h") in deps
    library = tmp_path / "counter.so"
    # --gc-sections drops unreferenced sections: the interface is kept anyway (the retain attribute).
    subprocess.run(["cc", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-pedantic", "-std=c11",
                    "-ffunction-sections", "-fdata-sections", "-Wl,--gc-sections",
                    "-I", str(project / "include"), "-I", str(cdefgen.include_dir()),
                    "-o", str(library), str(project / "counter.c"), str(out)], check=True)
    embedded = interface.read(library)
    assert embedded is not None and set(embedded.functions) == {"counter_add", "counter_next"}


@pytest.mark.parametrize("header", ["zlib.h", "zstd.h", "lz4.h", "sqlite3.h", "xxhash.h"])
def test_real_headers_embed_and_their_layouts_hold(tmp_path, header):
    """Every struct cffi lays out from a real header, the compiler lays out the same (checked at compile time)."""
    path = Path("/usr/include") / header
    require_real_library(path)
    out = tmp_path / "interface.c"
    embedded = cdefgen.embed_header(path, out)
    subprocess.run(["cc", "-c", "-Wall", "-Wextra", "-Werror", "-pedantic", "-std=c11", "-o", str(tmp_path / "i.o"),
                    str(out)], check=True)
    assert "NATIVERELOAD_CHECK_(sizeof(" in out.read_text() and embedded.functions


def test_layout_hidden_from_the_cdef_view_fails_the_build(tmp_path):
    header = tmp_path / "packed.h"
    header.write_text(textwrap.dedent("""
        #ifdef NATIVERELOAD_CDEF
        #define PACKED
        #else
        #define PACKED __attribute__((packed))
        #endif
        struct wire { char tag; int value; } PACKED;
        int wire_value(const struct wire *w);
        """))
    # cdef_from_header would catch __attribute__((packed)) itself; here the header hides it from that view.
    out = tmp_path / "packed_interface.c"
    cdefgen.embed_header(header, out)
    proc = subprocess.run(["cc", "-c", "-o", str(tmp_path / "x.o"), str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and "struct wire is laid out differently" in proc.stderr
    # The layout check can be turned off on purpose.
    subprocess.run(["cc", "-c", "-DNATIVERELOAD_NO_LAYOUT_CHECK", "-o", str(tmp_path / "x.o"), str(out)], check=True)


def test_embed_a_header_cffi_cannot_take_at_all(tmp_path):
    header = tmp_path / "bad.h"
    header.write_text("#error this header is not for you\n")
    with pytest.raises(InterfaceError, match="this header is not for you"):
        cdefgen.embed_header(header, tmp_path / "out.c")
    assert not (tmp_path / "out.c").exists()
