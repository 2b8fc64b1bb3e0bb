"""``nativereload demo``: a live reload under load, from a plain ``pip install``.

Builds the demo module (``data/demo.c``, shipped in the package) into a
temporary directory -- with CMake and the package's own CMake helper when
CMake is installed, else with ``$CC`` or ``cc`` -- loads it, starts threads
calling it continuously, rebuilds it with another version while they run,
reloads it with one call held inside the old image, and reports: calls
served, calls failed (must be 0), the generation, and whether the old image
drained. Returns True when every call succeeded and the old image drained.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from .errors import DemoError

__all__ = ["DemoError", "compile_demo", "run"]

DATA = Path(__file__).resolve().parent / "data"
CDEF = "int version(void); long work(long); int hold(int); int holding(void);"
HOLD_MS = 600


def compile_demo(workdir: Path, version: int, log: IO[str]) -> tuple[Path, str]:
    """Build demo.so with ``DEMO_VERSION=version`` into ``workdir/modules``; return (path, how).

    The file appears by rename, complete: the same guarantee nativereload_add_module gives.
    """
    modules = workdir / "modules"
    target = modules / "demo.so"
    cmake = shutil.which("cmake")
    if cmake:
        from .build import cmake_dir

        build_dir = workdir / "build"
        configure = [cmake, "-S", str(DATA), "-B", str(build_dir), f"-DDEMO_VERSION={version}",
                     "-DCMAKE_BUILD_TYPE=Release", f"-Dnativereload_DIR={cmake_dir()}"]
        if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
            configure[1:1] = ["-G", "Ninja"]
        steps = [configure, [cmake, "--build", str(build_dir)]]
        how = "CMake"
        # nativereload_add_module writes to <build>/modules; move it where we load from.
        built = build_dir / "modules" / "demo.so"
    else:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if not cc:
            raise DemoError("no C compiler found (neither cmake nor cc is installed)",
                            hint="install a C compiler (apt-get install gcc) or CMake, then run the demo again")
        modules.mkdir(parents=True, exist_ok=True)
        built = modules / f"demo.so.v{version}"
        steps = [[cc, "-shared", "-fPIC", "-O2", "-Wl,-Bsymbolic", f"-DDEMO_VERSION={version}",
                  str(DATA / "demo.c"), "-o", str(built)]]
        how = os.path.basename(cc)
    for cmd in steps:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            log.write(proc.stdout)
            raise DemoError(f"building the demo module failed ({os.path.basename(cmd[0])} exit status "
                            f"{proc.returncode}); its output is above",
                            hint="check that a working C compiler is installed")
    modules.mkdir(parents=True, exist_ok=True)
    # Copy then rename: a loaded library is never overwritten in place.
    partial = target.with_name("demo.so.partial")
    shutil.copyfile(built, partial)
    os.replace(partial, target)
    return target, how


def run(threads: int = 4, seconds: float = 1.0, out: IO[str] | None = None) -> dict:
    """Run the demo, printing a live report to ``out`` (stdout); return the report.

    The report (``nativereload demo --json``): ``ok`` (every call served,
    the old image drained), ``calls_served``, ``calls_failed``,
    ``generation``, ``old_image_drained``, ``reload_ms``, ``seconds``.

    Raises:
        DemoError: the module could not be compiled.
    """
    from . import Registry
    from .output import arrow

    out = out or sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="nativereload-demo-"))
    try:
        t0 = time.perf_counter()
        path, how = compile_demo(workdir, 1, out)
        say(f"built demo.c version 1 with {how} in {time.perf_counter() - t0:.1f} s: {path}")
        with Registry(path=[path.parent]) as reg:
            mod = reg.load("demo", cdef=CDEF)
            work = mod.work
            served = {1: 0, 2: 0}
            failed = []
            stop = threading.Event()
            lock = threading.Lock()

            def caller(seed: int) -> None:
                mine = {1: 0, 2: 0}
                i = seed
                while not stop.is_set():
                    try:
                        version = work(i) % 10
                        mine[version] = mine.get(version, 0) + 1
                    except Exception as exc:  # a failed call is exactly what the demo must show never happens
                        with lock:
                            failed.append(repr(exc))
                    i += 1
                with lock:
                    for v, n in mine.items():
                        served[v] = served.get(v, 0) + n

            workers = [threading.Thread(target=caller, args=(n * 1000,), daemon=True) for n in range(threads)]
            for w in workers:
                w.start()
            say(f"loaded 'demo' generation {mod.generation}; {threads} threads calling demo.work() continuously")

            time.sleep(seconds / 2)
            t0 = time.perf_counter()
            compile_demo(workdir, 2, out)
            say(f"rebuilt demo.c as version 2 in {time.perf_counter() - t0:.1f} s while the calls went on")

            # One long call inside the old image across the reload: it must finish there.
            held: list[int] = []
            holder = threading.Thread(target=lambda: held.append(mod.hold(HOLD_MS)), daemon=True)
            holder.start()
            deadline = time.monotonic() + 5.0      # a started thread is not yet a call in flight
            while not mod.holding() and time.monotonic() < deadline:
                time.sleep(0.001)
            t0 = time.perf_counter()
            mod = reg.reload("demo")
            reload_ms = (time.perf_counter() - t0) * 1000
            reloaded_at = time.perf_counter()
            old = [i for m in reg.status() for i in m.images if i.generation == 1]
            old_state = f"{old[0].state}, {old[0].in_flight} call(s) in flight" if old else "closed"
            say(f"reloaded 'demo' generation 1 {arrow(out)} {mod.generation} in {reload_ms:.1f} ms; "
                f"old image: {old_state}")

            drained = reg.wait_drained(timeout=10.0)
            drain_s = time.perf_counter() - reloaded_at
            holder.join(timeout=5.0)
            time.sleep(seconds / 2)
            stop.set()
            for w in workers:
                w.join(timeout=5.0)
            generation = mod.generation

        total = sum(served.values())
        ok = not failed and drained and served.get(2, 0) > 0 and held == [1]
        say("")
        say("report")
        say(f"  calls served: {total} (version 1: {served.get(1, 0)}, version 2: {served.get(2, 0)})")
        say(f"  calls failed: {len(failed)}")
        say(f"  generation: {generation}")
        say(f"  held call: started on version 1, finished on version {held[0] if held else '?'} (it was inside "
            "the old image when the reload happened: calls in flight finish where they started)")
        say(f"  old image drained: {'yes' if drained else 'no'}"
            + (f" ({drain_s:.2f} s after the reload, when the held call returned)" if drained else ""))
        for message in failed[:5]:
            say(f"  failure: {message}")
        say(f"done in {time.perf_counter() - started:.1f} s "
            + ("- the process kept serving through the reload" if ok else "- SOMETHING WENT WRONG"))
        return {"ok": ok, "calls_served": total, "calls_failed": len(failed), "generation": generation,
                "old_image_drained": drained, "reload_ms": reload_ms, "seconds": time.perf_counter() - started}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
