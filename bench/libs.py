"""The benchmark's C libraries, generated and compiled into a temporary directory.

    sample        csrc/samples/sample.c as is: add, dot4, sum_bytes (call overhead)
    objects       csrc/samples/objects.c as is: handles and static strings (objects across reloads)
    small         10 functions + a 40 KB read-only table: a ~50 KB library (reload latency)
    large         10 functions + a 20 MB read-only table (reload latency, file-size scaling)
    funcsN        N trivial functions, N = 10, 100, 1000 (reload time vs bound functions)
    api           sample.c compiled as a cffi API-mode (out-of-line) extension module

The tables are random bytes pulled in with the assembler's ``.incbin``: a
20 MB array initializer in C would take the compiler minutes, and random
bytes keep the file its full size on disk.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SOURCE = ROOT / "csrc" / "samples" / "sample.c"

SAMPLE_CDEF = """
long add(long, long);
double dot4(double, double, double, double);
long sum_bytes(const char *, long);
"""

TABLE_FUNCTIONS = 10


def compiler() -> str:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"


def compile_shared(source: Path, output: Path) -> Path:
    """``cc -shared -fPIC -O2 source -o output``; raises CalledProcessError with the compiler's output."""
    subprocess.run([compiler(), "-shared", "-fPIC", "-O2", str(source), "-o", str(output)],
                   check=True, capture_output=True, text=True)
    return output


def funcs_cdef(n: int) -> str:
    """The cdef of ``n`` functions ``long fI(long)`` (the table and funcsN libraries)."""
    return "".join(f"long f{i}(long);\n" for i in range(n))


def build_table_library(directory: Path, name: str, table_bytes: int) -> Path:
    """A library of TABLE_FUNCTIONS functions reading a ``table_bytes`` random read-only table."""
    blob = directory / f"{name}.bin"
    with open(blob, "wb") as out:
        remaining = table_bytes
        while remaining:
            chunk = min(remaining, 1 << 20)
            out.write(os.urandom(chunk))
            remaining -= chunk
    functions = "".join(
        f"long f{i}(long x) {{ return x + nr_table[(x + {i}) % {table_bytes}]; }}\n"
        for i in range(TABLE_FUNCTIONS))
    source = directory / f"{name}.c"
    source.write_text(
        f"/* {name}: a library whose file is mostly a {table_bytes}-byte read-only table. */\n"
        "extern const unsigned char nr_table[];\n"
        "__asm__(\".section .rodata\\n.balign 64\\n.globl nr_table\\n.hidden nr_table\\n"
        f".type nr_table, @object\\nnr_table:\\n.incbin \\\"{blob}\\\"\\n.previous\");\n"
        + functions)
    library = compile_shared(source, directory / f"{name}.so")
    blob.unlink()
    return library


def build_funcs_library(directory: Path, n: int) -> Path:
    """A library of ``n`` functions ``long fI(long x) { return x + I; }``."""
    source = directory / f"funcs{n}.c"
    source.write_text(f"/* funcs{n}: {n} trivial functions, to see reload cost per bound symbol. */\n"
                      + "".join(f"long f{i}(long x) {{ return x + {i}; }}\n" for i in range(n)))
    return compile_shared(source, directory / f"funcs{n}.so")


def build_api_module(directory: Path):
    """sample.c as a cffi API-mode extension module, compiled and imported; returns (ffi, lib).

    cffi writes the C source and the compiler builds it directly, like the
    other libraries: ``ffi.compile()`` would need setuptools, which a fresh
    virtualenv on Python >= 3.12 does not have.
    """
    name = "_nativereload_bench_api"
    ffi = cffi.FFI()
    ffi.cdef(SAMPLE_CDEF)
    ffi.set_source(name, SAMPLE_SOURCE.read_text(), compiler_verbose=False)   # no "generating ..." on stdout
    build = directory / "api"
    build.mkdir(exist_ok=True)
    source = build / f"{name}.c"
    ffi.emit_c_code(str(source))
    output = build / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([compiler(), "-shared", "-fPIC", "-O2", f"-I{sysconfig.get_paths()['include']}", str(source),
                    "-o", str(output)], check=True, capture_output=True, text=True)
    spec = importlib.util.spec_from_file_location(name, output)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib


def build_all(directory: Path, *, large_bytes: int, funcs: tuple[int, ...]) -> dict[str, Path]:
    """Compile every library the benchmark loads through the registry; return name -> .so path."""
    libraries = {
        "sample": compile_shared(SAMPLE_SOURCE, directory / "sample.so"),
        "objects": compile_shared(ROOT / "csrc" / "samples" / "objects.c", directory / "objects.so"),
        "small": build_table_library(directory, "small", 40_000),
        "large": build_table_library(directory, "large", large_bytes),
    }
    for n in funcs:
        libraries[f"funcs{n}"] = build_funcs_library(directory, n)
    return libraries
