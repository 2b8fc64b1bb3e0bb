"""The commands that talk to running processes: reload, rollback, unload, status, ps.

Which processes: ``resolve_targets`` (``discovery.find_targets``'s rules).
Each request goes through ``control.client``; a process that does not answer
becomes an ``ok: false`` reply like a server's refusal, so one failing target
does not hide the others' results. With ``--dask``, reload, unload and status
go to ``cluster`` instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from ..control import client, discovery
from ..control.discovery import Target
from ..errors import ControlError
from ..output import arrow, dash, print_error
from .cluster import dask_command, dask_wanted
from .outcome import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, emit_json
from .tables import columns, format_status

_HINTS = {
    "ModuleNotLoaded": "`nativereload status` lists the modules that process has loaded",
    "SymbolError": "the old version keeps serving; rebuild with the symbol exported, then reload again",
    "LoadError": "the old version keeps serving; rebuild the module (`nativereload build`) and reload again",
    "ModuleNotFound": "the old version keeps serving; build the module first (`nativereload build`)",
    "InterfaceError": "the old version keeps serving; keep the old declarations (add new functions instead), "
                      "or accept the change with --allow-interface-change",
    "ReloadPending": "the process has prepared a reload of this module; it must commit() or abort() it first",
    "CanaryFailed": "the old version keeps serving and never loaded the new build; fix the crash or failure "
                    "the canary reports, rebuild, and reload again",
    "InitRefused": "the old version keeps serving; the module's nativereload_init() said why above",
}


def resolve_targets(args: argparse.Namespace) -> list[Target]:
    """The processes a command addresses (``discovery.find_targets``); CLIError when none, or too many."""
    ways = [opt for opt, value in (("--socket", args.socket), ("--pid", args.pid), ("--name", args.name))
            if value is not None]
    if len(ways) > 1 or (args.all and ways and ways != ["--name"]):
        raise CLIError(f"choose the process one way, not with {' and '.join(ways + ['--all'] * args.all)}",
                       hint="use one of --socket, --pid, --name, --all (only --name combines with --all)",
                       code=EXIT_USAGE, kind="UsageError")
    try:
        return discovery.find_targets(socket=args.socket, pid=args.pid, name=args.name, every=args.all)
    except ControlError as exc:
        raise CLIError(str(exc), hint=exc.hint, kind="ControlError") from None


def _ask(target: Target, op: str, **fields: Any) -> dict:
    """One request; a transport failure becomes an ``ok: false`` reply like the server's."""
    try:
        return client.request(target.path, op, **fields)
    except ControlError as exc:
        return {"ok": False, "pid": target.pid, "error": {"type": "ControlError", "message": str(exc),
                                                          "hint": exc.hint}}


def _report_failure(target: Target, reply: dict, what: str) -> None:
    err = reply.get("error") or {}
    kind = err.get("type", "Error")
    print_error(f"{target.label}: {what} failed: {kind}: {err.get('message', '')}",
                err.get("hint") or _HINTS.get(kind))


def _each_target(args: argparse.Namespace, op: str, what: str, describe: Callable[[Target, dict], str],
                 **fields: Any) -> int:
    """Send ``op`` to every target; print ``describe(target, reply)`` (or JSON) for each."""
    entries = []
    ok = True
    for target in resolve_targets(args):
        reply = _ask(target, op, **fields)
        reply.setdefault("socket", str(target.path))
        entries.append(reply)
        if not reply.get("ok"):
            ok = False
            _report_failure(target, reply, what)
        elif not args.json:
            print(describe(target, reply))
    if args.json:
        emit_json(entries if args.all else entries[0])
    return EXIT_OK if ok else EXIT_FAILED


def cmd_reload(args: argparse.Namespace) -> int:
    if dask_wanted(args):
        return dask_command(args)

    def describe(target: Target, reply: dict) -> str:
        verb = "rolled back" if args.command == "rollback" else "reloaded"
        lines = [f"{target.label}: {verb} {args.module!r} generation {reply['generation_before']} "
                 f"{arrow(sys.stdout)} {reply['generation']} in {reply['seconds'] * 1000:.1f} ms"]
        change = reply.get("interface_change")
        if change:
            verb = "interface grew" if change.get("compatible") else "interface CHANGED (allowed)"
            lines.append(f"{verb}: {change.get('summary')}")
            lines += [f"  {line}" for line in str(change.get("text", "")).splitlines()]
        since = reply.get("unchanged_since")
        if since is not None:
            file = os.path.basename(reply.get("path") or args.module)
            lines.append(f"note: {file} is unchanged since generation {since} {dash(sys.stdout)} did the build "
                         "fail?")
        return "\n".join(lines)

    fields: dict[str, Any] = {"module": args.module}
    if getattr(args, "allow_interface_change", False):
        fields["allow_interface_change"] = True
    if getattr(args, "canary", False):
        fields["canary"] = True
    if args.command == "rollback":
        fields = {"module": args.module} if args.to is None else {"module": args.module, "generation": args.to}
        return _each_target(args, "rollback", f"rollback of {args.module!r}", describe, **fields)
    return _each_target(args, "reload", f"reload of {args.module!r}", describe, **fields)


def cmd_unload(args: argparse.Namespace) -> int:
    if dask_wanted(args):
        return dask_command(args)
    return _each_target(args, "unload", f"unload of {args.module!r}", lambda target, reply: (
        f"{target.label}: unloaded {args.module!r} (generation {reply['generation']} draining)"),
        module=args.module)


def cmd_status(args: argparse.Namespace) -> int:
    if dask_wanted(args):
        return dask_command(args)
    first = [True]

    def table(target: Target, reply: dict) -> str:
        text = ("" if first[0] else "\n") + format_status(reply, str(target.path))
        first[0] = False
        return text

    return _each_target(args, "status", "status", table)


def cmd_ps(args: argparse.Namespace) -> int:
    try:
        live = discovery.discover(describe_each=True)
    except ControlError as exc:
        raise CLIError(str(exc), hint=exc.hint, kind="ControlError") from None
    entries = []
    for target in live:
        reply = _ask(target, "status")
        entries.append({"pid": target.pid, "name": target.name, "argv": list(target.argv),
                        "socket": str(target.path), "ok": bool(reply.get("ok")),
                        "modules": [{"name": m.get("name"), "generation": m.get("generation"),
                                     "path": m.get("path")} for m in reply.get("modules") or []],
                        **({} if reply.get("ok") else {"error": reply.get("error")})})
    if args.json:
        emit_json(entries)
        return EXIT_OK
    if not entries:
        where = " or ".join(str(d) for d in discovery.socket_dirs()) or str(discovery.default_socket_dir())
        print(f"no nativereload process of yours is serving (looked in {where})", file=sys.stderr)
        return EXIT_OK
    rows = [("PID", "NAME", "MODULES", "COMMAND")]
    for e in entries:
        if e["ok"]:
            modules = ", ".join(f"{m['name']}@{m['generation']}" for m in e["modules"]) or "-"
        else:
            modules = f"? ({(e.get('error') or {}).get('message', 'no answer')})"
        rows.append((str(e["pid"]), e["name"] or "?", modules, " ".join(" ".join(e["argv"]).split())))
    print("\n".join(line[2:] for line in columns(rows)))
    return EXIT_OK
