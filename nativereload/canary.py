"""The crash canary: try a new build in a separate process before the serving process loads it.

``check(path, ...)`` starts a fresh interpreter (never a fork of the serving
process, which has other threads: a forked child of a threaded process may
deadlock on a lock one of them held), which loads the file through its own
Registry -- the library's constructors run, then its ``nativereload_init``
hook with no state handed over -- calls ``nativereload_selftest()`` if the
library exports it, and then, if asked, a Python callable named as
``"package.module:function"`` with the loaded Module. Anything but a clean
pass refuses the reload with CanaryFailed naming what happened: the signal
that killed the canary, the selftest's non-zero result, the last line of a
traceback, or a timeout; the canary's stderr tail is attached.

    python -m nativereload.canary REQUEST.json     (what check() runs)

The canary exits with ``os._exit`` after reporting, so the library's
destructors and fini hook do not run there: it tests loading and working,
not unloading.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from .errors import CanaryFailed

__all__ = ["DEFAULT_TIMEOUT", "check"]

DEFAULT_TIMEOUT = 30.0
"""Seconds a canary may take (start-up, load, init, selftest, callable)."""
_REPORT = "nativereload-canary-report "
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(path: str, *, module: str, cdef: str | None, missing: str = "error", call: str | None = None,
          timeout: float | None = None, refused: str = "reload refused") -> float:
    """Load ``path`` as module ``module`` in a canary process; return the seconds it took.

    Args:
        cdef: the declarations to load it with (None: the interface the file embeds).
        call: "package.module:function", called with the loaded Module in the canary.
        timeout: seconds (default DEFAULT_TIMEOUT).
        refused: what a failure means for the caller, for the message.

    Raises:
        CanaryFailed: the canary crashed, its selftest or callable failed, or it timed out.
    """
    started = time.perf_counter()
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    with tempfile.TemporaryDirectory(prefix="nativereload-canary-") as work:
        request = os.path.join(work, "request.json")
        with open(request, "w", encoding="utf-8") as out:
            # The caller's sys.path, so that canary="package.module:function" imports there as it does here.
            json.dump({"path": path, "module": module, "cdef": cdef, "missing": missing, "call": call,
                       "tmpdir": work, "sys_path": [os.path.abspath(entry or os.curdir) for entry in sys.path]}, out)
        env = dict(os.environ)
        # The same nativereload as ours, wherever it is installed (or a checkout on sys.path).
        env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run([sys.executable, "-m", "nativereload.canary", request], capture_output=True,
                                  text=True, errors="replace", timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                                  cwd=work)
        except subprocess.TimeoutExpired as exc:
            tail = _tail(exc.stderr)
            raise CanaryFailed(
                f"module '{module}': the canary loading {path} did not finish within {timeout:g} s ({refused}; the "
                f"serving process never loaded it){_with(tail)} — a constructor, nativereload_init or "
                "nativereload_selftest hangs: fix it, or pass a longer canary timeout", module=module, path=path,
                timed_out=True, stderr=tail) from None
    seconds = time.perf_counter() - started
    tail = _tail(proc.stderr)
    report = _report(proc.stdout)
    if proc.returncode < 0:
        name = _signal_name(-proc.returncode)
        raise CanaryFailed(
            f"module '{module}': the canary loading {path} was killed by {name} ({refused}; the serving process "
            f"never loaded it){_with(tail)} — the library crashes in a constructor, nativereload_init or "
            "nativereload_selftest: fix it and rebuild", module=module, path=path, signal=name, stderr=tail)
    if report is None:
        raise CanaryFailed(
            f"module '{module}': the canary loading {path} exited with status {proc.returncode} without a report "
            f"({refused}){_with(tail)} — see its stderr", module=module, path=path, stderr=tail)
    if report.get("selftest") not in (None, 0):
        result = report["selftest"]
        raise CanaryFailed(
            f"module '{module}': nativereload_selftest() of {path} returned {result} in the canary ({refused}; "
            "the serving process never loaded it) — it must return 0: fix what it checks and rebuild",
            module=module, path=path, selftest=result, stderr=tail)
    if report.get("error"):
        error = report["error"]
        raise CanaryFailed(
            f"module '{module}': the canary loading {path} failed: {error} ({refused}; the serving process never "
            f"loaded it){_with(tail)}", module=module, path=path, error=error, stderr=tail)
    return seconds


def _with(tail: str) -> str:
    last = [line for line in tail.splitlines() if line.strip()][-3:]
    return f"; its stderr ends: {' | '.join(last)}" if last else ""


def _tail(text: Any, lines: int = 20) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def _report(stdout: str) -> dict | None:
    for line in reversed((stdout or "").splitlines()):
        if line.startswith(_REPORT):
            try:
                return json.loads(line[len(_REPORT):])
            except ValueError:
                return None
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _run(request_path: str) -> None:
    """The canary's side: load, init, selftest, callable; report one JSON line on stdout."""
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    report: dict[str, Any] = {"selftest": None, "error": None}
    sys.path[:0] = [entry for entry in request.get("sys_path", []) if entry not in sys.path]
    try:
        from .registry import Registry

        registry = Registry(tmpdir=request["tmpdir"], held_warning=None, history=0)
        module = registry.load(request["module"], cdef=request["cdef"], file=request["path"],
                               missing=request["missing"])
        report["selftest"] = module._active.hooks.run_selftest()
        if request["call"] and report["selftest"] in (None, 0):
            target, _, function = request["call"].partition(":")
            if not target or not function:
                raise ValueError(f"canary={request['call']!r} is not 'package.module:function'")
            import importlib

            getattr(importlib.import_module(target), function)(module)
    except BaseException as exc:     # reported; the parent decides
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        report["error"] = last
        traceback.print_exc()
    sys.stdout.write(_REPORT + json.dumps(report) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _run(sys.argv[1])
