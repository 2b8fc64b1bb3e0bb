"""Where a reload's time goes: reg.reload() of the small and the large library, phase by phase.

    python bench/profile_reload.py [--reloads N]

Wraps the registry's internal steps (private names of nativereload.image,
nativereload.registry and their helpers: this script follows them, it is not part of the
public API) with timers, reloads each library N times with no call in
flight, and prints the mean time per reload of each step, next to the bare
copy + dlopen + resolve and dlclose + unlink (bare.py). Nested steps are
included in their parents (Image.load contains Image._copy ...). The timers
add about 1 µs per wrapped call.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import libs  # noqa: E402
from bare import BareLoader  # noqa: E402

import nativereload  # noqa: E402
from nativereload import contract, elfcheck, image, lifecycle, registry, trust, workdir  # noqa: E402

totals: dict[str, float] = collections.defaultdict(float)
counts: collections.Counter = collections.Counter()


def _wrap(owner, attribute: str, label: str) -> None:
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started
            counts[label] += 1

    setattr(owner, attribute, timed)


def instrument() -> None:
    for name in ("copy", "_copy", "read_interface", "open", "_dlopen", "_resolve", "retire", "close", "_unmap",
                 "read_original"):
        _wrap(image.Image, name, f"Image.{name}")
    _wrap(image.tempfile, "mkstemp", "  tempfile.mkstemp()")
    _wrap(image.os, "sendfile", "  os.sendfile()")
    _wrap(image.os, "unlink", "  os.unlink()")
    _wrap(elfcheck, "check_fd", "  elfcheck.check_fd()")
    _wrap(image.dynamic, "make_soname_private", "  dynamic.make_soname_private()")
    _wrap(trust.Trust, "check_source", "  Trust.check_source()")
    _wrap(image.logger, "info", "  logger.info()")
    _wrap(contract, "declarations_for", "contract.declarations_for()")
    _wrap(workdir.Workdirs, "current", "Workdirs.current()")
    _wrap(lifecycle.History, "keep", "History.keep() (rollback: the old build read)")
    _wrap(registry.Registry, "_image_closed", "Registry._image_closed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=500, help="reloads of the small library (large: /20)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nativereload-profile-"))
    try:
        libraries = libs.build_all(work, large_bytes=20_000_000, funcs=())
        instrument()
        cdef = libs.funcs_cdef(libs.TABLE_FUNCTIONS)
        symbols = [f"f{i}" for i in range(libs.TABLE_FUNCTIONS)]
        with nativereload.Registry(path=[str(work)], tmpdir=str(work)) as reg:
            for name, count in (("small", args.reloads), ("large", max(5, args.reloads // 20))):
                reg.load(name, cdef=cdef)
                for _ in range(10):
                    reg.reload(name)
                totals.clear()
                counts.clear()
                gc.collect()
                gc.disable()
                started = time.perf_counter()
                for _ in range(count):
                    reg.reload(name)
                total = (time.perf_counter() - started) / count
                gc.enable()
                steps = sorted(totals.items(), key=lambda item: -item[1])   # before the bare loop adds to them
                calls = dict(counts)
                bare = BareLoader(cdef, symbols, str(work))
                gc.disable()
                loads, closes = [], []
                previous = bare.load(str(libraries[name]))
                for _ in range(count):
                    started = time.perf_counter()
                    current = bare.load(str(libraries[name]))
                    loads.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    bare.close(previous)
                    closes.append(time.perf_counter() - started)
                    previous = current
                bare.close(previous)
                gc.enable()
                print(f"{name}: reg.reload() {total * 1e6:,.1f} µs mean over {count} reloads; bare copy+dlopen+"
                      f"resolve {statistics.mean(loads) * 1e6:,.1f} µs, bare dlclose+unlink "
                      f"{statistics.mean(closes) * 1e6:,.1f} µs (means)")
                for label, seconds in steps:
                    print(f"    {label:44s} {seconds / count * 1e6:10,.1f} µs   x{calls[label] / count:g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
