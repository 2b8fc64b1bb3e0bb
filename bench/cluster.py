"""Cluster reloads (issue 10): nativereload.dask on LocalClusters of 1, 2, 4 and 8 worker processes.

    python bench/cluster.py                   # the full run (several minutes on 2 cores)
    python bench/cluster.py --quick           # a smoke run: fewer samples, 1 and 2 workers
    python bench/cluster.py --json FILE       # also write every figure

For each cluster size and module (small: ~50 KB; large: 20 MB), reloading two builds with different bytes
in turn, measured round-robin in the same loop:
  all-or-nothing  nativereload.dask.reload(): the module's lock, a round that sends the bytes and prepares,
                  a round that commits, the build published for workers that join later
  rolling         the same with mode="rolling", batch=1: one round (send, prepare + commit) per worker
  floor           what a cluster reload cannot avoid: ONE round of messages carrying the bytes, in which
                  each worker writes them to a file and reloads its module (Registry.reload) -- no lock,
                  no all-or-nothing, nothing published for late joiners
  send only       one round of messages carrying the bytes, doing nothing with them
and, for all-or-nothing, the commit window (the commit round, as the client sees it: the time during which
some workers serve the new build and some the old) and the commit spread (first to last commit by the
workers' clocks: one host, one clock). Then a least-squares line through the all-or-nothing times against
the number of workers, and its extrapolation (see README, "Cluster").

Every worker, the scheduler and this client share this machine's cores: with more workers than cores the
per-worker cost includes their contention, which a real cluster (one worker per core or per host) does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import nativereload  # noqa: F401  (the installed package)
except ImportError:
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import distributed  # noqa: E402

import libs  # noqa: E402
from nativereload import dask as nrdask  # noqa: E402

CDEF = libs.funcs_cdef(libs.TABLE_FUNCTIONS)
SETTINGS = {
    "quick": dict(workers=(1, 2), samples={"small": 3, "large": 2}, large_bytes=20_000_000),
    "full": dict(workers=(1, 2, 4, 8), samples={"small": 15, "large": 5}, large_bytes=20_000_000),
}


def _floor_reload(data: bytes, cdef: str, dask_worker=None) -> float:
    """On a worker: write the bytes to a file and reload the module from it, in a registry of its own."""
    import nativereload as nr

    started = time.perf_counter()
    registry = getattr(dask_worker, "_nativereload_bench", None)
    if registry is None:
        registry = dask_worker._nativereload_bench = nr.Registry(tmpdir=dask_worker.local_directory)
    path = os.path.join(dask_worker.local_directory, "bench.so")
    with open(path + ".partial", "wb") as out:
        out.write(data)
    os.replace(path + ".partial", path)
    if registry.status():
        registry.reload("bench", file=path)
    else:
        registry.load("bench", cdef, file=path)
    return time.perf_counter() - started


def _close_floor(dask_worker=None) -> None:
    registry = getattr(dask_worker, "_nativereload_bench", None)
    if registry is not None:
        registry.close()
        del dask_worker._nativereload_bench


def _send_only(data: bytes) -> int:
    return len(data)


def measure(n_workers: int, builds: dict[str, tuple[Path, Path]], samples: dict[str, int]) -> list[dict]:
    rows = []
    with distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        for size, (a, b) in builds.items():
            datas = [a.read_bytes(), b.read_bytes()]
            client.register_plugin(nrdask.NativeReload({"bench": a}, cdef={"bench": CDEF}, held_warning=None))
            times: dict[str, list[float]] = {"all-or-nothing": [], "rolling": [], "floor": [], "send only": []}
            windows, spreads, worker_reload = [], [], []
            turn = 0

            def aon() -> None:
                report = nrdask.reload(client, "bench", file=datas[turn % 2])
                times["all-or-nothing"].append(report.seconds)
                windows.append(report.commit_window)
                spreads.append(report.commit_spread)

            def rolling() -> None:
                report = nrdask.reload(client, "bench", file=datas[turn % 2], mode="rolling")
                times["rolling"].append(report.seconds)

            def floor() -> None:
                started = time.perf_counter()
                answers = client.run(_floor_reload, datas[turn % 2], CDEF)
                times["floor"].append(time.perf_counter() - started)
                worker_reload.append(statistics.median(answers.values()))

            def send() -> None:
                started = time.perf_counter()
                client.run(_send_only, datas[turn % 2])
                times["send only"].append(time.perf_counter() - started)

            operations = [aon, rolling, floor, send]
            floor()                  # the floor's first call loads; reloads are measured from here
            times["floor"].clear()
            worker_reload.clear()
            for sample in range(samples[size]):
                for op in operations[sample % 4:] + operations[:sample % 4]:
                    turn += 1
                    op()
            client.run(_close_floor)
            client.unregister_worker_plugin(nrdask.PLUGIN_NAME)
            floor_median = statistics.median(times["floor"])
            for variant, values in times.items():
                rows.append({"workers": n_workers, "module": size, "bytes": len(datas[0]), "variant": variant,
                             "median": statistics.median(values), "min": min(values), "max": max(values),
                             "n": len(values), "vs_floor": statistics.median(values) / floor_median})
            rows.append({"workers": n_workers, "module": size, "bytes": len(datas[0]), "variant": "commit window",
                         "median": statistics.median(windows), "min": min(windows), "max": max(windows),
                         "n": len(windows), "vs_floor": None})
            rows.append({"workers": n_workers, "module": size, "bytes": len(datas[0]), "variant": "commit spread",
                         "median": statistics.median(spreads), "min": min(spreads), "max": max(spreads),
                         "n": len(spreads), "vs_floor": None})
            rows.append({"workers": n_workers, "module": size, "bytes": len(datas[0]),
                         "variant": "one worker's write + reload (in the floor)",
                         "median": statistics.median(worker_reload), "min": min(worker_reload),
                         "max": max(worker_reload), "n": len(worker_reload), "vs_floor": None})
            print(f"  {n_workers} workers, {size}: all-or-nothing "
                  f"{statistics.median(times['all-or-nothing']) * 1e3:.1f} ms, floor {floor_median * 1e3:.1f} ms",
                  file=sys.stderr, flush=True)
    return rows


def fit(rows: list[dict], module: str, variant: str) -> tuple[float, float]:
    """Least-squares ``seconds = fixed + per_worker * workers`` through the medians."""
    points = [(r["workers"], r["median"]) for r in rows if r["module"] == module and r["variant"] == variant]
    if len(points) < 2:
        return points[0][1], 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer samples and workers")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    settings = SETTINGS["quick" if args.quick else "full"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nativereload-bench-cluster-") as tmp:
        directory = Path(tmp)
        print("building the libraries ...", file=sys.stderr, flush=True)
        builds = {
            "small": (libs.build_table_library(directory, "small_a", 40_000),
                      libs.build_table_library(directory, "small_b", 40_000)),
            "large": (libs.build_table_library(directory, "large_a", settings["large_bytes"]),
                      libs.build_table_library(directory, "large_b", settings["large_bytes"])),
        }
        rows = []
        for n in settings["workers"]:
            print(f"{n} worker(s) ...", file=sys.stderr, flush=True)
            rows += measure(n, builds, settings["samples"])
    sizes = {r["module"]: r["bytes"] for r in rows}
    print(f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
          f"distributed {distributed.__version__}; load average {os.getloadavg()[0]:.1f}; "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| workers | module | variant | median | min | max | vs floor |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['vs_floor']:.2f}×" if r["vs_floor"] is not None else ""
        print(f"| {r['workers']} | {r['module']} ({sizes[r['module']] / 1e3:,.0f} KB) | {r['variant']} | "
              f"{_ms(r['median'])} | {_ms(r['min'])} | {_ms(r['max'])} | {ratio} |")
    print("\nLeast squares, all-or-nothing seconds = fixed + per-worker × workers:")
    fits = {}
    for module in builds:
        for variant in ("all-or-nothing", "rolling", "floor", "send only"):
            fixed, per_worker = fit(rows, module, variant)
            fits[f"{module}.{variant}"] = {"fixed": fixed, "per_worker": per_worker}
            print(f"  {module:5} {variant:15} fixed {_ms(fixed):>10}  per worker {_ms(per_worker):>10}  "
                  f"-> 100 workers {_ms(fixed + 100 * per_worker):>10}, 1,000 workers "
                  f"{_ms(fixed + 1000 * per_worker):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "fits": fits}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
