"""The client side: reload, unload and status across every worker of a Dask cluster.

Each operation is a few rounds of messages (:func:`_run`: one plugin operation on many workers
through ``Client.run``, an answer from each); reload and unload hold the module's cluster-wide
lock (:func:`_exclusive`) for all their rounds. A build every worker switched to is published in
the scheduler's metadata (:func:`_publish`), where a worker that joins later finds it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
import uuid
from types import MappingProxyType
from typing import Any, Iterable

import distributed

from ..errors import ClusterReloadError, ModuleNotFound
from ..registry import ImageStatus, ModuleStatus
from .plugin import _EXPIRY_MARGIN, _METADATA, _Build, _worker_op
from .report import ClusterReport, WorkerResult, WorkerStatus, _failure_message

logger = logging.getLogger("nativereload")

MODES = ("all-or-nothing", "rolling")
_PLUGIN_WAIT = 5.0               # how long an operation on a worker that just joined waits for its plugin


def reload(client: distributed.Client, name: str, file: str | os.PathLike | bytes | None = None, *,
           mode: str = "all-or-nothing", batch: int = 1, rollback: bool = False, canary: bool | str = False,
           cdef: str | None = None, allow_interface_change: bool = False, timeout: float = 60.0) -> ClusterReport:
    """Reload module ``name`` in every worker of ``client``'s cluster; return the report.

    Args:
        file: the new build (a path on this machine, or its bytes); default: the file the module
            was registered or last reloaded from, read again here.
        mode: "all-or-nothing" (prepare on every worker, then commit everywhere or abort
            everywhere), or "rolling" (``batch`` workers at a time, prepare + commit, stopping at
            the first failure).
        rollback: rolling only: after a failure, take the workers already switched back.
        canary: passed to each worker's ``Registry.prepare``: the build is tried in a crash canary
            process on each worker first (True, or "package.module:function" to call there).
        cdef, allow_interface_change: as for ``Registry.reload``.
        timeout: seconds to wait for the module's lock, and for each round of messages.

    Returns:
        the ClusterReport (``.ok`` is True: every worker serves the new build).

    Raises:
        ClusterReloadError: a worker refused or failed (``.report`` says which and why; in
            all-or-nothing mode no worker switched), or the lock was not free within ``timeout``.
        ModuleNotFound, LoadError: ``file`` cannot be read. ValueError: bad mode, batch or rollback.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if int(batch) < 1:
        raise ValueError(f"batch must be at least 1, not {batch!r}")
    if rollback and mode != "rolling":
        raise ValueError("rollback is for mode='rolling': an all-or-nothing reload never leaves a worker switched")
    started = time.perf_counter()
    options = {"allow_interface_change": allow_interface_change, "canary": canary}
    with _exclusive(client, name, timeout):
        workers = _workers(client, name)
        described = None
        if file is None or mode == "rolling":
            described = _run(client, workers, "describe", timeout)
        if file is None:
            file = _recorded_source(name, described)
        build = _Build.read(name, file, cdef)
        if mode == "rolling":
            report = _rolling(client, build, workers, described, int(batch), rollback, options, timeout, started)
        else:
            report = _all_or_nothing(client, build, workers, options, timeout, started)
    logger.info("%s", report.summary())
    if not report.ok:
        if report.count("switched"):
            hint = ("the workers marked switched serve the new build, the others the old one: fix the build and "
                    "reload again, or pass rollback=True (--rollback) to take them back")
        else:
            hint = "every worker serves its previous build: fix the build (or the workers that refused it), then " \
                   "reload again"
        raise ClusterReloadError(_failure_message(report), module=name, report=report, hint=hint)
    return report


def _all_or_nothing(client: Any, build: _Build, workers: list[str], options: dict, timeout: float,
                    started: float) -> ClusterReport:
    reload_id = uuid.uuid4().hex
    name = build.name
    prepared = _run(client, workers, "prepare", timeout, name=name, build=build, reload_id=reload_id,
                    expire=timeout + _EXPIRY_MARGIN, **options)
    if not all(a["ok"] for a in prepared.values()):
        aborted = _run(client, workers, "abort", timeout, name=name, reload_id=reload_id)
        rows = []
        for w in workers:
            p = prepared[w]
            if p["ok"]:
                a = aborted[w]
                error = None if a["ok"] else f"abort failed: {a['error']}"
                rows.append(WorkerResult(w, "aborted", p["generation_before"], p["generation_before"],
                                         p["seconds"] + (a["seconds"] or 0.0), error))
            else:
                rows.append(WorkerResult(w, "refused", p.get("generation_before"), p.get("generation_before"),
                                         p.get("seconds"), p["error"]))
        return ClusterReport(name, "all-or-nothing", rows, seconds=time.perf_counter() - started,
                             sha256=build.sha256)
    round_started = time.perf_counter()
    committed = _run(client, workers, "commit", timeout, name=name, reload_id=reload_id)
    window = time.perf_counter() - round_started
    rows = []
    for w in workers:
        p, c = prepared[w], committed[w]
        if c["ok"]:
            rows.append(WorkerResult(w, "switched", p["generation_before"], c["generation"],
                                     p["seconds"] + c["seconds"]))
        else:
            rows.append(WorkerResult(w, "failed", p["generation_before"], c.get("generation"), c.get("seconds"),
                                     f"commit failed: {c['error']}"))
    seconds = time.perf_counter() - started
    times = [c["committed_at"] for c in committed.values() if c["ok"]]
    if all(c["ok"] for c in committed.values()):
        _publish(client, build, committed.values())
        rows += _catch_up(client, build, workers, options, timeout)
    return ClusterReport(name, "all-or-nothing", rows, seconds=seconds, commit_window=window,
                         commit_spread=max(times) - min(times) if times else None, sha256=build.sha256)


def _rolling(client: Any, build: _Build, workers: list[str], described: dict, batch: int, rollback: bool,
             options: dict, timeout: float, started: float) -> ClusterReport:
    name = build.name
    rows: dict[str, WorkerResult] = {}
    for w in workers:
        d = described[w]
        generation = (d.get("modules") or {}).get(name, {}).get("generation") if d["ok"] else None
        rows[w] = WorkerResult(w, "not reached", generation, generation, None)
    switched: dict[str, dict] = {}       # worker -> its answer
    last = started
    for first in range(0, len(workers), batch):
        group = workers[first:first + batch]
        answers = _run(client, group, "reload", timeout, name=name, build=build, **options)
        last = time.perf_counter()
        for w in group:
            a = answers[w]
            if a["ok"]:
                rows[w] = WorkerResult(w, "switched", a["generation_before"], a["generation"], a["seconds"])
                switched[w] = a
            else:
                rows[w] = WorkerResult(w, "refused", a.get("generation_before", rows[w].generation_before),
                                       a.get("generation", rows[w].generation_before), a["seconds"], a["error"])
        if len(switched) < first + len(group):
            break
    if len(switched) == len(workers):
        _publish(client, build, switched.values())
        caught_up = _catch_up(client, build, workers, options, timeout)
        return ClusterReport(name, "rolling", [*rows.values(), *caught_up], seconds=last - started,
                             sha256=build.sha256)
    if rollback and switched:
        answers = _run(client, list(switched), "rollback", timeout, name=name)
        for w in switched:
            a = answers[w]
            before = rows[w]
            rows[w] = (WorkerResult(w, "rolled back", before.generation_before, a["generation"],
                                    before.seconds + a["seconds"]) if a["ok"] else
                       before._replace(error=f"rollback failed: {a['error']}"))
    return ClusterReport(name, "rolling", rows.values(), seconds=time.perf_counter() - started, sha256=build.sha256)


def _catch_up(client: Any, build: _Build, known: list[str], options: dict, timeout: float) -> list[WorkerResult]:
    """Bring workers that joined during the reload (and may have loaded the build before) to the new one.

    The new build is already published: a worker that joins from now on loads it by itself.
    """
    joined = sorted(set(client.nthreads()) - set(known))
    if not joined:
        return []
    described = _run(client, joined, "describe", timeout, wait_for_plugin=_PLUGIN_WAIT)
    rows = []
    behind = []
    for w in joined:
        d = described[w]
        serving = (d.get("modules") or {}).get(build.name) if d["ok"] else None
        if serving is not None and serving["sha256"] == build.sha256:
            rows.append(WorkerResult(w, "caught up", serving["generation"], serving["generation"], d["seconds"]))
        else:
            behind.append(w)
    answers = _run(client, behind, "reload", timeout, name=build.name, build=build, **options) if behind else {}
    for w, a in answers.items():
        rows.append(WorkerResult(w, "caught up", a["generation_before"], a["generation"], a["seconds"]) if a["ok"]
                    else WorkerResult(w, "failed", a.get("generation_before"), a.get("generation"), a["seconds"],
                                      f"joined during the reload, and then: {a['error']}"))
    return rows


def unload(client: distributed.Client, name: str, *, timeout: float = 60.0) -> ClusterReport:
    """Unload module ``name`` in every worker (calls in flight finish first); later workers do not load it.

    Raises:
        ClusterReloadError: a worker failed to unload it (``.report``), or the lock was not free in time.
    """
    started = time.perf_counter()
    with _exclusive(client, name, timeout):
        workers = _workers(client, name)
        answers = _run(client, workers, "unload", timeout, name=name)
        tokens = {a["token"] for a in answers.values() if a["ok"]}
        for token in tokens:
            client.set_metadata([_METADATA, token, name], None)
    rows = [WorkerResult(w, "unloaded", a["generation_before"], None, a["seconds"]) if a["ok"] else
            WorkerResult(w, "failed", a.get("generation_before"), a.get("generation"), a["seconds"], a["error"])
            for w, a in answers.items()]
    report = ClusterReport(name, "unload", rows, seconds=time.perf_counter() - started)
    if not report.ok:
        raise ClusterReloadError(_failure_message(report), module=name, report=report,
                                 hint="`nativereload status --dask ADDRESS` shows what each worker has loaded")
    logger.info("%s", report.summary())
    return report


def status(client: distributed.Client, *, timeout: float = 60.0) -> list[WorkerStatus]:
    """Every worker's ``Registry.status()``, sorted by address."""
    answers = _run(client, sorted(client.nthreads()), "status", timeout)
    result = []
    for address, a in answers.items():
        if not a["ok"]:
            result.append(WorkerStatus(address, [], a["error"]))
            continue
        modules = [ModuleStatus(**{**m, "images": [ImageStatus(**{**i, "handles": MappingProxyType(i["handles"])})
                                                   for i in m["images"]]}) for m in a["modules"]]
        result.append(WorkerStatus(address, modules))
    return result


# --------------------------------------------------------------------------- internals

@contextlib.contextmanager
def _exclusive(client: Any, name: str, timeout: float) -> Any:
    """Hold the cluster-wide lock of module ``name`` (a Dask Lock on the scheduler)."""
    lock = distributed.Lock(f"nativereload:{name}", scheduler_rpc=client.scheduler, loop=client.loop)
    if not lock.acquire(timeout=timeout):
        raise ClusterReloadError(
            f"module '{name}': another cluster reload or unload of it held its lock (nativereload:{name}) for "
            f"{timeout:g} s", module=name, hint="wait for it to finish and try again, or pass a longer timeout")
    try:
        yield
    finally:
        try:
            lock.release()
        except Exception:      # the lease expired (the scheduler thought we were gone): nothing to release
            logger.warning("the lock nativereload:%s was no longer held when released", name, exc_info=True)
        # Its lease-refreshing callback runs on the client's loop, which keeps it (and the lock) alive.
        refresh = getattr(lock, "refresh_callback", None)
        if refresh is not None:
            client.loop.add_callback(refresh.stop)


def _workers(client: Any, name: str) -> list[str]:
    workers = sorted(client.nthreads())
    if not workers:
        raise ClusterReloadError(f"module '{name}': the cluster has no workers", module=name,
                                 hint="start workers (or wait for them), then try again")
    return workers


def _run(client: Any, workers: list[str], op: str, timeout: float, **kwargs: Any) -> dict[str, dict]:
    """One round of messages: ``op`` on each of ``workers`` through ``Client.run``; an answer for each.

    The arguments are pickled once; the scheduler sends them to every worker concurrently.
    """
    try:
        answers = client.run(_worker_op, op, kwargs, workers=list(workers), on_error="return",
                             callback_timeout=timeout)
    except (TimeoutError, asyncio.TimeoutError):
        answers = {}
        missing = f"no answer within {timeout:g} s"
    else:
        missing = "no answer (the worker left the cluster?)"
    result = {}
    for w in workers:
        a = answers.get(w)
        if isinstance(a, dict):
            result[w] = a
        elif isinstance(a, BaseException):
            result[w] = {"ok": False, "error": f"{type(a).__name__}: {a}", "seconds": None}
        else:
            result[w] = {"ok": False, "error": missing, "seconds": None}
    return result


def _publish(client: Any, build: _Build, committed: Iterable[dict]) -> None:
    """Make ``build`` the one workers that join later load (scheduler metadata, per plugin token).

    ``committed``: the workers' answers, with their plugin's token and the cdef the build was loaded with.
    """
    published = set()
    for answer in committed:
        key = (answer["token"], answer["cdef"])
        if key not in published:
            published.add(key)
            client.set_metadata([_METADATA, answer["token"], build.name], build._replace(cdef=answer["cdef"])._asdict())


def _recorded_source(name: str, described: dict[str, dict]) -> str:
    sources = collections.Counter(d["modules"][name]["source"] for d in described.values()
                      if d["ok"] and name in d["modules"] and d["modules"][name]["source"])
    if not sources:
        raise ClusterReloadError(f"module '{name}': no file given, and no worker knows which file it was loaded "
                                 "from", module=name, hint="pass the new build: file=PATH (--file PATH)")
    source = sources.most_common(1)[0][0]
    if not os.path.isfile(source):
        raise ModuleNotFound(f"module '{name}' was loaded from {source}, which is not a file on this machine — "
                             "pass the new build: file=PATH (--file PATH)", module=name, searched=(source,))
    return source
