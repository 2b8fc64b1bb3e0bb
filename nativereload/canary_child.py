"""The canary process's side (canary.py starts it): load a build, run its init and selftest, report.

    python -S canary_child.py REQUEST.json      (no checkout or site-packages needed)
    python -m nativereload.canary_child REQUEST.json   (with canary="package.module:function")

With no callable to run, this needs nothing but the standard library:
ctypes dlopens the file (its constructors run), calls ``nativereload_init``
with no state and ``nativereload_selftest``, so the canary costs little more
than an interpreter start-up. With a callable, it loads the file through a
nativereload Registry (init runs there) and calls the function with the
Module. Either way it prints one report line and leaves with ``os._exit``:
the library's destructors and fini do not run here.
"""

import ctypes
import json
import os
import sys
import traceback

REPORT = "nativereload-canary-report "


class Context(ctypes.Structure):
    """nativereload_context, as nativereload.h declares it (tests check the layout against the compiler's)."""

    _fields_ = [("size", ctypes.c_uint), ("module", ctypes.c_char_p), ("generation", ctypes.c_ulong),
                ("previous_generation", ctypes.c_ulong), ("state", ctypes.c_void_p),
                ("state_version", ctypes.c_ulong), ("adopted", ctypes.c_int), ("reason", ctypes.c_int),
                ("error", ctypes.c_char * 256)]


def load_plain(request: dict) -> int | None:
    """dlopen, init, selftest with ctypes; return the selftest's result (None if it has none)."""
    library = ctypes.CDLL(request["path"], mode=os.RTLD_NOW | os.RTLD_LOCAL)
    init = getattr(library, "nativereload_init", None)
    if init is not None:
        init.argtypes = [ctypes.POINTER(Context)]
        init.restype = ctypes.c_int
        context = Context(size=ctypes.sizeof(Context), module=request["module"].encode(), generation=1)
        code = init(ctypes.byref(context))
        if code != 0:
            message = context.error.decode(errors="replace")
            raise RuntimeError(f"nativereload_init() refused (returned {code})" + (f": {message}" if message else ""))
    selftest = getattr(library, "nativereload_selftest", None)
    if selftest is None:
        return None
    selftest.restype = ctypes.c_int
    return int(selftest())


def load_registry(request: dict) -> int | None:
    """Load through a nativereload Registry and call the requested function with the Module."""
    import importlib

    from nativereload.registry import Registry

    registry = Registry(tmpdir=request["tmpdir"], held_warning=None, history=0)
    module = registry.load(request["module"], cdef=request["cdef"], file=request["path"],
                           missing=request["missing"])
    result = module._active.hooks.run_selftest()
    if result in (None, 0):
        target, _, function = request["call"].partition(":")
        if not target or not function:
            raise ValueError(f"canary={request['call']!r} is not 'package.module:function'")
        getattr(importlib.import_module(target), function)(module)
    return result


def main(request_path: str) -> None:
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    report = {"selftest": None, "error": None}
    sys.path[:0] = [entry for entry in request.get("sys_path", []) if entry not in sys.path]
    try:
        report["selftest"] = load_registry(request) if request.get("call") else load_plain(request)
    except BaseException as exc:     # reported; the serving process decides
        report["error"] = traceback.format_exception_only(type(exc), exc)[-1].strip()
        traceback.print_exc()
    sys.stdout.write(REPORT + json.dumps(report) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
