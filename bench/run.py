"""nativereload benchmark suite (issue 4): call overhead, reload latency, scaling, callers during reloads, memory.

    python bench/run.py            # the full run (about 2-3 minutes on 2 cores)
    python bench/run.py --quick    # a smoke run, under 60 s
    python bench/run.py --json results.json

Prints one Markdown table (and the targets, met or missed) on stdout;
progress goes to stderr. Every figure is measured in this run next to its
baseline; ratios are the claim, absolute times describe this machine.
Compiles its C libraries into a temporary directory, which it removes.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import nativereload  # noqa: F401  (the installed package: it has the compiled C gate)
except ImportError:       # not installed: use the source tree (the Python gate only, unless built in place)
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import cffi  # noqa: E402

import calls  # noqa: E402
import contention  # noqa: E402
import interface  # noqa: E402
import libs  # noqa: E402
import lifecycle  # noqa: E402
import objects  # noqa: E402
import reloads  # noqa: E402
from registries import available_gates  # noqa: E402
from timing import Stat  # noqa: E402

FUNCS = (10, 100, 1000)

SETTINGS = {
    # call repeats / timeit block (s) / reload samples per library / 20 MB reload samples /
    # reloads before the second call measurement / seconds per contention run / RSS reload cycles
    "quick": dict(call_repeats=7, block=0.01, reload_samples=150, large_samples=8, funcs_samples=60,
                  drift_reloads=1000, contention_seconds=1.0, rss_cycles=10_000, exclusive_reloads=30,
                  canary_samples=3),
    "full": dict(call_repeats=25, block=0.04, reload_samples=1000, large_samples=40, funcs_samples=300,
                 drift_reloads=1000, contention_seconds=5.0, rss_cycles=10_000, exclusive_reloads=200,
                 canary_samples=10),
}
OTHER_MODULES = 49


class Rows:
    """The result table: one row per figure, in the order measured."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, section: str, case: str, unit: str, stat: Stat, *, ratio: float | None = None,
            ratio_of: str | None = None, key: str, extra: dict | None = None, text: str | None = None) -> None:
        row = {"key": key, "section": section, "case": case, "unit": unit, "median": stat.median,
               "min": stat.min, "max": stat.max, "samples": stat.n, "ratio": ratio, "ratio_of": ratio_of}
        if extra:
            row.update(extra)
        if text:
            row["text"] = text
        self.rows.append(row)
        progress(f"  {case}: {text or _fmt(stat.median, unit)}" + (f"  ({ratio:.3f}x {ratio_of})" if ratio else ""))

    def get(self, key: str) -> dict | None:
        return next((row for row in self.rows if row["key"] == key), None)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fmt(value: float, unit: str) -> str:
    if unit == "ns":
        return f"{value:,.0f} ns" if value >= 100 else f"{value:.1f} ns"
    if unit == "us":
        return f"{value:,.0f} µs" if value >= 1000 else f"{value:.1f} µs"
    return f"{value:.2f} {unit}"


def table(rows: Rows) -> str:
    lines = ["| case | median | min | max | ratio |", "|---|---:|---:|---:|---|"]
    section = None
    for row in rows.rows:
        if row["section"] != section:
            section = row["section"]
            lines.append(f"| **{section}** | | | | |")
        if "p99_ns" in row:
            cells = [f"p50 {_fmt(row['p50_ns'], 'ns')}", f"p99 {_fmt(row['p99_ns'], 'ns')}",
                     f"max {_fmt(row['max_ns'], 'ns')}"]
            case = f"{row['case'].rsplit(':', 1)[0]}; {row['calls_per_s'] / 1e6:.2f} M calls/s"
        elif row["samples"] == 1:
            cells = [_fmt(row["median"], row["unit"]), "", ""]
            case = row["case"]
        else:
            cells = [_fmt(row[field], row["unit"]) for field in ("median", "min", "max")]
            case = row["case"]
        ratio = ""
        if row["ratio"] is not None and row["ratio_of"]:
            ratio = f"{row['ratio']:.2f}× {row['ratio_of']}"
            if "ratio_to_bare_with_close" in row:
                ratio += f" ({row['ratio_to_bare_with_close']:.2f}× bare incl. close)"
        lines.append(f"| {case} | {' | '.join(cells)} | {ratio} |")
    return "\n".join(lines)


def targets(rows: Rows, gates: list[str], contention_ratios: dict, object_ratios: dict,
            lifecycle_figures: dict) -> list[dict]:
    """The issue's targets, each with the measured figure and whether it was met.

    "Linear in file size" and "flat" have no number in the issue; we read
    them with the same 10 % tolerance as the d/a target: the per-MB cost of a
    reload (small -> large module) within 1.10x the per-MB cost of the bare
    copy + dlopen + resolve + dlclose + unlink, and the reload/bare or Func/cffi
    ratio with 50 modules loaded (or after 1,000 reloads) within 1.10x the
    same ratio with 1 module (fresh).
    """
    results = []

    def target(name: str, measured: float | None, limit: float, fmt: str, note: str = "") -> None:
        if measured is None:
            return
        results.append({"target": name, "measured": measured, "limit": limit, "met": measured <= limit,
                         "text": fmt.format(measured), "note": note})

    def ratio(key: str) -> float | None:
        return (rows.get(key) or {}).get("ratio")

    gate = gates[0]
    python_ratio = ratio("call.add.d_python")
    target(f"d/a ≤ 1.10 ({gate} gate)", ratio(f"call.add.d_{gate}"), 1.10, "{:.3f}",
           f"Python gate: {python_ratio:.3f}" if python_ratio else "")
    target("small reload ≤ 1.5× bare", ratio(f"reload.{gate}.small"), 1.5, "{:.2f}×")
    target("large reload ≤ 1.1× bare", ratio(f"reload.{gate}.large"), 1.1, "{:.2f}×")
    small, large = rows.get(f"reload.{gate}.small"), rows.get(f"reload.{gate}.large")
    if small and large:
        megabytes = (large["bytes"] - small["bytes"]) / 1e6
        reload_slope = (large["median"] - small["median"]) / megabytes
        bare_slope = (large["bare_with_close_us"] - small["bare_with_close_us"]) / megabytes
        target("reload time linear in file size (per-MB cost ≤ 1.1× bare's)", reload_slope / bare_slope, 1.1,
               "{:.2f}×", f"{reload_slope:.0f} µs/MB vs bare load + close {bare_slope:.0f} µs/MB")
    one, many = ratio(f"reload.{gate}.small.1module"), ratio(f"reload.{gate}.small.modules")
    if one and many:
        target("reload time flat in other modules (50 vs 1, reload/bare)", many / one, 1.1, "{:.2f}×",
               f"{one:.2f}× bare with 1 module, {many:.2f}× with 50")
    for other, label in (("reloaded", "after 1,000 reloads"), ("modules", "with 50 modules")):
        fresh, after = ratio(f"flat.{gate}.fresh"), ratio(f"flat.{gate}.{other}")
        if fresh and after:
            target(f"call cost flat {label} (Func/cffi vs fresh)", after / fresh, 1.1, "{:.2f}×",
                   f"d/a {fresh:.3f} fresh, {after:.3f} {label}")
    if gate in contention_ratios:
        target("p99 with reloader ≤ 1.5× without", contention_ratios[gate]["p99_ratio"], 1.5, "{:.2f}×",
               f"max {contention_ratios[gate]['max_busy_ns'] / 1e3:,.0f} µs with, "
               f"{contention_ratios[gate]['max_quiet_ns'] / 1e3:,.0f} µs without")
    if gate in object_ratios:
        measured = object_ratios[gate]
        target(f"call with no pointer ≤ 1.10× plain cffi ({gate} gate)", measured["plain"], 1.10, "{:.2f}×")
        target(f"call through a pin ≤ 1.05× plain cffi ({gate} gate)", measured["pin"], 1.05, "{:.2f}×")
        target(f"call with a bound handle ≤ 1.3× plain cffi ({gate} gate)", measured["handle"], 1.3, "{:.2f}×")
        target(f"call returning a pointer ≤ 1.5× plain cffi ({gate} gate)", measured["pointer"], 1.5, "{:.2f}×")
    interface_ratios = lifecycle_figures.get("interface", {})
    if 100 in interface_ratios:
        target("reload with its interface checked ≤ 1.2× without (100 functions)", interface_ratios[100], 1.2,
               "{:.2f}×", f"10 functions: {interface_ratios.get(10, 0):.2f}×")
    if "canary_ms" in lifecycle_figures:
        target("canary < 150 ms", lifecycle_figures["canary_ms"], 150, "{:.0f} ms")
    growth = rows.get(f"rss.{gate}.growth")
    target("RSS growth < 5 MB over 10,000 reloads", growth and growth["median"] * (1 << 20) / 1e6, 5.0,
           "{:.2f} MB")
    return results


def target_rows(results: list[dict]) -> str:
    """The targets as the last section of the table: measured figure, then met/MISSED and the detail."""
    lines = ["| **targets** | | | | |"]
    for result in results:
        note = f" ({result['note']})" if result["note"] else ""
        lines.append(f"| {result['target']} | {result['text']} | | | {'met' if result['met'] else 'MISSED'}{note} |")
    return "\n".join(lines)


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "cffi": cffi.__version__,
            "platform": platform.platform(), "gates": available_gates()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (under 60 s)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    started = time.perf_counter()
    info = machine()
    progress(f"nativereload benchmark ({mode}): {info['cpu']}, {info['nproc']} CPUs, Python {info['python']}, "
             f"cffi {info['cffi']}, gates: {', '.join(info['gates'])}")
    gates = available_gates()
    rows = Rows()
    contention_ratios = {}
    object_ratios: dict = {}
    lifecycle_figures: dict = {}
    work = Path(tempfile.mkdtemp(prefix="nativereload-bench-"))
    try:
        progress("building libraries")
        library_dir = work / "modules"
        library_dir.mkdir()
        libraries = libs.build_all(library_dir, large_bytes=20_000_000, funcs=FUNCS)
        _, api_lib = libs.build_api_module(work)
        copies = work / "copies"
        copies.mkdir()
        common = dict(library_dir=str(library_dir), tmpdir=str(copies))

        progress("1 call overhead")
        calls.overhead(rows, library=str(libraries["sample"]), api_lib=api_lib,
                       repeats=settings["call_repeats"], block_seconds=settings["block"], **common)
        progress("2 reload latency")
        reloads.latency(rows, gate=gates[0], libraries=libraries,
                        repeats={"small": settings["reload_samples"], "large": settings["large_samples"]},
                        others=0, **common)
        progress("3 scaling")
        reloads.latency(rows, gate=gates[0], libraries=libraries,
                        repeats={f"funcs{n}": settings["funcs_samples"] for n in FUNCS}
                        | {"small": settings["reload_samples"]},
                        others=OTHER_MODULES, section="3 scaling: reloads", **common)
        calls.flatness(rows, library=str(libraries["sample"]), reloads=settings["drift_reloads"],
                       others=OTHER_MODULES, repeats=settings["call_repeats"], block_seconds=settings["block"],
                       **common)
        progress("4 callers during reloads")
        for gate in gates:
            contention_ratios[gate] = contention.callers_during_reloads(
                rows, gate=gate, seconds=settings["contention_seconds"], **common)
        progress("5 memory")
        reloads.memory(rows, gate=gates[0], libraries=libraries, cycles=settings["rss_cycles"], warmup=200,
                       **common)
        progress("6 objects across reloads")
        object_ratios = objects.per_call(rows, objects=str(libraries["objects"]), sample=str(libraries["sample"]),
                                         repeats=settings["call_repeats"], block_seconds=settings["block"],
                                         **common)
        progress("7 interface check")
        interface_dir = work / "interface"
        interface_dir.mkdir()
        lifecycle_figures["interface"] = interface.per_reload(rows, directory=interface_dir, tmpdir=str(copies),
                                                              repeats=settings["funcs_samples"])
        progress("8 lifecycle")
        lifecycle.build(library_dir)
        lifecycle.exclusive_wait(rows, gate=gates[0], reloads=settings["exclusive_reloads"], **common)
        lifecycle_figures["canary_ms"] = lifecycle.canary_cost(rows, gate=gates[0],
                                                               samples=settings["canary_samples"], **common)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    met = targets(rows, gates, contention_ratios, object_ratios, lifecycle_figures)
    elapsed = time.perf_counter() - started

    command = "python bench/run.py" + (" --quick" if args.quick else "")
    print(f"nativereload benchmark — `{command}` — {info['cpu']}, {info['nproc']} CPUs, "
          f"Python {info['python']}, cffi {info['cffi']}, {elapsed:.0f} s\n")
    print(table(rows))
    print(target_rows(met))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"command": command, "mode": mode, "seconds": elapsed, "machine": info,
                       "settings": settings, "rows": rows.rows, "targets": met}, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
