"""What the cluster operations return: a ClusterReport per reload or unload, a WorkerStatus per worker.

Plain data and its formatting (``table()``, ``to_json()``, ``status_table``, ``status_json``):
nothing here talks to the cluster. ``cluster.py`` builds these from the workers' answers.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, NamedTuple

from ..output import arrow
from ..registry import ModuleStatus


# --------------------------------------------------------------------------- a reload's or an unload's report

class WorkerResult(NamedTuple):
    """What a cluster reload or unload did on one worker.

    Attributes:
        address: the worker's address.
        state: "switched" (serves the new build), "caught up" (joined during the reload and was
            switched after it), "refused" (could not take the build: see error), "aborted" (prepared,
            then aborted because another worker refused), "not reached" (a rolling reload stopped
            before it), "rolled back", "unloaded", or "failed" (no answer, or a commit that failed).
        generation_before, generation_after: the module's generation there (None: not loaded).
        seconds: the time the worker spent on it (None: it was not asked).
        error: why it refused or failed ("Type: message"), else None.
    """

    address: str
    state: str
    generation_before: int | None
    generation_after: int | None
    seconds: float | None
    error: str | None = None


_GOOD = ("switched", "caught up", "unloaded")


class ClusterReport:
    """The outcome of a cluster reload or unload: one :class:`WorkerResult` per worker.

    Attributes:
        module: the module's name.
        mode: "all-or-nothing", "rolling" or "unload".
        workers: the per-worker results, sorted by address (workers that joined meanwhile last).
        ok: every worker is on the new build (or unloaded it).
        seconds: from the call (lock included) to the last commit (or the end, when it failed).
        commit_window: all-or-nothing: the commit round as the client saw it, during which some
            workers serve the new build and some the old; None otherwise.
        commit_spread: all-or-nothing: the first to the last commit by the workers' own clocks
            (meaningful when their clocks agree, e.g. on one host); None otherwise.
        sha256: the SHA-256 of the build that was sent (None for unload).
    """

    def __init__(self, module: str, mode: str, workers: Iterable[WorkerResult], *, seconds: float,
                 commit_window: float | None = None, commit_spread: float | None = None,
                 sha256: str | None = None) -> None:
        self.module = module
        self.mode = mode
        self.workers = list(workers)
        self.seconds = seconds
        self.commit_window = commit_window
        self.commit_spread = commit_spread
        self.sha256 = sha256
        self.ok = bool(self.workers) and all(w.state in _GOOD for w in self.workers)

    def __repr__(self) -> str:
        return f"<nativereload.dask.ClusterReport {self.summary()}>"

    def count(self, state: str) -> int:
        return sum(w.state == state for w in self.workers)

    def summary(self) -> str:
        """One line: what happened, on how many workers, in how long."""
        n, took = len(self.workers), _ms(self.seconds)
        what = f"'{self.module}' on {n} worker{'s' * (n != 1)}"
        if self.mode == "unload":
            return f"unloaded {what} in {took}" if self.ok else \
                f"unload of {what} failed on {n - self.count('unloaded')} in {took}"
        if self.ok:
            window = f"; commits within {_ms(self.commit_window)}" if self.commit_window is not None else ""
            return f"reloaded {what} ({self.mode}) in {took}{window}"
        if self.mode == "all-or-nothing":
            return (f"reload of {what} refused by {n - self.count('aborted')} (all-or-nothing): no worker switched; "
                    f"{took}")
        counts = ", ".join(f"{self.count(s)} {s}" for s in ("switched", "refused", "failed", "rolled back",
                                                            "not reached") if self.count(s))
        return f"rolling reload of {what} stopped: {counts}; {took}"

    def table(self, stream: Any = None) -> str:
        """The summary, then one row per worker: address, generation before → after, state, time, error."""
        to = arrow(stream if stream is not None else sys.stdout)
        rows = [("WORKER", "GENERATION", "STATE", "TIME", "ERROR")]
        for w in self.workers:
            error = (w.error or "").partition("\n")[0]
            rows.append((w.address, f"{_gen(w.generation_before)} {to} {_gen(w.generation_after)}", w.state,
                         _ms(w.seconds), error if len(error) <= 160 else error[:157] + "..."))
        return "\n".join([self.summary(), *_columns(rows)])

    __str__ = table

    def to_json(self) -> dict:
        """The report as one JSON-able document (what ``--json`` prints)."""
        return {"ok": self.ok, "module": self.module, "mode": self.mode, "summary": self.summary(),
                "sha256": self.sha256, "seconds": self.seconds, "commit_window": self.commit_window,
                "commit_spread": self.commit_spread, "workers": [w._asdict() for w in self.workers]}


def _failure_message(report: ClusterReport) -> str:
    lines = [report.summary()]
    for w in report.workers:
        if w.error:
            lines.append(f"  {w.address} {w.state}: {w.error}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- every worker's status

class WorkerStatus(NamedTuple):
    """One worker's modules, as :func:`status` saw them.

    Attributes:
        address: the worker's address.
        modules: its ``Registry.status()``: the same ModuleStatus as locally.
        error: why the worker did not answer ("Type: message"), else None.
    """

    address: str
    modules: list[ModuleStatus]
    error: str | None = None


def status_table(statuses: list[WorkerStatus]) -> str:
    """The statuses as a table: one row per image, with the build (sha256) each worker serves."""
    rows = [("WORKER", "MODULE", "GEN", "IMAGE", "STATE", "IN FLIGHT", "SHA256", "HELD BY")]
    for s in statuses:
        if s.error:
            rows.append((s.address, "?", "", "", "", "", "", s.error.partition("\n")[0]))
        elif not s.modules:
            rows.append((s.address, "-", "", "", "", "", "", "no modules loaded"))
        for m in s.modules:
            for n, i in enumerate(m.images):
                rows.append((s.address if n == 0 else "", m.name if n == 0 else "", str(m.generation) if n == 0 else "",
                             str(i.generation), i.state, str(i.in_flight), i.sha256, i.held_by))
    return "\n".join(line[2:] for line in _columns(rows))


def status_json(statuses: list[WorkerStatus]) -> list[dict]:
    """The statuses as JSON-able dicts (what ``nativereload status --dask --json`` prints)."""
    return [{"address": s.address, "ok": s.error is None, "error": s.error,
             "modules": [{**m._asdict(), "images": [{**i._asdict(), "handles": dict(i.handles)} for i in m.images]}
                         for m in s.modules]} for s in statuses]


# --------------------------------------------------------------------------- formatting

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _gen(generation: int | None) -> str:
    return "-" if generation is None else str(generation)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([row[c].ljust(widths[c]) for c in range(len(widths))] + [row[-1]]).rstrip()
            for row in rows]
