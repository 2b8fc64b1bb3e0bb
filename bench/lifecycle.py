"""Lifecycle (issue 9): how long callers wait in an exclusive reload of an idle module, and what a canary costs.

Exclusive reload: one thread calls a cheap function in a loop (the module is
otherwise idle: no call is long) and records how long each call takes, while
the main thread reloads with ``exclusive=True``: new calls wait while the old
image's calls finish and init runs, then go on to the new image. Reported:
the reload's own time, and the slowest call of each reload window (the wait a
caller saw), against the same with an ordinary reload.

Canary: ``reload(canary=True)`` against ``reload()`` of the same small module:
the difference is the canary process (an interpreter start-up, importing
nativereload, loading the file, init, selftest).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

from libs import compile_shared
from registries import make_registry
from timing import Stat

ROOT = Path(__file__).resolve().parent.parent
LIFECYCLE_CDEF = "int lifecycle_version(void); long lifecycle_next(void);"


def build(directory: Path) -> Path:
    """csrc/samples/lifecycle.c (init/fini hooks, a selftest) as lifecycle.so."""
    import subprocess

    from libs import compiler

    output = directory / "lifecycle.so"
    subprocess.run([compiler(), "-shared", "-fPIC", "-O2", f"-I{ROOT / 'nativereload' / 'include'}",
                    str(ROOT / "csrc" / "samples" / "lifecycle.c"), "-o", str(output)], check=True,
                   capture_output=True, text=True)
    return output


def exclusive_wait(rows, *, gate: str, library_dir: str, tmpdir: str, reloads: int) -> dict:
    """Section 8: caller waits during exclusive and ordinary reloads; returns the medians for the summary."""
    registry = make_registry(gate, library_dir, tmpdir)
    results = {}
    try:
        module = registry.load("lifecycle", cdef=LIFECYCLE_CDEF)
        version = module.func("lifecycle_version")
        for exclusive in (False, True):
            window_max: list[float] = []
            reload_us: list[float] = []
            current = [0.0]
            stop = threading.Event()
            lock = threading.Lock()

            def caller() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    version()
                    took = time.perf_counter() - started
                    with lock:
                        if took > current[0]:
                            current[0] = took

            thread = threading.Thread(target=caller, daemon=True)
            thread.start()
            time.sleep(0.05)
            for _ in range(reloads):
                with lock:
                    current[0] = 0.0
                started = time.perf_counter()
                registry.reload("lifecycle", exclusive=exclusive)
                reload_us.append((time.perf_counter() - started) * 1e6)
                time.sleep(0.002)        # let calls that waited finish inside this window
                with lock:
                    window_max.append(current[0] * 1e6)
            stop.set()
            thread.join(10)
            kind = "exclusive" if exclusive else "ordinary"
            rows.add("8 lifecycle", f"{kind} reload of an idle module, {gate} gate: reload time", "us",
                     Stat.of(reload_us), key=f"lifecycle.{gate}.{kind}.reload")
            rows.add("8 lifecycle", f"{kind} reload, {gate} gate: slowest call during each reload (caller wait)",
                     "us", Stat.of(window_max), key=f"lifecycle.{gate}.{kind}.wait")
            results[kind] = (statistics.median(reload_us), statistics.median(window_max))
    finally:
        registry.close()
    return results


def canary_cost(rows, *, gate: str, library_dir: str, tmpdir: str, samples: int) -> float:
    """reload(canary=True) - reload(), median over ``samples``; returns the canary's cost in ms."""
    registry = make_registry(gate, library_dir, tmpdir)
    try:
        registry.load("lifecycle", cdef=LIFECYCLE_CDEF)
        plain, canary = [], []
        for _ in range(samples):
            started = time.perf_counter()
            registry.reload("lifecycle")
            plain.append((time.perf_counter() - started) * 1e3)
            started = time.perf_counter()
            registry.reload("lifecycle", canary=True)
            canary.append((time.perf_counter() - started) * 1e3)
        cost = [c - p for c, p in zip(canary, plain)]
        rows.add("8 lifecycle", "reload(canary=True) of a small module", "ms", Stat.of(canary),
                 key="lifecycle.canary.reload")
        rows.add("8 lifecycle", "the canary's share (canary reload - plain reload)", "ms", Stat.of(cost),
                 key="lifecycle.canary.cost")
        return statistics.median(cost)
    finally:
        registry.close()


__all__ = ["build", "canary_cost", "compile_shared", "exclusive_wait"]
