"""What the ELF check costs on each load: nativereload.elfcheck.check_fd on libraries of several sizes.

    python bench/elf_check.py            # a Markdown table on stdout
    python bench/elf_check.py --json F   # and every figure in F

Each library's check runs on an open descriptor (as Image._copy calls it, on
the fresh copy), median of 7 blocks of timeit, next to the same copy + dlopen
+ resolve the registry does anyway (bench/bare.py), so the share of a load is
the claim. Both are measured in the thread's CPU time (time.thread_time), which
another job on the machine does not inflate. The libraries: the sample (csrc/samples/sample.c), bench's
funcs1000 (1,000 functions) and large (20 MB), and, when this machine has
them, the system's zlib, SQLite and libstdc++ (checked only: not loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import nativereload  # noqa: F401
except ImportError:
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from nativereload import elfcheck  # noqa: E402

import libs  # noqa: E402
from bare import BareLoader  # noqa: E402
from timing import Stat, calibrate  # noqa: E402

SYSTEM = {"libz.so.1": "zlib (system)", "libsqlite3.so.0": "SQLite (system)", "libstdc++.so.6": "libstdc++ (system)"}


def time_check(path: Path, repeats: int = 7, block: float = 0.05) -> Stat:
    """µs per check, in this thread's CPU time: steady on a machine other jobs share (the check never waits)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        timer = timeit.Timer("check_fd(fd)", globals={"check_fd": elfcheck.check_fd, "fd": fd}, timer=time.thread_time)
        number = calibrate(timer, block)
        return Stat.of([timer.timeit(number) / number * 1e6 for _ in range(repeats)])
    finally:
        os.close(fd)


def time_bare(path: Path, cdef: str, symbols: list[str], directory: Path, samples: int = 60) -> Stat:
    """µs per copy + dlopen + resolve, in this thread's CPU time (the kernel's share of copying included)."""
    loader = BareLoader(cdef, symbols, str(directory))
    values = []
    for _ in range(samples):
        started = time.thread_time()
        lib, _functions, copy = loader.load(str(path))
        values.append((time.thread_time() - started) * 1e6)
        lib.close_lib()
        os.unlink(copy)
    return Stat.of(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nativereload-bench-elf-"))
    rows = []
    try:
        sample = libs.compile_shared(libs.SAMPLE_SOURCE, work / "sample.so")
        funcs = libs.build_funcs_library(work, 1000)
        large = libs.build_table_library(work, "large", 20 << 20)
        cases = [("sample", sample, libs.SAMPLE_CDEF, ["add", "dot4", "sum_bytes"]),
                 ("funcs1000 (1,000 functions)", funcs, libs.funcs_cdef(1000), [f"f{i}" for i in range(1000)]),
                 ("large (20 MB)", large, "".join(f"long f{i}(long);" for i in range(libs.TABLE_FUNCTIONS)),
                  [f"f{i}" for i in range(libs.TABLE_FUNCTIONS)])]
        copies = work / "copies"
        copies.mkdir()
        for name, path, cdef, symbols in cases:
            check = time_check(path)
            bare = time_bare(path, cdef, symbols, copies)
            rows.append({"library": name, "bytes": path.stat().st_size, "check_us": check.median,
                         "check_min_us": check.min, "bare_load_us": bare.median,
                         "share": check.median / (check.median + bare.median)})
        for directory in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
            for filename, label in SYSTEM.items():
                path = Path(directory) / filename
                if path.exists() and not any(row["library"] == label for row in rows):
                    check = time_check(path.resolve())
                    rows.append({"library": label, "bytes": path.resolve().stat().st_size, "check_us": check.median,
                                 "check_min_us": check.min, "bare_load_us": None, "share": None})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"ELF check (nativereload.elfcheck.check_fd), Python {platform.python_version()}, {platform.machine()}\n")
    print("| library | size | check, CPU (median) | check, CPU (min) | bare copy + dlopen + resolve, CPU | "
          "check's share of a load |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        bare = f"{row['bare_load_us']:,.0f} µs" if row["bare_load_us"] is not None else "—"
        share = f"{100 * row['share']:.0f} %" if row["share"] is not None else "—"
        print(f"| {row['library']} | {row['bytes'] / 1024:,.0f} KB | {row['check_us']:,.1f} µs | "
              f"{row['check_min_us']:,.1f} µs | {bare} | {share} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
