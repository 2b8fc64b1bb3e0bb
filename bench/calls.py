"""Call overhead: a nativereload call against plain cffi, cffi API mode and ctypes (issue 4, §1 and §3).

Variants, all on the same compiled sample library, each function object
taken once before timing (so no attribute lookup is measured unless it is
the point, as in (e)):
    a  cffi ABI mode, cached function object       f = lib.add
    b  cffi API mode (out-of-line compiled module)  f = api_lib.add
    c  ctypes with argtypes/restype set
    d  nativereload Func                             f = reg.func("sample.add")
    e  Module attribute                              mod.add(...)
d and e are measured once per call path (C gate, compiled, Python gate). Ratios are to (a).
"""

from __future__ import annotations

import ctypes

import cffi

from libs import SAMPLE_CDEF
from registries import available_gates, make_registry, path_label, registry_path
from timing import compare_calls

BUFFER = b"nativereload" * 5 + b"!!!!"       # 64 bytes for sum_bytes

CALLS = {
    # function: (argument expression, ctypes argtypes, ctypes restype)
    "add": ("1, 2", [ctypes.c_long, ctypes.c_long], ctypes.c_long),
    "dot4": ("1.0, 2.0, 3.0, 4.0", [ctypes.c_double] * 4, ctypes.c_double),
    "sum_bytes": ("buf, 64", [ctypes.c_char_p, ctypes.c_long], ctypes.c_long),
}


def abi_lib(path: str):
    ffi = cffi.FFI()
    ffi.cdef(SAMPLE_CDEF)
    return ffi.dlopen(path)


def overhead(rows, *, library: str, library_dir: str, tmpdir: str, api_lib, repeats: int,
             block_seconds: float) -> None:
    """Section 1: every variant for add, dot4 and sum_bytes, interleaved per function."""
    lib = abi_lib(library)
    cdll = ctypes.CDLL(library)
    registries = {gate: make_registry(gate, library_dir, tmpdir) for gate in available_gates()}
    modules = {gate: registry.load("sample", cdef=SAMPLE_CDEF) for gate, registry in registries.items()}
    for gate, registry in registries.items():
        assert registry_path(registry) == gate, (gate, registry.status())
    try:
        for name, (args, argtypes, restype) in CALLS.items():
            ctypes_function = getattr(cdll, name)
            ctypes_function.argtypes = argtypes
            ctypes_function.restype = restype
            namespace = {"buf": BUFFER, "a": getattr(lib, name), "b": getattr(api_lib, name), "c": ctypes_function}
            statements = {
                "a": (f"a({args})", namespace),
                "b": (f"b({args})", namespace),
                "c": (f"c({args})", namespace),
            }
            for gate, registry in registries.items():
                func = registry.func(f"sample.{name}")
                namespace[f"d_{gate}"] = func
                namespace[f"mod_{gate}"] = modules[gate]
                statements[f"d_{gate}"] = (f"d_{gate}({args})", namespace)
                statements[f"e_{gate}"] = (f"mod_{gate}.{name}({args})", namespace)
            expected = eval(f"a({args})", namespace)
            for key, (stmt, ns) in statements.items():
                assert eval(stmt, ns) == expected, (key, stmt)
            stats = compare_calls(statements, repeats, block_seconds)
            base = stats["a"]
            labels = {
                "a": "(a) cffi ABI, cached function object",
                "b": "(b) cffi API mode, out-of-line",
                "c": "(c) ctypes, argtypes set",
            }
            for gate in registries:
                path = "compiled path" if gate == "compiled" else f"{gate} gate"
                labels[f"d_{gate}"] = f"(d) nativereload Func, {path}"
                labels[f"e_{gate}"] = f"(e) Module attribute mod.{name}, {path}"
            signature = {"add": "long add(long, long)", "dot4": "double dot4(4 x double)",
                         "sum_bytes": "long sum_bytes(const char *, long), 64 B"}[name]
            for key, label in labels.items():
                extra = {"ratio_to_api": stats[key].median / stats["b"].median}
                rows.add("1 call overhead", f"{signature}: {label}", "ns", stats[key],
                         ratio=stats[key].median / base.median, ratio_of="a", key=f"call.{name}.{key}", extra=extra)
    finally:
        for registry in registries.values():
            registry.close()


def flatness(rows, *, library: str, library_dir: str, tmpdir: str, reloads: int, others: int, repeats: int,
             block_seconds: float) -> None:
    """Section 3 (calls): Func add() after 0 and after ``reloads`` reloads, and with 1 vs ``others``+1 modules."""
    lib = abi_lib(library)
    for gate in available_gates():
        registry = make_registry(gate, library_dir, tmpdir)
        try:
            registry.load("sample", cdef=SAMPLE_CDEF)
            namespace = {"a": lib.add, "d": registry.func("sample.add")}
            statements = {"a": ("a(1, 2)", namespace), "d": ("d(1, 2)", namespace)}

            def measure(case: str, key: str) -> None:
                stats = compare_calls(statements, repeats, block_seconds)
                rows.add("3 scaling: calls", f"add() via Func, {path_label(gate)}, {case}", "ns", stats["d"],
                         ratio=stats["d"].median / stats["a"].median, ratio_of="a (same block)",
                         key=f"flat.{gate}.{key}")

            measure("1 module, 0 reloads", "fresh")
            for _ in range(reloads):
                registry.reload("sample")
            assert registry.wait_drained(10)
            measure(f"1 module, after {reloads:,} reloads", "reloaded")
            for index in range(others):
                registry.load(f"other{index}", cdef=SAMPLE_CDEF, file=library)
            measure(f"{others + 1} modules loaded", "modules")
        finally:
            registry.close()
