"""reload, unload and status on every worker of a Dask cluster (``--dask ADDRESS``).

The work is ``nativereload.dask``'s; this module reads the options, reaches
the scheduler and prints the report. ``distributed`` is imported only when
``--dask`` is given, so the CLI runs without it.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import NativeReloadError
from ..output import print_error
from .outcome import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, emit_json


def dask_wanted(args: argparse.Namespace) -> bool:
    """Whether reload/unload/status address a Dask cluster (--dask); usage errors for options that need it."""
    dask = getattr(args, "dask", None)
    options = [("--file", getattr(args, "file", None) is not None), ("--rolling", getattr(args, "rolling", False)),
               ("--batch", getattr(args, "batch", None) is not None), ("--rollback", getattr(args, "rollback", False))]
    given = [option for option, present in options if present]
    usage = None
    if dask is None and given:
        usage = f"{given[0]} is for a Dask cluster: add --dask SCHEDULER_ADDRESS"
    elif dask is not None:
        local = [opt for opt, value in (("--socket", args.socket), ("--pid", args.pid), ("--name", args.name),
                                        ("--all", args.all)) if value]
        if local:
            usage = f"--dask reaches every worker of the cluster: drop {' and '.join(local)}"
        elif ("--batch" in given or "--rollback" in given) and "--rolling" not in given:
            usage = f"{'--batch' if '--batch' in given else '--rollback'} is for --rolling"
    if usage:
        raise CLIError(usage, hint=f"`nativereload {args.command} --help` shows the options", code=EXIT_USAGE,
                       kind="UsageError")
    return dask is not None


def dask_command(args: argparse.Namespace) -> int:
    """reload, unload or status on every worker of the cluster at ``--dask`` (nativereload.dask)."""
    try:
        from distributed import Client

        from .. import dask as nrdask
    except ImportError as exc:
        raise CLIError(str(exc), hint='pip install "nativereload[dask]" (here and on every worker)',
                       kind="ImportError") from None
    try:
        client = Client(args.dask, timeout=args.timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise CLIError(f"cannot reach the Dask scheduler at {args.dask}: {exc}",
                       hint="check the address (tcp://HOST:8786) and that the scheduler runs", kind="ControlError") \
            from None
    with client:
        if args.command == "status":
            statuses = nrdask.status(client, timeout=args.timeout)
            if args.json:
                emit_json(nrdask.status_json(statuses))
            else:
                print(nrdask.status_table(statuses))
            return EXIT_FAILED if any(s.error for s in statuses) else EXIT_OK
        try:
            if args.command == "unload":
                report = nrdask.unload(client, args.module, timeout=args.timeout)
            else:
                report = nrdask.reload(client, args.module, args.file, mode="rolling" if args.rolling else
                                       "all-or-nothing", batch=args.batch or 1, rollback=args.rollback,
                                       canary=args.canary, allow_interface_change=args.allow_interface_change,
                                       timeout=args.timeout)
        except NativeReloadError as exc:
            if getattr(exc, "report", None) is None:
                raise
            # The report is the result (stdout, or the one JSON document); what failed goes to stderr.
            if args.json:
                emit_json(exc.report.to_json())
            else:
                print(exc.report.table(sys.stdout))
            print_error(str(exc), exc.hint)
            return EXIT_FAILED
    if args.json:
        emit_json(report.to_json())
    else:
        print(report.table(sys.stdout))
    return EXIT_OK
