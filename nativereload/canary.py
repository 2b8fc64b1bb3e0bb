"""The crash canary: try a new build in a separate process before the serving process loads it.

``check(path, ...)`` starts a fresh interpreter (never a fork of the serving
process, which has other threads: a forked child of a threaded process may
deadlock on a lock one of them held) running canary_child.py, which loads
the file -- the library's constructors run, then its ``nativereload_init``
hook with no state handed over -- calls ``nativereload_selftest()`` if the
library exports it, and then, if asked, a Python callable named as
``"package.module:function"`` with the loaded Module. Anything but a clean
pass refuses the reload with CanaryFailed naming what happened: the signal
that killed the canary, the selftest's non-zero result, the last line of a
traceback, or a timeout; the canary's stderr tail is attached.

Without a callable the child needs only the standard library (``python -S``,
ctypes): the canary costs about an interpreter start-up. The canary exits
with ``os._exit`` after reporting, so the library's destructors and fini hook
do not run there: it tests loading and working, not unloading.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from .errors import CanaryFailed

__all__ = ["DEFAULT_TIMEOUT", "check"]

DEFAULT_TIMEOUT = 30.0
"""Seconds a canary may take (start-up, load, init, selftest, callable)."""
_REPORT = "nativereload-canary-report "
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "canary_child.py")


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
        if call:
            # The same nativereload as ours, wherever it is installed (or a checkout on sys.path).
            env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            command = [sys.executable, "-m", "nativereload.canary_child", request]
        else:
            command = [sys.executable, "-S", _CHILD, request]    # stdlib only: no site-packages to import
        try:
            proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout,
                                  env=env, stdin=subprocess.DEVNULL, cwd=work)
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
