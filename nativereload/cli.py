"""The ``nativereload`` command: build, reload, unload, status, ps, watch, demo, cdef, embed, check.

``main(argv=None) -> int`` is the whole CLI; tests call it directly. Commands
return an exit code or raise; only ``main`` turns exceptions into messages and
exit codes, and only ``main`` installs a logging handler.

Exit codes: 0 success, 1 the operation failed (including: no process reachable,
several candidates without a way to choose), 2 usage error (including: watch
with nothing to build). Errors go to stderr as ``error: ...`` then
``hint: ...``. With ``--json``, stdout carries exactly one JSON document
whatever happens: the result, or on failure
``{"ok": false, "error": {"type": ..., "message": ..., "hint": ...}}``; for
several processes (``--all``), a list with one entry per process. No
traceback reaches the user for an expected failure.

Targets (reload, unload, status): the rules are ``discovery.find_targets``'s
(``--socket``, ``--pid``, ``--name``, ``--all``; with none, the only live
process of this user). ``watch`` takes the same options, but with none it
reloads in every live process of this user that has the changed file loaded.
With ``--dask ADDRESS``, reload, unload and status act on every worker of that
Dask cluster instead (nativereload.dask; exit 1 if any worker failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

from . import __version__
from . import build as build_mod
from .control import client, discovery
from .control.discovery import Target
from .errors import ControlError, NativeReloadError
from .output import arrow, dash, print_error

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

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


class CLIError(Exception):
    """An expected failure: printed as ``error: message`` (+ ``hint:``); ``kind`` is its JSON ``type``."""

    def __init__(self, message: str, hint: str | None = None, code: int = EXIT_FAILED,
                 kind: str = "Error") -> None:
        super().__init__(message)
        self.hint = hint
        self.code = code
        self.kind = kind


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as ``error: ...`` + ``hint: ...``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(message, hint=f"`{self.prog} --help` shows the usage", code=EXIT_USAGE, kind="UsageError")


TARGET_RULES = """\
which process: --socket PATH, --pid PID, --name NAME (what it passed to reg.serve(name=...);
default: its program's name), or --all (every live process of yours; with --name, every
process of that name). With none of them, the only live process of yours is used; if
several are serving, the command fails and lists them (pid, name, command line)."""


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which process (rules below)")
    group.add_argument("--socket", metavar="PATH", help="the control socket of the process")
    group.add_argument("--pid", type=int, metavar="PID", help="the process with this pid")
    group.add_argument("--name", metavar="NAME", help="the process serving under this name")
    group.add_argument("--all", action="store_true", help="every live process of this user (or of --name)")


def _add_dask_options(parser: argparse.ArgumentParser, reload: bool = False) -> None:
    group = parser.add_argument_group('every worker of a Dask cluster instead (pip install "nativereload[dask]")')
    group.add_argument("--dask", metavar="ADDRESS", help="the scheduler's address, e.g. tcp://scheduler:8786")
    group.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="with --dask: seconds to wait for the scheduler, the module's lock and each round of "
                            "messages (default: 60)")
    if reload:
        group.add_argument("--file", metavar="PATH", help="the new build, sent to every worker (default: the file "
                           "the module was registered or last reloaded from)")
        group.add_argument("--rolling", action="store_true", help="a batch of workers at a time, stopping at the "
                           "first failure (default: all-or-nothing: every worker prepares it, then all switch)")
        group.add_argument("--batch", type=int, metavar="N", help="with --rolling: workers per batch (default: 1)")
        group.add_argument("--rollback", action="store_true",
                           help="with --rolling: after a failure, take the workers already switched back")


def _add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as one JSON document on stdout (failures too)")


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("building C files without a project (with FILE arguments)")
    group.add_argument("-o", "--output-dir", default="build/modules", metavar="DIR",
                       help="where NAME.so goes (default: build/modules)")
    group.add_argument("--name", dest="module_name", metavar="NAME",
                       help="the module's name (default: the first file's name without .c)")
    group.add_argument("-I", dest="include_dirs", action="append", default=[], metavar="DIR",
                       help="add an include directory (repeatable)")
    group.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME[=VALUE]",
                       help="define a macro (repeatable)")
    group.add_argument("-L", dest="library_dirs", action="append", default=[], metavar="DIR",
                       help="add a library directory (repeatable)")
    group.add_argument("-l", dest="libraries", action="append", default=[], metavar="LIB",
                       help="link a library (repeatable)")
    group.add_argument("--cflags", default="", metavar="FLAGS", help="more compiler flags, e.g. --cflags=-O0")
    group.add_argument("--ldflags", default="", metavar="FLAGS", help="more linker flags")
    group.add_argument("--interface", metavar="HEADER",
                       help="embed HEADER's declarations in the module: it then loads with no cdef, and a reload "
                            "that would change them under the caller is refused")


def _subcommand(sub: Any, name: str, summary: str, description: str, examples: str,
                targets: bool = False) -> argparse.ArgumentParser:
    epilog = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ")
    if targets:
        epilog += "\n\n" + TARGET_RULES
    # Raw: the examples keep their lines; the description is wrapped here.
    parser = sub.add_parser(name, help=summary, description=textwrap.fill(description, width=88), epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    # Also after the command (nativereload build x.c -v); SUPPRESS keeps a -v given before it.
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (repeat for debug)")
    return parser


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nativereload", description="Build C modules and hot-reload them in running processes.",
                epilog="`nativereload COMMAND --help` describes a command, with examples.")
    p.add_argument("--version", action="version", version=f"nativereload {__version__}")
    p.add_argument("--cmake-dir", action="store_true",
                   help="print the directory of the CMake helper (nativereload_add_module) and exit")
    p.add_argument("--include-dir", action="store_true",
                   help="print the directory of nativereload.h (for -I) and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    b = _subcommand(sub, "build", "build modules: C files directly, or the CMake project",
                    "Build modules. With FILE arguments: compile them into one module, DIR/NAME.so, with the "
                    "flags reloading needs (no project needed; skipped when nothing changed). Without: configure "
                    "the CMake project on first use and build it incrementally. Either way each module file is "
                    "written by rename, complete.", """
                    nativereload build counter.c                      # -> build/modules/counter.so
                    nativereload build a.c b.c --name counter -I include -DVERSION=2 -lm
                    nativereload build                                # the CMake project in .
                    nativereload build --source-dir proj --build-dir proj/build --target counter""")
    b.add_argument("files", nargs="*", metavar="FILE", help="C (or C++) files to compile into one module")
    _add_compile_options(b)
    cmake = b.add_argument_group("building a CMake project (no FILE arguments)")
    cmake.add_argument("--source-dir", default=".", help="the CMake project (default: .)")
    cmake.add_argument("--build-dir", default="build", help="the build directory (default: build)")
    cmake.add_argument("--target", help="build only this CMake target")
    cmake.add_argument("--config", default="RelWithDebInfo", help="CMake build type (default: RelWithDebInfo)")
    b.add_argument("--force", action="store_true", help="rebuild FILEs even if nothing changed")
    _add_json(b)

    r = _subcommand(sub, "reload", "reload a loaded module in running process(es)",
                    "Reload a module a running process has loaded: it loads a fresh copy of the file the module "
                    "was loaded from and switches new calls to it; calls in flight finish on the old image. A "
                    "refused reload leaves the old version serving.", """
                    nativereload reload counter
                    nativereload reload counter --name api --all --json
                    nativereload build && nativereload reload counter --dask tcp://scheduler:8786""", targets=True)
    r.add_argument("module", help="the module name, as the process loaded it")
    r.add_argument("--allow-interface-change", action="store_true",
                   help="accept a new build whose interface changes a function or a type incompatibly (refused "
                        "otherwise); says what changed")
    r.add_argument("--canary", action="store_true",
                   help="first load the new build in a separate process (constructors, init, selftest): a crash "
                        "or failure there refuses the reload before the serving process loads it")
    _add_target_options(r)
    _add_dask_options(r, reload=True)
    _add_json(r)

    rb = _subcommand(sub, "rollback", "reload the previous build a running process kept",
                     "Reload the build a module served before (the registry keeps the last Registry(history=N), "
                     "default 1) as a new generation, with the same checks and hooks as a reload.", """
                     nativereload rollback counter
                     nativereload rollback counter --to 3 --pid 4242""", targets=True)
    rb.add_argument("module", help="the module name, as the process loaded it")
    rb.add_argument("--to", type=int, metavar="GENERATION", help="the generation whose build to bring back "
                    "(default: the last one kept)")
    _add_target_options(rb)
    _add_json(rb)

    u = _subcommand(sub, "unload", "unload a module in running process(es)",
                    "Unload a module in a running process: new calls raise ModuleUnloaded, calls in flight "
                    "finish first.", """
                    nativereload unload counter --pid 4242""", targets=True)
    u.add_argument("module", help="the module name, as the process loaded it")
    _add_target_options(u)
    _add_dask_options(u)
    _add_json(u)

    s = _subcommand(sub, "status", "modules, generations and images of running process(es)",
                    "Show a running process's modules: generation, images (active, retired and draining, "
                    "leaked) with their calls in flight, and what became of older generations.", """
                    nativereload status
                    nativereload status --all --json
                    nativereload status --dask tcp://scheduler:8786""", targets=True)
    _add_target_options(s)
    _add_dask_options(s)
    _add_json(s, "the status")

    ps = _subcommand(sub, "ps", "list the live processes of yours that serve, with their modules",
                     "List every live process of yours that called reg.serve(): pid, name, modules and "
                     "generations, command line. Sockets of processes that died are removed on the way.", """
                     nativereload ps
                     nativereload ps --json""")
    _add_json(ps, "the list")

    w = _subcommand(sub, "watch", "rebuild on source changes and reload the changed modules",
                    "Build now, then after every change, and reload each module the build changed in every "
                    "process that has it loaded from that file. With FILE arguments it compiles them (as "
                    "`build FILE...` does) and watches their directory; otherwise it builds the CMake project. "
                    "Editors' temporary files are ignored. A failed build or reload is reported, the old code "
                    "keeps serving, and watching goes on. Stop with Ctrl-C.", """
                    nativereload watch counter.c
                    nativereload watch --source-dir proj --build-dir proj/build --name api""", targets=True)
    w.add_argument("files", nargs="*", metavar="FILE", help="C files to compile into one module")
    _add_compile_options(w)
    wc = w.add_argument_group("watching a CMake project (no FILE arguments)")
    wc.add_argument("--source-dir", default=".", help="the CMake project (default: .)")
    wc.add_argument("--build-dir", default="build", help="the build directory (default: build)")
    wc.add_argument("--config", default="RelWithDebInfo", help="CMake build type (default: RelWithDebInfo)")
    w.add_argument("--interval", type=float, default=0.5, help="polling interval in seconds when watchfiles "
                   "is not installed or --poll is given (default: 0.5)")
    w.add_argument("--poll", action="store_true", help="poll even if watchfiles is installed (file systems "
                   "without inotify)")
    # --name is the module's name here; the target's name is --process.
    wt = w.add_argument_group("target (default: every process that has the built file loaded)")
    wt.add_argument("--socket", metavar="PATH", help="the control socket of the process")
    wt.add_argument("--pid", type=int, metavar="PID", help="the process with this pid")
    wt.add_argument("--process", metavar="NAME", help="the processes serving under this name")

    d = _subcommand(sub, "demo", "build a sample module, reload it under load, and report",
                    "Build a sample module into a temporary directory, call it from several threads, rebuild "
                    "and reload it while they call, with one call held inside the old image across the reload, "
                    "and report: calls served and failed (0), and whether the old image drained once the held "
                    "call returned.", """
                    nativereload demo
                    nativereload demo --threads 8 --seconds 3 --json""")
    d.add_argument("--threads", type=int, default=4, help="calling threads (default: 4)")
    d.add_argument("--seconds", type=float, default=1.0, help="seconds of calls before and after the reload "
                   "(default: 1)")
    _add_json(d, "the report (the live lines go to stderr)")
    _add_interface_parsers(sub)
    return p


def _add_interface_parsers(sub: Any) -> None:
    def header_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("header", help="the C header")
        parser.add_argument("-I", dest="include_dirs", action="append", default=[], metavar="DIR",
                            help="add DIR to the header search path (repeatable)")
        parser.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME[=VALUE]",
                            help="define a macro while reading the header (repeatable)")
        parser.add_argument("--compiler", metavar="CC", help="the C compiler that preprocesses (default: $CC, "
                            "else cc)")
        parser.add_argument("--also", action="append", default=[], metavar="GLOB",
                            help="the declarations of included headers matching GLOB (a path or file name "
                                 "pattern, e.g. 'z3_*.h') count as the header's own too (repeatable)")

    c = _subcommand(sub, "cdef", "print a cffi cdef made from a C header (a third-party library's)",
                    "Make a cdef cffi parses from a real C header: the compiler preprocesses it, and what cffi "
                    "cannot take is dropped, each with its reason in the cdef's last comment.", """
                    nativereload cdef /usr/include/zlib.h --library /usr/lib/x86_64-linux-gnu/libz.so.1
                    nativereload cdef include/counter.h -I include -o counter.cdef""")
    header_options(c)
    c.add_argument("--library", metavar="FILE", help="also report the declared functions FILE does not export")
    c.add_argument("-o", "--output", metavar="FILE", help="write the cdef to FILE (default: stdout)")

    e = _subcommand(sub, "embed", "write a C file that embeds a header's interface in the module it is "
                    "compiled into",
                    "Write a C file that, compiled into a module, embeds the interface of HEADER in it (the ELF "
                    "section .nativereload.interface), so that a reload can be checked against the serving "
                    "module's before it is loaded.", """
                    nativereload embed counter.h -o counter_interface.c""")
    header_options(e)
    e.add_argument("-o", "--output", metavar="FILE.c", required=True, help="the C file to write")
    e.add_argument("--depfile", metavar="FILE", help="also write the files the header read, Makefile style")

    k = _subcommand(sub, "check", "compare the interfaces embedded in two builds: exit 0 if a reload would "
                    "be accepted, 1 if refused, 2 if a file has no interface",
                    "Compare the interfaces embedded in two builds of a module, without loading either: exit 0 "
                    "if a reload from OLD to NEW would be accepted, 1 if it would be refused, 2 if a file has no "
                    "embedded interface.", """
                    nativereload check build-1.0/counter.so build/modules/counter.so
                    nativereload check old.so new.so --json""")
    k.add_argument("old", help="the serving (released) build of the module")
    k.add_argument("new", help="the new build")
    _add_json(k, "the difference")


# --------------------------------------------------------------------------- targets

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


def _emit_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _error_doc(kind: str, message: str, hint: str | None) -> dict:
    return {"ok": False, "error": {"type": kind, "message": message, "hint": hint}}


# --------------------------------------------------------------------------- commands

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
        _emit_json(entries if args.all else entries[0])
    return EXIT_OK if ok else EXIT_FAILED


def cmd_reload(args: argparse.Namespace) -> int:
    if _dask_wanted(args):
        return _dask_command(args)

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
    if _dask_wanted(args):
        return _dask_command(args)
    return _each_target(args, "unload", f"unload of {args.module!r}", lambda target, reply: (
        f"{target.label}: unloaded {args.module!r} (generation {reply['generation']} draining)"),
        module=args.module)


def cmd_status(args: argparse.Namespace) -> int:
    if _dask_wanted(args):
        return _dask_command(args)
    first = [True]

    def table(target: Target, reply: dict) -> str:
        text = ("" if first[0] else "\n") + format_status(reply, str(target.path))
        first[0] = False
        return text

    return _each_target(args, "status", "status", table)


def _dask_wanted(args: argparse.Namespace) -> bool:
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


def _dask_command(args: argparse.Namespace) -> int:
    """reload, unload or status on every worker of the cluster at ``--dask`` (nativereload.dask)."""
    try:
        from distributed import Client

        from . import dask as nrdask
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
                _emit_json(nrdask.status_json(statuses))
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
                _emit_json(exc.report.to_json())
            else:
                print(exc.report.table(sys.stdout))
            print_error(str(exc), exc.hint)
            return EXIT_FAILED
    if args.json:
        _emit_json(report.to_json())
    else:
        print(report.table(sys.stdout))
    return EXIT_OK


def format_status(reply: dict, socket_path: str) -> str:
    """A readable table of one process's status reply."""
    name = f" [{reply['name']}]" if reply.get("name") else ""
    lines = [f"pid {reply.get('pid')}{name}  ({socket_path})"]
    modules = reply.get("modules") or []
    if not modules:
        lines.append("  no modules loaded")
        return "\n".join(lines)
    rows = [("MODULE", "GEN", "CALLS", "IMAGE", "STATE", "IN FLIGHT", "PATH")]
    for m in modules:
        images = m.get("images") or [{}]
        for i, image in enumerate(images):
            first = i == 0
            rows.append((m["name"] if first else "", str(m.get("generation")) if first else "",
                         _calls(m) if first else "", str(image.get("generation", "-")), image.get("state", "-"),
                         str(image.get("in_flight", "-")), (m.get("path") or "") if first else ""))
    lines += _columns(rows)
    for m in modules:
        note = _old_images_note(m)
        if note:
            lines.append(f"  {m['name']}: {note}")
    return "\n".join(lines)


def _calls(module: dict) -> str:
    """How the module's calls are made: "compiled", "compiling", "gate" or "python" (older servers: "-")."""
    return module.get("calls") or "-"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows aligned in columns (the last one left ragged), indented by two spaces."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([row[c].ljust(widths[c]) for c in range(len(widths))] + [row[-1]]).rstrip()
            for row in rows]


def _old_images_note(module: dict) -> str | None:
    """What became of a module's earlier generations, e.g. "old images drained (generation 1)".

    The reply lists only images not yet closed, and generations count
    successful loads: an earlier generation that is not listed has drained
    and closed.
    """
    images = module.get("images") or []
    generation = module.get("generation")
    if not isinstance(generation, int):
        return None
    listed = {i.get("generation") for i in images}
    active = [i.get("generation") for i in images if i.get("state") == "active"]
    newest = active[0] if active else generation + 1  # unloaded: every listed image is old
    closed = [g for g in range(1, newest) if g not in listed]
    draining = [i for i in images if i.get("state") == "retired"]
    parts = []
    for image in draining:
        # e.g. "generation 1: retired — 0 calls, 2 handles (sqlite3 *), 1 pin"
        held_by = image.get("held_by") or f"{image.get('in_flight') or 0} call(s)"
        parts.append(f"generation {image.get('generation')}: retired {dash(sys.stdout)} {held_by}")
    if len(closed) == 1:
        parts.append(f"old image drained (generation {closed[0]})")
    elif closed:
        contiguous = closed == list(range(closed[0], closed[-1] + 1))
        span = f"{closed[0]}-{closed[-1]}" if contiguous else ", ".join(map(str, closed))
        parts.append(f"old images drained (generations {span})")
    return "; ".join(parts) or None


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
        _emit_json(entries)
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
    print("\n".join(line[2:] for line in _columns(rows)))
    return EXIT_OK


def _compile_kwargs(args: argparse.Namespace) -> dict:
    import shlex

    return {"name": args.module_name, "include_dirs": args.include_dirs, "defines": args.defines,
            "libraries": args.libraries, "library_dirs": args.library_dirs,
            "cflags": shlex.split(args.cflags), "ldflags": shlex.split(args.ldflags),
            "interface": getattr(args, "interface", None)}


def cmd_build(args: argparse.Namespace) -> int:
    # Compiler and CMake output go to stderr, so that stdout holds only the result (or the JSON document).
    if args.files:
        if args.target:
            raise CLIError("--target is for a CMake project; with FILE arguments there is one module",
                           hint="drop --target, or drop the FILE arguments", code=EXIT_USAGE, kind="UsageError")
        result = build_mod.compile_sources(args.files, args.output_dir, force=args.force, **_compile_kwargs(args))
    else:
        result = build_mod.build(args.source_dir, args.build_dir, target=args.target, config=args.config)
    if args.json:
        _emit_json({"ok": True, "seconds": result.seconds, "configured": result.configured,
                    "built": [{"name": m.name, "path": str(m.path)} for m in result.built],
                    "modules": [{"name": m.name, "path": str(m.path)} for m in result.modules]})
        return EXIT_OK
    for m in result.built:
        print(f"built {m.name}: {m.path}")
    if not result.built:
        if result.modules:
            print(f"up to date: {', '.join(f'{m.name} ({m.path})' for m in result.modules)}")
        else:
            print(f"built, but found no module files (use nativereload_add_module() in CMakeLists.txt, or put "
                  f"the libraries in {Path(args.build_dir) / 'modules'})")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from . import watch

    if args.files:
        missing = [f for f in args.files if not Path(f).is_file()]
        if missing:
            raise CLIError(f"no such file: {', '.join(missing)}", hint="pass the C files to compile",
                           code=EXIT_USAGE, kind="UsageError")
        kwargs = _compile_kwargs(args)

        def builder(output: Any) -> build_mod.BuildResult:
            return build_mod.compile_sources(args.files, args.output_dir, output=output, **kwargs)

        source_dir = Path(args.files[0]).absolute().parent
        module = (args.module_name or Path(args.files[0]).stem) + ".so"
        what = f"{', '.join(args.files)} -> {Path(args.output_dir).absolute() / module}"
        build_dir = Path(args.output_dir)
    else:
        # Fail early on a usage problem rather than after a build.
        if not Path(args.source_dir).is_dir():
            raise CLIError(f"source directory {args.source_dir} does not exist",
                           hint="run from your project's directory or pass --source-dir", code=EXIT_USAGE,
                           kind="UsageError")
        if not (Path(args.source_dir) / "CMakeLists.txt").is_file():
            raise CLIError(f"nothing to build: no CMakeLists.txt in {Path(args.source_dir).absolute()} and no "
                           "C files given", hint="nativereload watch FILE.c (C files, no project), or run from "
                           "your CMake project's directory (or pass --source-dir)", code=EXIT_USAGE,
                           kind="UsageError")

        def builder(output: Any) -> build_mod.BuildResult:
            return build_mod.build(args.source_dir, args.build_dir, config=args.config, output=output)

        source_dir = Path(args.source_dir)
        what = f"CMake project {Path(args.source_dir).absolute()} -> {Path(args.build_dir).absolute()}"
        build_dir = Path(args.build_dir)
    if args.socket is not None or args.pid is not None or args.process is not None:
        _watch_targets(args)      # no such process: say so now, not after the first build
    try:
        watch.watch_sources(source_dir, build_dir, builder=builder, what=what, interval=args.interval,
                            poll=args.poll, targets=lambda: _watch_targets(args))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return EXIT_OK


def _watch_targets(args: argparse.Namespace) -> list[Target]:
    """Targets for one round of ``watch``: re-discovered each time (processes come and go)."""
    try:
        if args.socket is not None or args.pid is not None or args.process is not None:
            return discovery.find_targets(socket=args.socket, pid=args.pid, name=args.process, every=True)
        return discovery.discover(describe_each=True)
    except ControlError as exc:
        raise CLIError(str(exc), hint=exc.hint, kind="ControlError") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    # With --json the live report goes to stderr: stdout carries only the JSON document.
    report = demo.run(threads=args.threads, seconds=args.seconds, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        _emit_json(report)
    return EXIT_OK if report["ok"] else EXIT_FAILED


# --------------------------------------------------------------------------- interfaces: cdef, embed, check

def cmd_cdef(args: argparse.Namespace) -> int:
    from . import cdefgen

    result = cdefgen.cdef_from_header(args.header, args.include_dirs, args.defines, compiler=args.compiler,
                                      also=args.also)
    if args.output:
        cdefgen._write_atomically(Path(args.output), result.text)
    else:
        sys.stdout.write(result.text)
    if result.dropped:
        print(f"note: {len(result.dropped)} declaration(s) left out: "
              + ", ".join(name for name, _ in result.dropped) + " (the cdef's last comment says why)",
              file=sys.stderr)
    if args.library:
        missing = cdefgen.unexported(result.functions, args.library)
        if missing:
            print(f"note: {len(missing)} of the {len(result.functions)} declared functions are not exported by "
                  f"{args.library}: {', '.join(missing)}", file=sys.stderr)
            print("hint: load it with missing=\"lazy\" (calling one of them raises SymbolError), or delete their "
                  "declarations", file=sys.stderr)
        else:
            print(f"note: {args.library} exports all {len(result.functions)} declared functions", file=sys.stderr)
    return EXIT_OK


def cmd_embed(args: argparse.Namespace) -> int:
    from . import cdefgen

    embedded = cdefgen.embed_header(args.header, args.output, args.include_dirs, args.defines,
                                    compiler=args.compiler, depfile=args.depfile, also=args.also)
    print(f"wrote {args.output}: the interface of {args.header} ({len(embedded.functions)} function(s), "
          f"{len(embedded.types)} type(s), {len(embedded.constants)} constant(s); digest {embedded.digest[:12]})")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from . import interface

    found = []
    for path in (args.old, args.new):
        try:
            embedded = interface.read(path)
        except (OSError, NativeReloadError) as exc:
            raise CLIError(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}",
                           hint="pass the paths of two built modules", code=EXIT_USAGE,
                           kind=type(exc).__name__) from None
        if embedded is None:
            raise CLIError(f"{path} has no embedded interface",
                           hint="build it with nativereload_add_module(NAME SOURCES ... INTERFACE header.h), or "
                                "compile in the file `nativereload embed header.h -o FILE.c` writes",
                           code=EXIT_USAGE, kind="NoInterface")
        found.append(embedded)
    difference = interface.diff(found[0], found[1])
    if args.json:
        _emit_json({"ok": True, "old": {"path": args.old, "digest": found[0].digest},
                    "new": {"path": args.new, "digest": found[1].digest}, **difference.to_json()})
    else:
        verdict = "a reload would be accepted" if difference.compatible else "a reload would be refused"
        print(f"{args.old} {arrow(sys.stdout)} {args.new}: {difference.summary()}: {verdict}")
        if difference:
            print(difference.render(indent="  "))
    return EXIT_OK if difference.compatible else EXIT_FAILED


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "build": cmd_build, "reload": cmd_reload, "rollback": cmd_reload, "unload": cmd_unload, "status": cmd_status, "ps": cmd_ps,
    "watch": cmd_watch, "demo": cmd_demo, "cdef": cmd_cdef, "embed": cmd_embed, "check": cmd_check,
}


def _install_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("nativereload")
    root.addHandler(handler)
    root.setLevel(level)


def _fail(json_mode: bool, kind: str, message: str, hint: str | None, code: int) -> int:
    print_error(message, hint)
    if json_mode:
        _emit_json(_error_doc(kind, message, hint))
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except CLIError as exc:
        # The arguments did not parse, so whether --json was meant is read from them as given.
        return _fail("--json" in argv, exc.kind, str(exc), exc.hint, exc.code)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    json_mode = bool(getattr(args, "json", False))
    if args.cmake_dir:
        print(build_mod.cmake_dir())
        return EXIT_OK
    if args.include_dir:
        from .cdefgen import include_dir

        print(include_dir())
        return EXIT_OK
    if not args.command:
        return _fail(json_mode, "UsageError", "no command given", "`nativereload --help` lists the commands",
                     EXIT_USAGE)
    own_handler = not logging.getLogger("nativereload").handlers
    if own_handler:
        _install_logging(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except CLIError as exc:
        return _fail(json_mode, exc.kind, str(exc), exc.hint, exc.code)
    except NativeReloadError as exc:
        return _fail(json_mode, type(exc).__name__, str(exc), getattr(exc, "hint", None), EXIT_FAILED)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILED
    except OSError as exc:
        # The environment refused something (a directory we cannot read or
        # create, a full disk): an expected failure, reported without a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(json_mode, "OSError", f"{exc.strerror or exc}{where}",
                     "check the paths and permissions involved; -v logs more", EXIT_FAILED)
    finally:
        if own_handler:
            root = logging.getLogger("nativereload")
            for h in list(root.handlers):
                root.removeHandler(h)
