"""Callers during reloads (issue 4, §4): call latency of 2 calling threads, without and with a reloader.

Each caller times every call of ``add`` through one Func with
``perf_counter_ns`` around it, for ``seconds``; a third thread, in the
second run, reloads the same module as fast as it can. A caller's latency
includes waiting for the GIL when the call returns (cffi releases it around
the C call): with a reloader, that is the reloader's Python code, never its
copy or dlopen, which run with the GIL released. The reloader takes no lock
a caller waits on.
"""

from __future__ import annotations

import array
import threading
import time

from libs import SAMPLE_CDEF
from registries import make_registry, path_label
from timing import Stat, percentiles

CALLERS = 2


def _run(func, seconds: float, reload=None) -> tuple[array.array, int, int]:
    """(latencies in ns of every call, calls completed, reloads done)."""
    stop = threading.Event()
    start = threading.Barrier(CALLERS + 1 + (reload is not None))
    results = [array.array("q") for _ in range(CALLERS)]
    reloads = [0]

    def caller(out: array.array) -> None:
        clock = time.perf_counter_ns
        record = out.append
        start.wait()
        while not stop.is_set():
            started = clock()
            func(1, 2)
            record(clock() - started)

    def reloader() -> None:
        start.wait()
        while not stop.is_set():
            reload()
            reloads[0] += 1

    threads = [threading.Thread(target=caller, args=(out,)) for out in results]
    if reload is not None:
        threads.append(threading.Thread(target=reloader))
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    latencies = array.array("q")
    for out in results:
        latencies.extend(out)
    return latencies, len(latencies), reloads[0]


def callers_during_reloads(rows, *, gate: str, library_dir: str, tmpdir: str, seconds: float) -> dict:
    registry = make_registry(gate, library_dir, tmpdir)
    try:
        registry.load("sample", cdef=SAMPLE_CDEF)
        func = registry.func("sample.add")
        _run(func, min(0.2, seconds))                  # warm up
        quiet, quiet_calls, _ = _run(func, seconds)
        busy, busy_calls, reloads = _run(func, seconds, lambda: registry.reload("sample"))
        assert registry.wait_drained(10)
    finally:
        registry.close()
    results = {}
    for label, latencies, calls in (("without reloader", quiet, quiet_calls),
                                    (f"with reloader ({reloads:,} reloads in {seconds:g} s)", busy, busy_calls)):
        p50, p99, high = percentiles(latencies, (50, 99, 100))
        results[label] = (p50, p99, high, calls)
    (q50, q99, qmax, _), (b50, b99, bmax, _) = results.values()
    section = "4 callers during reloads"
    for index, (label, (p50, p99, high, calls)) in enumerate(results.items()):
        key = "busy" if index else "quiet"
        extra = {"p50_ns": p50, "p99_ns": p99, "max_ns": high, "calls": calls,
                 "calls_per_s": calls / seconds}
        if index:
            extra["reloads"] = reloads
        rows.add(section, f"{CALLERS} callers, {path_label(gate)}, {label}: p50 / p99 / max", "ns",
                 Stat(p50, p50, high, calls), ratio=p99 / q99 if index else 1.0, ratio_of="p99 without reloader",
                 key=f"contention.{gate}.{key}", extra=extra,
                 text=f"{p50 / 1e3:.2f} / {p99 / 1e3:.2f} / {high / 1e3:.0f} us, {calls / seconds / 1e6:.2f} M calls/s")
    return {"p99_ratio": b99 / q99, "p50_ratio": b50 / q50, "max_busy_ns": bmax, "max_quiet_ns": qmax}
