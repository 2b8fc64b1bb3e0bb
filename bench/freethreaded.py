"""Calls per second with 1, 2 and 4 threads: plain cffi, the C gate and the compiled path (issue 12).

For a free-threaded CPython (``python3.13t``/``3.14t`` with the GIL off):

    PYTHON_GIL=0 python bench/freethreaded.py [--seconds 2] [--json FILE]

Each thread calls ``add(1, 2)`` through its variant in a loop for the
measured time (all threads of one run start together at a barrier); the
figure is the calls all threads completed per second. The variants of one
thread count are measured round-robin, ``--rounds`` times, and the median is
reported. With the GIL on, threads cannot run Python in parallel and the
figures show that (the script says which it ran with).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cffi  # noqa: E402

import libs  # noqa: E402
from registries import available_gates, make_registry  # noqa: E402


THREADS = (1, 2, 4)


def rate(function, threads: int, seconds: float) -> float:
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)
    counts = [0] * threads

    def worker(index: int) -> None:
        f = function
        n = 0
        barrier.wait()
        while not stop.is_set():
            for _ in range(1000):
                f(1, 2)
            n += 1000
        counts[index] = n

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def measure(work: Path, seconds: float, rounds: int) -> dict[str, dict[int, float]]:
    """variant -> threads -> calls/s (median of ``rounds``), variants round-robin per thread count."""
    library = libs.compile_shared(libs.SAMPLE_SOURCE, work / "sample.so")
    ffi = cffi.FFI()
    ffi.cdef(libs.SAMPLE_CDEF)
    plain = ffi.dlopen(str(library))
    variants = {"plain cffi": plain.add}
    registries = []
    try:
        for gate in available_gates():
            if gate == "python":
                continue
            registry = make_registry(gate, str(work), str(work))
            registries.append(registry)
            registry.load("sample", cdef=libs.SAMPLE_CDEF)
            variants["C gate" if gate == "c" else "compiled path"] = registry.func("sample.add")
        results: dict[str, dict[int, float]] = {name: {} for name in variants}
        for threads in THREADS:
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, function in variants.items():
                    samples[name].append(rate(function, threads, seconds))
            for name in variants:
                results[name][threads] = statistics.median(samples[name])
    finally:
        for registry in registries:
            registry.close()
    return results


def add_rows(rows, results: dict[str, dict[int, float]]) -> None:
    """bench/run.py's section 8 (run on a free-threaded build only)."""
    from timing import Stat

    base = results["plain cffi"][1]
    for name, by_threads in results.items():
        for threads in THREADS:
            value = by_threads[threads] / 1e6
            rows.add("8 free-threaded calls", f"add() {name}, {threads} thread{'s' * (threads != 1)}", "M calls/s",
                     Stat(value, value, value, 1), ratio=by_threads[threads] / by_threads[1],
                     ratio_of="1 thread" + (f"; 1 thread costs {base / by_threads[1]:.2f}× plain cffi"
                                            if threads == 1 else ""),
                     key=f"ft.{name.split()[0].lower()}.{threads}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    work = Path(tempfile.mkdtemp(prefix="nativereload-ft-"))
    os.environ.setdefault("NATIVERELOAD_CACHE_DIR", str(work / "cache"))
    try:
        results = measure(work, args.seconds, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Python {sys.version.split()[0]} ({'GIL on' if gil else 'free-threaded, GIL off'}), "
          f"{os.cpu_count()} CPUs, cffi {cffi.__version__}; M calls/s (median of {args.rounds})\n")
    print("| variant | 1 thread | 2 threads | 4 threads | 2 / 1 | 1 thread vs plain cffi |")
    print("|---|---:|---:|---:|---:|---:|")
    base = results["plain cffi"][1]
    for name, by_threads in results.items():
        print(f"| {name} | {by_threads[1] / 1e6:.2f} | {by_threads[2] / 1e6:.2f} | {by_threads[4] / 1e6:.2f} | "
              f"{by_threads[2] / by_threads[1]:.2f}× | {base / by_threads[1]:.2f}× |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"python": sys.version, "gil": gil, "cffi": cffi.__version__, "results": results}, out,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
