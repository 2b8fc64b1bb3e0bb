"""Timing primitives for the benchmark: interleaved timeit blocks, per-operation samples, percentiles, RSS.

Every figure is a list of samples; ``Stat`` reduces it to median, min and
max. Variants that are compared with each other are measured round-robin in
the same loop (and in a rotating order), so that a frequency change, another
process or a cache effect hits all of them alike: their ratio is the claim,
the absolute times are what this machine did.
"""

from __future__ import annotations

import gc
import statistics
import time
import timeit
from typing import Any, Callable, NamedTuple


class Stat(NamedTuple):
    """Median, min and max of a list of samples (one unit, e.g. ns or µs)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> "Stat":
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


def calibrate(timer: timeit.Timer, block_seconds: float) -> int:
    """How many loops of ``timer`` fill about ``block_seconds``."""
    number = 1
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= block_seconds / 4:
            return max(1, int(number * block_seconds / elapsed))
        number *= 4


def compare_calls(statements: dict[str, tuple[str, dict[str, Any]]], repeats: int,
                  block_seconds: float) -> dict[str, Stat]:
    """ns per execution of each statement, as Stat over ``repeats`` interleaved timeit blocks.

    Args:
        statements: name -> (statement, globals). Each block runs one
            statement ``number`` times (timeit: gc off, loop overhead included
            alike in every variant).
    """
    timers = {name: timeit.Timer(stmt, globals=namespace) for name, (stmt, namespace) in statements.items()}
    numbers = {name: calibrate(timer, block_seconds) for name, timer in timers.items()}
    samples: dict[str, list[float]] = {name: [] for name in timers}
    names = list(timers)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            number = numbers[name]
            samples[name].append(timers[name].timeit(number) / number * 1e9)
    return {name: Stat.of(values) for name, values in samples.items()}


def compare_ops(operations: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Stat]:
    """µs per call of each operation, one sample per call, the operations run round-robin.

    gc is collected before and disabled during the run, as timeit does, so a
    collection does not land in one operation's samples by chance.
    """
    samples: dict[str, list[float]] = {name: [] for name in operations}
    clock = time.perf_counter
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, operation in operations.items():
                started = clock()
                operation()
                samples[name].append((clock() - started) * 1e6)
    finally:
        if enabled:
            gc.enable()
    return {name: Stat.of(values) for name, values in samples.items()}


def percentiles(samples, points: tuple[float, ...]) -> list[float]:
    """The given percentiles (0-100) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    last = len(ordered) - 1
    return [ordered[min(last, max(0, round(point / 100 * last)))] for point in points]


def rss_bytes() -> int:
    """This process's resident set size now (Linux: VmRSS from /proc/self/status)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")
