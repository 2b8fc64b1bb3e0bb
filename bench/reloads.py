"""Reload latency, its scaling, and memory over many reloads (issue 4, §2, §3 and §5).

Each reload figure is measured round-robin with the bare work (bare.py) in
the same loop: ``reg.reload(name)`` with no call in flight (so it also
closes the old image, synchronously), then a bare copy + dlopen + resolve,
then a bare dlclose + unlink of the previous bare image. The issue's ratio
is reload / (copy + dlopen + resolve); the ratio to bare load + close, the
same work the reload does, is reported next to it.
"""

from __future__ import annotations

import gc
import os
import tempfile

from bare import BareLoader
from libs import SAMPLE_CDEF, funcs_cdef
from registries import make_registry
from timing import Stat, compare_ops, rss_bytes


def _symbols(cdef: str) -> list[str]:
    return [line.split("(")[0].split()[-1].lstrip("*") for line in cdef.strip().splitlines()]


def latency(rows, *, gate: str, libraries: dict, library_dir: str, tmpdir: str, repeats: dict[str, int],
            others: int, section: str = "2 reload latency") -> None:
    """Reload vs bare for each library in ``repeats`` (name -> samples); then the small one with others loaded."""
    registry = make_registry(gate, library_dir, tmpdir)
    bare_dir = tempfile.mkdtemp(prefix="bare-", dir=tmpdir)
    try:
        for name, count in repeats.items():
            cdef = SAMPLE_CDEF if name == "sample" else funcs_cdef(int(name[5:]) if name.startswith("funcs")
                                                                   else 10)
            registry.load(name, cdef=cdef)
            # with others to load later, "small" is measured a first time as the only module loaded
            suffix = ".1module" if others else ""
            _compare(rows, registry, name, cdef, str(libraries[name]), bare_dir, count, section,
                     f"{name} ({_size(libraries[name])}, {len(_symbols(cdef))} functions)"
                     + (", 1 module loaded" if suffix and name == "small" else ""), f"{gate}.{name}{suffix}")
            if not (others and name == "small"):
                registry.unload(name)          # one module loaded at a time, unless counting modules
        if others:
            for index in range(others):
                registry.load(f"other{index}", cdef=SAMPLE_CDEF, file=str(libraries["sample"]))
            cdef = funcs_cdef(10)
            _compare(rows, registry, "small", cdef, str(libraries["small"]), bare_dir, repeats["small"],
                     "3 scaling: reloads", f"small, {others + 1} modules loaded", f"{gate}.small.modules")
    finally:
        registry.close()
        os.rmdir(bare_dir)


def _compare(rows, registry, name: str, cdef: str, source: str, bare_dir: str, count: int, section: str,
             case: str, key: str) -> None:
    bare = BareLoader(cdef, _symbols(cdef), bare_dir)
    loaded = [bare.load(source)]

    def bare_load() -> None:
        loaded.append(bare.load(source))

    def bare_close() -> None:
        bare.close(loaded.pop(0))

    for _ in range(3):                       # warm up: page cache, allocator, cffi type caches
        registry.reload(name)
        bare_load()
        bare_close()
    stats = compare_ops({"reload": lambda: registry.reload(name), "load": bare_load, "close": bare_close}, count)
    for image in loaded:
        bare.close(image)
    assert registry.wait_drained(10)
    both = Stat(stats["load"].median + stats["close"].median, stats["load"].min + stats["close"].min,
                stats["load"].max + stats["close"].max, stats["load"].n)
    rows.add(section, f"{case}: reg.reload()", "us", stats["reload"],
             ratio=stats["reload"].median / stats["load"].median, ratio_of="bare copy+dlopen+resolve",
             key=f"reload.{key}", extra={"ratio_to_bare_with_close": stats["reload"].median / both.median,
                                         "bytes": os.path.getsize(source),
                                         "bare_with_close_us": both.median})
    rows.add(section, f"{case}: bare copy + dlopen + resolve", "us", stats["load"], key=f"bare.{key}")
    rows.add(section, f"{case}: bare dlclose + unlink", "us", stats["close"], key=f"bare_close.{key}")


def _size(path) -> str:
    size = os.path.getsize(path)
    return f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB"


def memory(rows, *, gate: str, libraries: dict, library_dir: str, tmpdir: str, cycles: int, warmup: int) -> None:
    """RSS after ``warmup`` reloads, and after ``cycles`` more (§5)."""
    registry = make_registry(gate, library_dir, tmpdir)
    try:
        registry.load("sample", cdef=SAMPLE_CDEF)
        func = registry.func("sample.add")
        for _ in range(warmup):
            registry.reload("sample")
            func(1, 2)
        gc.collect()
        before = rss_bytes()
        for _ in range(cycles):
            registry.reload("sample")
            func(1, 2)
        assert registry.wait_drained(10)
        gc.collect()
        after = rss_bytes()
        images = sum(len(module.images) for module in registry.status())
    finally:
        registry.close()
    mb = 1 / (1 << 20)
    rows.add("5 memory", f"RSS before {cycles:,} reloads (after {warmup} warm-up)", "MiB",
             Stat(before * mb, before * mb, before * mb, 1), key=f"rss.{gate}.before")
    rows.add("5 memory", f"RSS after {cycles:,} reloads ({images} image open)", "MiB",
             Stat(after * mb, after * mb, after * mb, 1), key=f"rss.{gate}.after")
    growth = (after - before) * mb
    rows.add("5 memory", f"RSS growth over {cycles:,} reloads", "MiB", Stat(growth, growth, growth, 1),
             key=f"rss.{gate}.growth")
