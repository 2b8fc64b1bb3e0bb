"""The in-flight gate, tested directly: gate.PYTHON, gate.LOCKED and, where built, gate.C.

The contract under test is nativereload/gate.py's docstring: calls are counted
in and out (also when they raise), a retired gate fires ``on_drained`` exactly
once, after its last call, and no call ever runs on a gate after that. The
functions behind a gate are real: libc's ``read`` through cffi (which releases
the GIL, so a call can block inside C while other threads run) or plain Python
callables (the gate accepts any callable) that check the contract as they run.
No test asserts on wall time; waits are bounded only so a bug fails instead of hanging.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time

import cffi
import pytest

from nativereload import gate

WAIT = 30.0     # a bound on waits for other threads, never an expectation


def clear_thread_cache() -> None:
    """Free-threaded builds: the C gate's per-thread call cache keeps the last gate and function object of
    each Func this thread called (at most 64); drop them, so that what the test tracks can go."""
    if gate._c_gate is not None:
        gate._c_gate.clear_thread_cache()


@pytest.fixture(params=["python", "python-locked", "c"])
def impl(request) -> gate.Implementation:
    """The gate implementation under test: the Python gate, its lock-based variant (the one free-threaded
    builds use), and the C gate where it is built."""
    if request.param == "c":
        if gate.C is None:
            pytest.skip("C gate not built in this environment")
        return gate.C
    return gate.LOCKED if request.param == "python-locked" else gate.PYTHON


@pytest.fixture(scope="module")
def libc():
    """libc's read/write/abs through cffi ABI mode: real C functions, no compiler needed."""
    ffi = cffi.FFI()
    ffi.cdef("long read(int, void *, unsigned long); int abs(int);")
    return ffi, ffi.dlopen(None)


def missing(gate_or_none):
    return LookupError(gate_or_none)


def make(impl, functions, on_drained=lambda: None, symbol="f"):
    """A slot pointing at a fresh gate over ``functions``, and a Func on ``symbol``."""
    image = impl.ImageGate(functions, on_drained)
    slot = impl.Slot()
    slot.current = image
    return image, slot, impl.Func(slot, f"mod.{symbol}", symbol, missing)


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.001)


class Blocker:
    """A call blocked inside C: libc read() on a pipe, released by writing a byte."""

    def __init__(self, libc):
        self.ffi, lib = libc
        self.read = lib.read
        self.rfd, self.wfd = os.pipe()

    def release(self):
        os.write(self.wfd, b"x")

    def close(self):
        os.close(self.rfd)
        os.close(self.wfd)


def test_func_attributes(impl):
    image, slot, f = make(impl, {"f": len})
    assert f.name == "mod.f" and f.symbol == "f"
    assert repr(f) == "<nativereload.Func mod.f>"
    assert isinstance(f, gate.Func)
    assert slot.current is image
    slot.current = None
    assert slot.current is None
    assert image.functions == {"f": len} and not image.retired and not image.drained


def test_calls_pass_arguments_and_results(impl, libc):
    ffi, lib = libc
    _, _, f = make(impl, {"abs": lib.abs}, symbol="abs")
    assert f(-7) == 7
    _, _, g = make(impl, {"f": lambda *args: args})
    assert g() == ()
    assert g(*range(20)) == tuple(range(20))
    with pytest.raises(TypeError):
        g(x=1)


def test_keyword_arguments_are_refused_before_the_call_is_counted(impl):
    ran = []
    image, _, f = make(impl, {"f": lambda *args, **kwargs: ran.append(kwargs)})
    for kwargs in ({"x": 1}, {"x": 1, "y": 2}):
        with pytest.raises(TypeError):
            f(1, **kwargs)
    assert f(**{}) is None             # no keywords at all is an ordinary call
    assert ran == [{}]
    assert image.in_flight == 0


def test_bad_arguments_to_a_cffi_function_count_the_exit(impl, libc):
    ffi, lib = libc
    fired = []
    image, slot, f = make(impl, {"abs": lib.abs}, lambda: fired.append(1), symbol="abs")
    for bad in (("x",), (), (1, 2), (2 ** 70,)):
        with pytest.raises((TypeError, OverflowError)):
            f(*bad)
    assert image.in_flight == 0
    slot.current = None
    image.retire()
    assert fired == [1]


def test_on_drained_error_in_the_last_call_keeps_the_call_error_as_context(impl):
    def last_call():
        slot.current = None
        image.retire()                  # in flight: does not fire yet
        assert not image.drained
        raise KeyError("from the call")

    def on_drained():
        raise OSError("close failed")

    image, slot, f = make(impl, {"f": last_call}, on_drained)
    with pytest.raises(OSError, match="close failed") as raised:
        f()
    assert isinstance(raised.value.__context__, KeyError)
    assert image.drained and image.in_flight == 0


def test_counts_calls_in_and_out(impl):
    seen = []

    def body(depth):
        seen.append(image.in_flight)
        if depth:
            f(depth - 1)
        return depth

    image, _, f = make(impl, {"f": body})
    assert image.in_flight == 0
    assert f(2) == 2
    assert seen == [1, 2, 3]       # re-entrant calls are counted too
    assert image.in_flight == 0


def test_counts_the_exit_when_the_call_raises(impl):
    def boom():
        raise ValueError("from the image")

    image, _, f = make(impl, {"f": boom})
    for _ in range(3):
        with pytest.raises(ValueError, match="from the image"):
            f()
    assert image.in_flight == 0


def test_retire_when_idle_fires_on_drained_once(impl):
    fired = []
    image, slot, f = make(impl, {"f": len}, lambda: fired.append(threading.get_ident()))
    assert f("abc") == 3
    slot.current = None
    image.retire()
    assert fired == [threading.get_ident()]
    assert image.retired and image.drained
    image.retire()
    image.try_drain()
    assert len(fired) == 1


def test_try_drain_does_nothing_before_retire(impl):
    fired = []
    image, _, _ = make(impl, {}, lambda: fired.append(1))
    image.try_drain()
    assert fired == [] and not image.drained


@pytest.mark.timeout(60)
def test_retire_with_a_call_in_flight_fires_when_it_returns(impl, libc):
    blocker = Blocker(libc)
    fired = []
    old, slot, f = make(impl, {"read": blocker.read}, lambda: fired.append(threading.get_ident()),
                        symbol="read")
    results = {}

    def blocked_call():
        results["ident"] = threading.get_ident()
        buf = blocker.ffi.new("char[1]")
        results["read"] = f(blocker.rfd, buf, 1)

    caller = threading.Thread(target=blocked_call)
    caller.start()
    try:
        wait_until(lambda: old.in_flight == 1, "the call to block inside read()")
        new = impl.ImageGate({"read": lambda *args: "new image"}, lambda: None)
        slot.current = new
        old.retire()
        assert fired == [] and not old.drained       # the blocked call still runs on the old image
        assert f(0, None, 0) == "new image"          # new calls go to the new one
        assert old.in_flight == 1
        blocker.release()
        caller.join(WAIT)
        assert not caller.is_alive()
    finally:
        blocker.release()
        caller.join(WAIT)
        blocker.close()
    assert results["read"] == 1                       # finished on the old image
    assert fired == [results["ident"]]                # drained by the thread whose call was last
    assert old.drained and old.in_flight == 0


def test_on_missing_without_a_current_image(impl):
    seen = []

    def on_missing(gate_or_none):
        seen.append(gate_or_none)
        return KeyError("unloaded")

    slot = impl.Slot()
    f = impl.Func(slot, "mod.f", "f", on_missing)
    with pytest.raises(KeyError, match="unloaded"):
        f(1)
    assert seen == [None]


def test_on_missing_for_a_symbol_the_image_lacks(impl):
    seen = []

    def on_missing(gate_or_none):
        seen.append(gate_or_none)
        return AttributeError("no such symbol")

    image = impl.ImageGate({"other": len, "none": None}, lambda: None)
    slot = impl.Slot()
    slot.current = image
    for symbol in ("f", "none"):
        f = impl.Func(slot, f"mod.{symbol}", symbol, on_missing)
        with pytest.raises(AttributeError, match="no such symbol"):
            f()
    assert seen == [image, image]
    assert image.in_flight == 0


def test_replacing_or_extending_functions_is_seen(impl):
    image, _, f = make(impl, {"f": lambda: 1})
    assert f() == 1 and f() == 1
    image.functions = {"f": lambda: 2}
    assert f() == 2
    image.functions = {}
    with pytest.raises(LookupError):
        f()
    image.functions["f"] = lambda: 3
    assert f() == 3


def test_a_new_image_in_the_slot_serves_the_next_call(impl):
    first, slot, f = make(impl, {"f": lambda: "first"})
    assert f() == "first"
    second = impl.ImageGate({"f": lambda: "second"}, lambda: None)
    slot.current = second
    first.retire()
    assert first.drained
    assert f() == "second"
    first.functions = {}            # what the registry does once an image has drained
    assert f() == "second"


def test_on_drained_error_propagates_once(impl):
    calls = []

    def on_drained():
        calls.append(1)
        raise OSError("close failed")

    image, slot, _ = make(impl, {}, on_drained)
    slot.current = None
    with pytest.raises(OSError, match="close failed"):
        image.retire()
    image.retire()
    assert calls == [1] and image.drained


@pytest.mark.timeout(60)
def test_back_out_of_a_retired_image(impl, libc):
    """A call that finds the current image retired backs out and waits for the slot to move on.

    The gate is deliberately retired *before* the slot moves (the registry
    does it the other way round), which forces new calls into the back-out
    path for as long as the slot still points at the retired image.
    """
    blocker = Blocker(libc)
    ran_on_old = []
    fired = []

    def old_read(*args):
        ran_on_old.append(threading.get_ident())
        return blocker.read(*args)

    old, slot, f = make(impl, {"read": old_read}, lambda: fired.append(1), symbol="read")
    results = {}

    def blocked_call():
        results["blocked"] = f(blocker.rfd, blocker.ffi.new("char[1]"), 1)

    def late_call():
        results["late"] = f(0, None, 0)

    first = threading.Thread(target=blocked_call)
    first.start()
    late = threading.Thread(target=late_call)
    try:
        wait_until(lambda: old.in_flight == 1, "the call to block inside read()")
        old.retire()
        late.start()
        time.sleep(0.05)       # give the late call time to back out a few times (not required to pass)
        assert "late" not in results
        slot.current = impl.ImageGate({"read": lambda *args: "new"}, lambda: None)
        late.join(WAIT)
        assert results["late"] == "new"
        assert fired == []
        blocker.release()
        first.join(WAIT)
    finally:
        blocker.release()
        first.join(WAIT)
        if late.is_alive():
            slot.current = impl.ImageGate({"read": lambda *args: None}, lambda: None)
            late.join(WAIT)
        blocker.close()
    assert results["blocked"] == 1
    assert len(ran_on_old) == 1        # only the call admitted before retire() ran on the old image
    assert fired == [1]


class Tracked:
    """One image's function and on_drained, checking the contract on every call."""

    def __init__(self, violations: list):
        self.violations = violations
        self.lock = threading.Lock()
        self.active = 0
        self.calls = 0
        self.fired = 0

    def function(self, value):
        with self.lock:
            if self.fired:
                self.violations.append("call after on_drained")
            self.active += 1
            self.calls += 1
        time.sleep(0)              # let the GIL go inside the call, as a cffi call would
        with self.lock:
            self.active -= 1
        return value

    def on_drained(self):
        with self.lock:
            if self.active:
                self.violations.append(f"on_drained with {self.active} calls inside")
            self.fired += 1


class SwitchingSlot:
    """A slot for the Python gate that lets the GIL go right after each read of ``current``.

    This forces the race the retired re-check exists for: a reload landing
    between a call reading the current image and counting itself in. (The C
    gate holds the GIL across those steps, so only a free-threaded build has
    that window there; its C Slot is used as is.) Without the re-check this
    test records thousands of calls after on_drained.
    """

    __slots__ = ("_current",)

    def __init__(self):
        self._current = None

    @property
    def current(self):
        value = self._current
        time.sleep(0)
        return value

    @current.setter
    def current(self, value):
        self._current = value


@pytest.mark.timeout(60)
def test_swapping_under_many_callers(impl):
    """Callers hammer one Func while another thread swaps and retires thousands of images."""
    swaps, n_callers = 3000, 4
    violations: list[str] = []
    images = [Tracked(violations)]
    slot = SwitchingSlot() if impl in (gate.PYTHON, gate.LOCKED) else impl.Slot()
    slot.current = impl.ImageGate({"f": images[0].function}, images[0].on_drained)
    f = impl.Func(slot, "mod.f", "f", missing)
    done = threading.Event()
    completed = [0] * n_callers
    errors = []

    def caller(index):
        try:
            while not done.is_set():
                assert f(index) == index
                completed[index] += 1
        except BaseException as exc:     # reported below; a dead caller must not hang the test
            errors.append(exc)

    def swapper():
        try:
            for _ in range(swaps):
                tracked = Tracked(violations)
                images.append(tracked)
                old = slot.current
                slot.current = impl.ImageGate({"f": tracked.function}, tracked.on_drained)
                old.retire()
                time.sleep(0)          # let callers in between swaps, or they barely run
        finally:
            done.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)        # switch threads as often as the interpreter allows
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(n_callers)]
    threads.append(threading.Thread(target=swapper))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    finally:
        done.set()
        sys.setswitchinterval(old_interval)
        for thread in threads:
            thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    last = slot.current
    slot.current = None
    last.retire()
    assert violations == []
    assert [tracked.fired for tracked in images] == [1] * len(images)
    assert sum(tracked.calls for tracked in images) == sum(completed)
    assert all(completed)


def test_reference_cycles_are_collected(impl):
    """gate -> on_drained -> gate and func -> on_missing -> func cycles must not leak."""
    finalized = []

    class Marker:
        def __del__(self):
            finalized.append(1)

    def build():
        marker = Marker()
        image = impl.ImageGate({}, lambda: (image, marker))
        slot = impl.Slot()
        slot.current = image
        f = impl.Func(slot, "mod.f", "f", lambda g: (f, marker, LookupError()))
        image.functions["f"] = lambda: (f, marker)
        f()

    build()
    clear_thread_cache()
    gc.collect()
    assert finalized == [1]


def test_no_references_leak_on_any_path(impl, libc):
    """Calls that return, raise inside, get bad arguments, miss the symbol or find no image drop what they took."""
    ffi, lib = libc

    def boom():
        raise ValueError("boom")

    class Missing(LookupError):
        pass

    def on_missing(gate_or_none):
        return Missing(gate_or_none is None)

    def on_drained():
        pass

    tracked = {"abs": lib.abs, "boom": boom, "on_missing": on_missing, "on_drained": on_drained,
               "Missing": Missing, "None": None}

    def cycle():
        slot = impl.Slot()
        image = impl.ImageGate({"abs": lib.abs, "boom": boom}, on_drained)
        slot.current = image
        funcs = [impl.Func(slot, f"mod.{name}", name, on_missing) for name in ("abs", "boom", "nope")]
        for _ in range(50):
            assert funcs[0](-3) == 3
            for func, args, error in ((funcs[0], ("x",), TypeError), (funcs[0], (1,), None),
                                      (funcs[1], (), ValueError), (funcs[2], (), Missing)):
                try:
                    func(*args)
                except BaseException as exc:       # noqa: BLE001 - checked just below
                    assert isinstance(exc, error)
        slot.current = impl.ImageGate({"abs": lib.abs}, on_drained)
        image.retire()
        image.functions = {}
        assert funcs[0](-4) == 4
        slot.current = None
        with pytest.raises(Missing):
            funcs[0](1)

    cycle()                       # warm up caches that live for the process (interned names, type caches)
    clear_thread_cache()
    gc.collect()
    before = {name: sys.getrefcount(obj) for name, obj in tracked.items()}
    for _ in range(20):
        cycle()
    clear_thread_cache()
    gc.collect()
    assert {name: sys.getrefcount(obj) for name, obj in tracked.items()} == before


def test_c_types_initialize_once():
    if gate.C is None:
        pytest.skip("C gate not built in this environment")
    image, slot, f = make(gate.C, {"f": len})
    with pytest.raises(TypeError, match="only once"):
        image.__init__({"f": abs}, lambda: None)
    with pytest.raises(TypeError, match="only once"):
        f.__init__(slot, "mod.g", "g", missing)
    assert f.name == "mod.f" and f("ab") == 2


def test_c_types_check_their_arguments():
    if gate.C is None:
        pytest.skip("C gate not built in this environment")
    slot = gate.C.Slot()
    with pytest.raises(TypeError):
        slot.current = object()
    with pytest.raises(TypeError):
        gate.C.Func(gate.PYTHON.Slot(), "mod.f", "f", missing)
    with pytest.raises(TypeError):
        gate.C.ImageGate({}, "not callable")
    with pytest.raises(AttributeError):
        gate.C.ImageGate({}, lambda: None).retired = True


def test_on_drained_error_at_the_end_of_a_successful_call_is_raised(impl):
    # The call itself returned: the error of closing its image must not vanish.
    def last_call():
        slot.current = None
        image.retire()
        return "result"

    def on_drained():
        raise OSError("close failed")

    image, slot, f = make(impl, {"f": last_call}, on_drained)
    with pytest.raises(OSError, match="close failed") as raised:
        f()
    assert raised.value.__context__ is None
    assert image.drained and image.in_flight == 0


def test_implementation_follows_the_environment(monkeypatch):
    monkeypatch.setenv("NATIVERELOAD_PURE_PYTHON", "1")
    assert gate.implementation() is gate.PYTHON
    monkeypatch.setenv("NATIVERELOAD_PURE_PYTHON", "yes")
    assert gate.implementation() is gate.PYTHON
    for value in ("0", ""):
        monkeypatch.setenv("NATIVERELOAD_PURE_PYTHON", value)
        assert gate.implementation() is (gate.C or gate.PYTHON)
    monkeypatch.delenv("NATIVERELOAD_PURE_PYTHON")
    assert gate.implementation() is (gate.C or gate.PYTHON)
    if gate.C is not None:
        assert gate.C.name == "c" and gate.C.Func is gate._c_gate.Func
    assert gate.PYTHON.name == ("python-locked" if gate._GIL_DISABLED else "python")
    assert gate.LOCKED.Func is gate._LockedFunc
    assert repr(gate.LOCKED) == "<nativereload gate 'python-locked'>"


def test_the_python_gate_reads_its_counters(impl):
    image, slot, f = make(impl, {"f": lambda: image.in_flight})
    assert f() == 1 and image.in_flight == 0
    assert gate._count_value(__import__("itertools").count(41)) == 41


def test_a_call_nested_in_an_argument_conversion_keeps_the_outer_gate(impl):
    """Free-threaded builds cache each thread's gate per Func: a call made while converting another call's
    argument may evict that entry and replace the image, and the outer call must still finish on its gate."""
    ffi = cffi.FFI()
    ffi.cdef("double fabs(double);")
    fabs = ffi.dlopen(None).fabs
    slot = impl.Slot()
    slot.current = impl.ImageGate({"fabs": fabs}, lambda: None)
    outer = impl.Func(slot, "mod.fabs", "fabs", lambda gate_or_none: LookupError())
    assert outer(-1.0) == 1.0                  # now cached (free-threaded C gate)

    class Reentrant:
        def __float__(self):                   # cffi converts a double argument with it, inside the call
            old = slot.current
            slot.current = impl.ImageGate({"fabs": fabs}, lambda: None)
            old.retire()                       # the outer call is counted in: it cannot drain yet
            del old
            for index in range(200):          # enough Funcs to reuse every entry of the cache
                impl.Func(slot, f"mod.fabs{index}", "fabs", lambda gate_or_none: LookupError())(-2.0)
            return -5.0

    assert outer(Reentrant()) == 5.0
    assert outer(-3.0) == 3.0


def test_the_gil_is_read_from_the_interpreter():
    gil_disabled = hasattr(sys, "_is_gil_enabled") and not sys._is_gil_enabled()
    assert gate._GIL_DISABLED is gil_disabled
    assert gate.PYTHON is (gate.LOCKED if gil_disabled else gate.PYTHON)
    assert (gate.PYTHON.Func is gate._LockedFunc) is gil_disabled


# -- holds: pins and pointer-result leases ---------------------------------------------------------------

def test_a_pin_is_admitted_like_a_call_and_holds_the_image(impl):
    fired = []
    image, slot, f = make(impl, {"f": lambda: "ran"}, lambda: fired.append(True))
    assert image.try_pin() is True
    assert (image.holds, image.pins, image.in_flight) == (1, 1, 0)   # counted out again: only the hold stays
    slot.current = None
    image.retire()
    assert fired == [] and not image.drained                          # the pin keeps it open
    assert image.try_pin() is False                                   # retired: refused, nothing taken
    assert (image.holds, image.pins, image.in_flight) == (1, 1, 0)
    image.unpin()
    assert (image.holds, image.pins) == (0, 0)
    assert fired == [True] and image.drained                          # drained by unpin itself, at once


def test_a_null_pointer_result_is_returned_as_it_is_and_holds_nothing(impl):
    ffi = cffi.FFI()
    image, slot, f = make(impl, {})
    null = ffi.NULL
    assert image.lease(null) is null
    assert (image.holds, image.pointer_results) == (0, 0)


def test_a_pointer_result_holds_its_image_until_it_is_freed(impl):
    ffi = cffi.FFI()
    drained_on = []
    image, slot, f = make(impl, {}, lambda: drained_on.append(threading.current_thread().name))
    pointer = image.lease(ffi.cast("void *", 0x1000))
    assert int(ffi.cast("uintptr_t", pointer)) == 0x1000
    assert image.pointer_results == 1
    # (The C gate on a GIL build keeps its leases in a list of the results, not in ``holds``.)
    assert image.holds == (0 if impl is gate.C and not gate._GIL_DISABLED else 1)
    slot.current = None
    image.retire()
    assert drained_on == [] and not image.drained
    del pointer
    gc.collect()
    assert (image.holds, image.pointer_results) == (0, 0)           # counted out as the cdata goes
    # The last lease may end inside the garbage collector, on any thread and under any lock:
    # the image is closed on the drain thread, never where the cdata was freed.
    wait_until(lambda: image.drained, "the drain thread to close the image")
    assert drained_on == ["nativereload-drain"]


# -- pausing (exclusive reloads) -------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_paused_gate_holds_new_calls_until_resumed_without_spinning(impl):
    resume = threading.Event()
    ran = []
    image, slot, f = make(impl, {"f": lambda: ran.append(True) or "ran"})
    image.pause(resume, lambda: None)
    results = []
    caller = threading.Thread(target=lambda: results.append(f()))
    caller.start()
    try:
        time.sleep(0.1)         # long enough for a wrongly admitted call to run, or a spinning one to loop
        assert ran == [] and caller.is_alive()
        if impl is not gate.C:
            # The waiting call counted itself in and out once (or twice, if it saw the pause late): a caller
            # that spins instead of waiting on ``resume`` would have counted thousands.
            assert gate._count_value(image._enters) <= 2
    finally:
        image.unpause()
        resume.set()
        caller.join(WAIT)
    assert results == ["ran"] and image.in_flight == 0


def test_wait_resumed_waits_only_while_paused(impl):
    resume = threading.Event()               # never set: a wait on it would last for ever
    image, slot, f = make(impl, {})
    image.wait_resumed()                      # never paused: returns at once
    image.pause(resume, lambda: None)
    image.unpause()
    image.wait_resumed()                      # paused once, not now: returns at once


@pytest.mark.timeout(60)
def test_a_paused_gate_reports_quiet_when_its_last_call_exits(impl, libc):
    first, second = Blocker(libc), Blocker(libc)
    image, slot, f = make(impl, {"first": first.read, "second": second.read})
    read_first = impl.Func(slot, "mod.first", "first", missing)
    read_second = impl.Func(slot, "mod.second", "second", missing)
    quiet = []
    callers = [threading.Thread(target=read, args=(blocker.rfd, blocker.ffi.new("char[1]"), 1))
               for read, blocker in ((read_first, first), (read_second, second))]
    for caller in callers:
        caller.start()
    try:
        wait_until(lambda: image.in_flight == 2, "both calls to block inside read()")
        image.pause(threading.Event(), lambda: quiet.append(image.in_flight))
        first.release()
        callers[0].join(WAIT)
        assert quiet == []                     # one call still in flight: not quiet yet
        second.release()
        callers[1].join(WAIT)
        assert quiet == [0]                    # the last one out says so, once
    finally:
        for blocker in (first, second):
            blocker.release()
        for caller in callers:
            caller.join(WAIT)
        first.close()
        second.close()


@pytest.mark.timeout(60)
def test_a_paused_gate_reports_quiet_when_a_call_with_a_policy_exits(impl, libc):
    # Functions that take or return objects exit through the gate's own exit step, not the plain fast path.
    blocker = Blocker(libc)
    image, slot, read = make(impl, {"read": blocker.read}, symbol="read")
    read.policy = impl.CallPolicy((), True, False, None, {}, lambda a, b: LookupError(), lambda g: LookupError())
    quiet = []
    caller = threading.Thread(target=read, args=(blocker.rfd, blocker.ffi.new("char[1]"), 1))
    caller.start()
    try:
        wait_until(lambda: image.in_flight == 1, "the call to block inside read()")
        image.pause(threading.Event(), lambda: quiet.append(image.in_flight))
        blocker.release()
        caller.join(WAIT)
        assert quiet == [0]
    finally:
        blocker.release()
        caller.join(WAIT)
        blocker.close()


def handle_policy(impl, table, on_released=lambda gate_: RuntimeError("released")):
    """A CallPolicy whose argument 0 is a handle routed through ``table``."""
    return impl.CallPolicy((0,), False, False, None, table, lambda a, b: RuntimeError("conflict"), on_released)


def test_a_handle_released_while_its_call_is_admitted_is_an_error(impl):
    if impl is gate.C:
        pytest.skip("the C gate reads the table as a dict: no lookup can be made to change in between")
    ffi = cffi.FFI()
    handle = ffi.new("int *")
    image, slot, f = make(impl, {"f": lambda h: "ran"})
    bound = impl.ImageGate({"f": lambda h: "ran on the handle's image"}, lambda: None)

    class ReleasedAfterFirstLookup(dict):
        looked_up = 0

        def get(self, key, default=None):
            self.looked_up += 1
            return bound if self.looked_up == 1 else None

    f.policy = handle_policy(impl, ReleasedAfterFirstLookup())
    with pytest.raises(RuntimeError, match="released"):
        f(handle)
    assert bound.in_flight == 0 and image.in_flight == 0       # counted out of the gate it was admitted to


@pytest.mark.timeout(60)
def test_a_call_on_a_handle_of_a_paused_image_waits_and_counts_out(impl):
    ffi = cffi.FFI()
    handle = ffi.new("int *")
    image, slot, f = make(impl, {"f": lambda h: "ran"})
    f.policy = handle_policy(impl, {handle: image})
    resume = threading.Event()
    image.pause(resume, lambda: None)
    results = []
    caller = threading.Thread(target=lambda: results.append(f(handle)))
    caller.start()
    try:
        wait_until(lambda: caller.is_alive(), "the caller to start")
        time.sleep(0.05)
        assert results == [] and image.in_flight == 0          # waiting, not inside, and counted out
        if impl is not gate.C:
            assert gate._count_value(image._enters) <= 2        # waiting on ``resume``, not spinning
    finally:
        image.unpause()
        resume.set()
        caller.join(WAIT)
    assert results == ["ran"] and image.in_flight == 0


# -- the drain thread ------------------------------------------------------------------------------------

class Drainable:
    """A stand-in for a gate on the drain thread: records when (and on which thread) it was tried."""

    def __init__(self):
        self.tried = []

    def try_drain(self):
        self.tried.append((time.monotonic(), threading.current_thread().name))


def test_a_later_drain_runs_once_after_the_recheck_delay():
    drains = gate._DeferredDrains()
    target = Drainable()
    asked = time.monotonic()
    drains.later(target)
    drains.later(target)                         # asked twice meanwhile: still tried once
    wait_until(lambda: target.tried, "the drain thread to try the gate")
    time.sleep(10 * drains.RECHECK_SECONDS)      # a gate left queued would be tried again meanwhile
    assert len(target.tried) == 1
    when, thread = target.tried[0]
    assert when - asked >= drains.RECHECK_SECONDS
    assert thread == "nativereload-drain"


def test_a_failing_drain_is_logged_and_the_thread_goes_on(caplog):
    drains = gate._DeferredDrains()
    target = Drainable()

    def failing():
        raise OSError("dlclose failed")

    with caplog.at_level("ERROR", logger="nativereload"):
        drains.call(failing)
        drains.submit(target)
        wait_until(lambda: target.tried, "the drain thread to go on after the error")
    assert [(record.name, record.getMessage()) for record in caplog.records] == [
        ("nativereload", "nativereload: closing a drained image failed")]      # the package's logger
    assert "dlclose failed" in caplog.text


def test_the_drain_thread_is_started_again_in_a_forked_child():
    script = """if True:
        import os, threading
        from nativereload import gate
        drains = gate._DeferredDrains()
        ran = threading.Event()
        drains.call(lambda: None)                # the parent's drain thread, now running
        pid = os.fork()
        if pid == 0:
            drains.call(ran.set)                 # in the child: that thread is not there
            os._exit(0 if ran.wait(30) else 1)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
    """
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
