"""The compiled call path (nativereload/compiled/): what it compiles, its cache, and the background switch.

The rest of the suite runs on the compiled path too (``gate_impl == "compiled"``); these tests are about
what only it has: per-function fallback, the on-disk cache shared between processes, calls="auto"'s
background upgrade under load, and life without a compiler.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import OBJECTS_CDEF, ROOT, SAMPLE_CDEF, install

from nativereload import CompileError, Registry, gate
from nativereload.compiled import cache, codegen

pytestmark = [
    pytest.mark.skipif(os.environ.get("NATIVERELOAD_PURE_PYTHON", "") not in ("", "0"),
                       reason="this run is the pure-Python one (NATIVERELOAD_PURE_PYTHON=1)"),
    pytest.mark.skipif(gate.C is None, reason="the compiled path needs the C gate"),
    pytest.mark.skipif(cache.compiler() is None, reason="no C compiler"),
]

# A library with what the compiled path leaves on the gate, function by function.
MIXED_SOURCE = """
#include <stdarg.h>
struct pair { long a, b; };
long mixed_add(long a, long b) { return a + b; }
long mixed_sum(int n, ...) { va_list ap; long t = 0; va_start(ap, n); for (int i = 0; i < n; i++) t += va_arg(ap, long);
                             va_end(ap); return t; }
long mixed_pair(struct pair p) { return p.a * 10 + p.b; }
enum mixed_color { MIXED_RED = 1, MIXED_BLUE = 2 };
enum mixed_color mixed_next(enum mixed_color c) { return c == MIXED_RED ? MIXED_BLUE : MIXED_RED; }
"""
MIXED_CDEF = """
struct pair { long a, b; };
enum mixed_color { MIXED_RED = 1, MIXED_BLUE = 2 };
long mixed_add(long, long);
long mixed_sum(int, ...);
long mixed_pair(struct pair);
enum mixed_color mixed_next(enum mixed_color);
"""


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty compiled-call cache, and this process's memory of loaded extensions forgotten."""
    path = tmp_path / "cache"
    monkeypatch.setenv("NATIVERELOAD_CACHE_DIR", str(path))
    monkeypatch.delenv("NATIVERELOAD_PURE_PYTHON", raising=False)
    cache.forget_loaded_for_tests()
    yield path
    cache.forget_loaded_for_tests()


@pytest.fixture
def mixed(tmp_path) -> Path:
    source = tmp_path / "mixed.c"
    source.write_text(MIXED_SOURCE)
    output = tmp_path / "mixed.so"
    subprocess.run([*cache.compiler(), "-shared", "-fPIC", "-O2", str(source), "-o", str(output)], check=True)
    return output


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "compiled").iterdir() if not p.name.endswith(".lock"))


def test_status_names_the_compiled_functions_and_the_others_still_work(moddir, tmpdir_for_copies, mixed,
                                                                          fresh_cache):
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, calls="compiled") as reg:
        mod = reg.load("mixed", cdef=MIXED_CDEF, file=mixed)
        (status,) = reg.status()
        assert status.calls == "compiled"
        assert status.compiled == ("mixed_add", "mixed_next")     # variadic and struct-by-value stay on the gate
        assert mod.mixed_add(2, 3) == 5
        assert mod.mixed_sum(3, mod.ffi.cast("long", 1), mod.ffi.cast("long", 2), mod.ffi.cast("long", 3)) == 6
        assert mod.mixed_pair({"a": 4, "b": 2}) == 42
        assert mod.mixed_next(1) == 2 and mod.mixed_next(mod.ffi.cast("enum mixed_color", 2)) == 1
        functions = mod._slot.current.functions
        assert type(functions["mixed_add"]).__name__ == "CompiledFunction"
        assert type(functions["mixed_sum"]).__name__ != "CompiledFunction"


def test_handles_and_pointers_keep_the_module_ffi_types(moddir, tmpdir_for_copies, samples, fresh_cache):
    install(samples["objects1"], moddir / "objects.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, calls="compiled") as reg:
        mod = reg.load("objects", cdef=OBJECTS_CDEF, destructors=["obj_free"])
        assert {"obj_new", "obj_value", "stream_init"} <= set(reg.status()[0].compiled)
        handle = mod.obj_new(7)
        assert mod.ffi.typeof(handle) is mod.ffi.typeof("obj *")         # cast back to the module's ctype
        assert mod.obj_value(handle) == 7
        stream = mod.ffi.new("struct stream *")                          # made with the module's ffi
        assert mod.stream_init(stream) == 0
        # The wrong pointer type is refused exactly as on the gate (the call takes the cffi function).
        with pytest.raises(TypeError, match="obj"):
            mod.obj_value(mod.ffi.new("long *"))
        with pytest.raises(TypeError, match="expects 1 argument"):
            mod.obj_value()
        mod.obj_free(handle)


def test_a_reload_with_the_same_interface_never_compiles(reg_compiled_counting):
    reg, compiles = reg_compiled_counting
    for _ in range(3):
        reg.reload("sample")
    assert reg.func("sample.add")(2, 3) == 5
    assert reg.status()[0].calls == "compiled"
    assert compiles == [1]


@pytest.mark.timeout(120)
def test_status_says_compiled_while_reloads_retire_and_close_images(reg_compiled_counting):
    # status() once read the compiled set of an image after releasing its lock: a reload
    # on another thread could close that image in between, and status said "gate".
    reg, _ = reg_compiled_counting
    stop = threading.Event()

    def reloader() -> None:
        for _ in range(300):
            reg.reload("sample")
        stop.set()

    thread = threading.Thread(target=reloader)
    thread.start()
    seen = set()
    while not stop.is_set():
        seen.add(reg.status()[0].calls)
    thread.join(60)
    assert seen <= {"compiled"}, seen


@pytest.fixture
def reg_compiled_counting(moddir, tmpdir_for_copies, samples, fresh_cache, monkeypatch):
    compiles: list[int] = []
    real = cache._compile

    def counting(*args):
        compiles.append(1)
        return real(*args)

    monkeypatch.setattr(cache, "_compile", counting)
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, calls="compiled") as reg:
        reg.load("sample", cdef=SAMPLE_CDEF)
        yield reg, compiles


@pytest.mark.timeout(180)
def test_auto_switches_to_compiled_under_four_callers_and_reloads(moddir, tmpdir_for_copies, samples, fresh_cache):
    install(samples["v1"], moddir / "sample.so")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies, calls="auto")
    try:
        mod = reg.load("sample", cdef=SAMPLE_CDEF)
        assert reg.status()[0].calls in ("compiling", "compiled")
        add, scaled, version = mod.add, reg.func("sample.scaled"), reg.func("sample.version")
        stop = threading.Event()
        errors: list[BaseException] = []
        calls = [0] * 4

        def caller(index: int) -> None:
            try:
                while not stop.is_set():
                    assert add(index, 3) == index + 3
                    v = version()
                    assert v in (1, 2), v
                    assert scaled(5) in (5, 10)
                    calls[index] += 1
            except BaseException as exc:     # noqa: B036 - any failure is the test's failure
                errors.append(exc)
                stop.set()

        def reloader() -> None:
            cycle = 0
            while not stop.is_set():
                install(samples["v2" if cycle % 2 == 0 else "v1"], moddir / "sample.so")
                reg.reload("sample")
                cycle += 1
                time.sleep(0.002)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)] + [threading.Thread(target=reloader)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while reg.status()[0].calls != "compiled" and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.05)
        switched = reg.status()[0].calls == "compiled"
        before = sum(calls)
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        assert switched, "the compiled path was not ready within 120 s"
        assert sum(calls) > before, "no call was made on the compiled path"
        assert type(mod._slot.current.functions["add"]).__name__ == "CompiledFunction"
        assert len(entries(fresh_cache)) == 1
    finally:
        assert reg.close(timeout=10)


def test_auto_moves_a_serving_image_to_compiled_without_a_reload(moddir, tmpdir_for_copies, samples, fresh_cache):
    # The background build's callback finds the registry's live images: no reload is needed for the switch.
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, calls="auto") as reg:
        mod = reg.load("sample", cdef=SAMPLE_CDEF)
        deadline = time.monotonic() + 120
        while reg.status()[0].calls == "compiling" and time.monotonic() < deadline:
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while reg.status()[0].calls != "compiled" and time.monotonic() < deadline:
            time.sleep(0.05)    # the build is done; its callback is moving the image
        assert reg.status()[0].calls == "compiled" and mod.generation == 1
        assert type(mod._slot.current.functions["add"]).__name__ == "CompiledFunction" and mod.add(2, 3) == 5


def test_a_reload_with_a_new_signature_serves_it_compiled(moddir, tmpdir_for_copies, samples, fresh_cache):
    # New shapes are a new extension: the reload builds it before the new image serves (calls="compiled").
    install(samples["contract"], moddir / "contract.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, calls="compiled") as reg:
        mod = reg.load("contract")
        install(samples["contract_param"], moddir / "contract.so")      # contract_add(long, int), was (long, long)
        reg.reload("contract", allow_interface_change=True)
        assert mod.generation == 2 and reg.status()[0].calls == "compiled"
        assert "contract_add" in reg.status()[0].compiled and mod.contract_add(40, 2) == 42
        assert type(mod._slot.current.functions["contract_add"]).__name__ == "CompiledFunction"
        assert len(entries(fresh_cache)) == 2


# -- across processes ---------------------------------------------------------------------------------------

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from nativereload import Registry
reg = Registry(path=[{moddir!r}], tmpdir={tmpdir!r}, calls={calls!r})
try:
    mod = reg.load("sample", cdef={cdef!r})
except Exception as exc:
    print("FAILED", type(exc).__name__, exc)
    raise SystemExit(3)
assert mod.add(2, 3) == 5
print(reg.status()[0].calls)
reg.close()
"""


def run_script(moddir, tmpdir, cache_dir, calls="compiled", env=None, wait=None) -> subprocess.Popen:
    code = SCRIPT.format(moddir=str(moddir), tmpdir=str(tmpdir), calls=calls, cdef=SAMPLE_CDEF)
    if wait is not None:
        code = f"import os, time\nwhile not os.path.exists({str(wait)!r}): time.sleep(0.001)\n" + code
    full_env = dict(os.environ, NATIVERELOAD_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    full_env.pop("NATIVERELOAD_CALLS", None)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_cache_hits_across_processes(moddir, tmpdir_for_copies, samples, tmp_path):
    install(samples["v1"], moddir / "sample.so")
    cache_dir = tmp_path / "shared-cache"
    code, out, err = finish(run_script(moddir, tmpdir_for_copies, cache_dir))
    assert (code, out.strip()) == (0, "compiled"), err
    assert "built" in err
    code, out, err = finish(run_script(moddir, tmpdir_for_copies, cache_dir))
    assert (code, out.strip()) == (0, "compiled"), err
    assert "built" not in err                    # the second process compiled nothing
    code, out, err = finish(run_script(moddir, tmpdir_for_copies, cache_dir, calls="auto"))
    assert (code, out.strip()) == (0, "compiled"), err        # a cache hit serves compiled from the first call


def test_two_processes_compiling_at_once(moddir, tmpdir_for_copies, samples, tmp_path):
    install(samples["v1"], moddir / "sample.so")
    cache_dir = tmp_path / "shared-cache"
    go = tmp_path / "go"
    processes = [run_script(moddir, tmpdir_for_copies, cache_dir, wait=go) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    results = [finish(process) for process in processes]
    for code, out, err in results:
        assert (code, out.strip()) == (0, "compiled"), err
    assert sum(err.count("built") for _, _, err in results) == 1      # one compiled, the other waited for it
    names = entries(cache_dir)
    assert len(names) == 1 and names[0].endswith(".so"), names        # no partial file, no build directory left


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign"])
def test_a_damaged_cache_entry_is_rebuilt_not_loaded(moddir, tmpdir_for_copies, samples, tmp_path, damage):
    install(samples["v1"], moddir / "sample.so")
    cache_dir = tmp_path / "cache"
    code, out, err = finish(run_script(moddir, tmpdir_for_copies, cache_dir))
    assert (code, out.strip()) == (0, "compiled"), err
    (name,) = entries(cache_dir)
    entry = cache_dir / "compiled" / name
    data = entry.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 3]                       # dlopen of this would die of SIGBUS
    elif damage == "flipped":
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
    else:
        data = data[:-cache._TRAILER_SIZE] + cache._trailer("0" * 64, data[:-cache._TRAILER_SIZE])
    entry.write_bytes(data)
    code, out, err = finish(run_script(moddir, tmpdir_for_copies, cache_dir))
    assert (code, out.strip()) == (0, "compiled"), err
    assert ("foreign" if damage == "foreign" else "corrupt") in err and "built" in err
    assert cache._check_entry(str(entry), _digest_of(entry)) is None and entries(cache_dir) == [name]


def _digest_of(entry: Path) -> str:
    trailer = entry.read_bytes()[-cache._TRAILER_SIZE:]
    return trailer[len(cache._TRAILER_MAGIC):len(cache._TRAILER_MAGIC) + 64].decode()


def test_without_a_compiler_auto_serves_on_the_gate_and_compiled_fails_clearly(moddir, tmpdir_for_copies, samples,
                                                                             tmp_path):
    install(samples["v1"], moddir / "sample.so")
    empty = tmp_path / "no-compiler-here"
    empty.mkdir()
    env = {"PATH": str(empty), "CC": ""}
    code, out, err = finish(run_script(moddir, tmpdir_for_copies, tmp_path / "cache", calls="auto", env=env))
    assert (code, out.strip()) == (0, "gate"), err
    assert err.count("no C compiler found") == 1
    code, out, err = finish(run_script(moddir, tmpdir_for_copies, tmp_path / "cache", calls="compiled", env=env))
    assert code == 3
    assert "FAILED CompileError module 'sample': calls='compiled', but no C compiler found" in out
    assert "install one" in out


def test_plan_groups_functions_by_shape():
    from nativereload.interface import Declarations, parse

    def Interface(cdef, module):
        return Declarations.of(parse(cdef, module=module))

    interface = Interface("typedef struct h h; long f(long, long); long g(long, long); h *make(void);"
                          "int use(h *, const char *);", "m")
    plan = codegen.plan(interface.ffi, interface.function_types)
    assert plan.entries["f"].index == plan.entries["g"].index            # one wrapper serves both
    assert len(plan.shapes) == 3
    assert plan.entries["make"].result_type is interface.ffi.typeof("h *")
    assert plan.entries["use"].checks == (interface.ffi.typeof("h *"), None)
    other = Interface("long a(long, long); long b(long, long); struct x *c(void); int d(struct y *, char *);", "n")
    assert codegen.plan(other.ffi, other.function_types).digest == plan.digest   # same shapes: same extension


ODD_ARGUMENTS = [
    ("add", (2, 3)), ("add", (True, 2)), ("add", (2 ** 62, 2 ** 62)), ("add", (2 ** 70, 1)), ("add", (1.5, 1)),
    ("add", (-(2 ** 63), 0)), ("add", ("1", 2)), ("add", (1,)), ("add", (1, 2, 3)),
    ("scaled", (-7,)), ("dot4", (1.0, 2.0, 3.0, 4.0)), ("dot4", (1, 2, 3, 4)), ("dot4", (1.0, 2.0, 3.0, "x")),
    ("dot4", (float("nan"), 0.0, 0.0, 0.0)), ("sum_bytes", (b"abc", 3)), ("sum_bytes", (bytearray(b"abc"), 3)),
    ("sum_bytes", ("abc", 3)), ("sum_bytes", (None, 0)), ("version", ()), ("version", (1,)),
]


@pytest.mark.parametrize("name, args", ODD_ARGUMENTS, ids=[f"{n}{a!r}"[:40] for n, a in ODD_ARGUMENTS])
def test_the_compiled_call_accepts_and_refuses_exactly_what_cffi_does(moddir, tmpdir_for_copies, samples, name,
                                                                      args):
    import cffi
    import math

    install(samples["v1"], moddir / "sample.so")
    ffi = cffi.FFI()
    ffi.cdef(SAMPLE_CDEF)
    plain = getattr(ffi.dlopen(str(samples["v1"])), name)

    def outcome(function):
        try:
            result = function(*args)
        except Exception as exc:       # noqa: BLE001 - compared below
            return type(exc), str(exc)
        return ("nan",) if isinstance(result, float) and math.isnan(result) else result

    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, calls="compiled") as reg:
        reg.load("sample", cdef=SAMPLE_CDEF)
        assert name in reg.status()[0].compiled
        assert outcome(reg.func(f"sample.{name}")) == outcome(plain)


def test_leftovers_of_a_killed_compile_are_swept(moddir, tmpdir_for_copies, samples, fresh_cache):
    stale_dir = fresh_cache / "compiled" / ".build-dead"
    stale_dir.mkdir(parents=True)
    (stale_dir / "x.c").write_text("/* left by a process killed mid-build */")
    stale_file = fresh_cache / "compiled" / "_nativereload_calls_x.so.abc.partial"
    stale_file.write_bytes(b"\x7fELF")
    recent = fresh_cache / "compiled" / ".build-alive"
    recent.mkdir()
    old = time.time() - 2 * cache.STALE_SECONDS
    for path in (stale_dir, stale_file):
        os.utime(path, (old, old))
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, calls="compiled") as reg:
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert not stale_dir.exists() and not stale_file.exists()
    assert recent.exists()          # maybe another process's build in progress: left alone
