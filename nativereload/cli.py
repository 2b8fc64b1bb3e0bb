"""The ``nativereload`` command: build, reload, status, unload, watch, demo, cdef, embed, check.

``main(argv=None) -> int`` is the whole CLI; tests call it directly. Helpers
return values or raise; only ``main`` turns outcomes into exit codes, and only
``main`` installs a logging handler.

Exit codes: 0 success, 1 the operation failed (including: no process reachable,
several candidates without --pid/--all), 2 usage error. Errors go to stderr as
``error: ...`` then ``hint: ...``; with ``--json`` stdout carries exactly one
JSON document (for several targets, a list with one entry per process). No
traceback reaches the user for an expected failure.

Targets (reload, status, unload): ``--socket PATH``, ``--pid PID``, ``--all``
(every live process of this user), or, with none of them, the only live
process of this user. ``watch`` takes the same options, but with none of them
it reloads in every live process of this user that has the changed file
loaded: processes start and stop during a watch session, and the file's path
already says which ones run this build.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable

from . import build as build_mod
from . import control
from .errors import NativeReloadError

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
}


def arrow(stream: Any) -> str:
    """"\u2192" where the stream can encode it, else "->" (PYTHONIOENCODING=ascii must not crash a reload report)."""
    try:
        "\u2192".encode(getattr(stream, "encoding", None) or "ascii")
    except (LookupError, UnicodeEncodeError):
        return "->"
    return "\u2192"


class CLIError(Exception):
    """An expected failure: printed as ``error: message`` (+ ``hint:``), exit 1."""

    def __init__(self, message: str, hint: str | None = None, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.hint = hint
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as ``error: ...`` + ``hint: ...``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(message, hint=f"`{self.prog} --help` shows the usage", code=EXIT_USAGE)


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--socket", metavar="PATH", help="the control socket of the process")
    group.add_argument("--pid", type=int, metavar="PID", help="the process with this pid (its default socket)")
    group.add_argument("--all", action="store_true", help="every live process of this user")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nativereload", description="Build C modules and hot-reload them in running processes.")
    p.add_argument("--cmake-dir", action="store_true",
                   help="print the directory of the CMake helper (nativereload_add_module) and exit")
    p.add_argument("--include-dir", action="store_true",
                   help="print the directory of nativereload.h (for -I) and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    b = sub.add_parser("build", help="configure (first time) and build the C modules with CMake")
    b.add_argument("--source-dir", default=".", help="the CMake project (default: .)")
    b.add_argument("--build-dir", default="build", help="the build directory (default: build)")
    b.add_argument("--target", help="build only this CMake target")
    b.add_argument("--config", default="RelWithDebInfo", help="CMake build type (default: RelWithDebInfo)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")

    r = sub.add_parser("reload", help="reload a loaded module in running process(es)")
    r.add_argument("module", help="the module name, as the process loaded it")
    _add_target_options(r)
    r.add_argument("--json", action="store_true", help="print the result as JSON")

    u = sub.add_parser("unload", help="unload a module in running process(es)")
    u.add_argument("module", help="the module name, as the process loaded it")
    _add_target_options(u)
    u.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser("status", help="modules, generations and images of running process(es)")
    _add_target_options(s)
    s.add_argument("--json", action="store_true", help="print the status as JSON")

    w = sub.add_parser("watch", help="rebuild on source changes and reload the changed modules")
    w.add_argument("--source-dir", default=".", help="the CMake project (default: .)")
    w.add_argument("--build-dir", default="build", help="the build directory (default: build)")
    w.add_argument("--config", default="RelWithDebInfo", help="CMake build type (default: RelWithDebInfo)")
    w.add_argument("--interval", type=float, default=0.5, help="polling interval in seconds when watchfiles "
                   "is not installed (default: 0.5)")
    w.add_argument("--poll", action="store_true", help="poll even if watchfiles is installed (file systems "
                   "without inotify)")
    _add_target_options(w)

    d = sub.add_parser("demo", help="build a sample module, reload it under load, and report")
    d.add_argument("--threads", type=int, default=4, help="calling threads (default: 4)")
    d.add_argument("--seconds", type=float, default=1.0, help="seconds of calls before and after the reload")
    d.add_argument("--json", action="store_true", help="print the report as JSON (the live lines go to stderr)")
    _add_interface_parsers(sub)
    return p


# --------------------------------------------------------------------------- targets

def resolve_targets(args: argparse.Namespace) -> list[control.Target]:
    """The processes a command addresses; CLIError when none (or too many) are reachable."""
    if args.socket:
        path = Path(args.socket)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise CLIError(f"no control socket at {path}", hint="is the process running, and did it call "
                           "reg.serve()?") from None
        except OSError as exc:
            raise CLIError(f"cannot reach {path}: {exc.strerror or exc}",
                           hint="the socket may belong to another user; run as that user") from None
        if not stat.S_ISSOCK(mode):
            raise CLIError(f"{path} is not a socket", hint="pass the path a process's reg.serve() printed "
                           "(Server.path), or use --pid PID")
        return [control.Target(None, path)]
    directory = control.default_socket_dir()
    try:
        live = control.discover()
    except control.ControlError as exc:
        raise CLIError(str(exc), hint=exc.hint) from None
    if args.pid is not None:
        for target in live:
            if target.pid == args.pid:
                return [target]
        raise CLIError(f"process {args.pid} has no live control socket in {directory}",
                       hint=_candidates_hint(live) or "is it running, and did it call reg.serve()?")
    if not live:
        raise CLIError(f"no nativereload process of this user is serving (looked in {directory})",
                       hint="call reg.serve() in your program; the socket directory comes from "
                            "XDG_RUNTIME_DIR, else TMPDIR (it must match between your program and this shell)")
    if args.all or len(live) == 1:
        return live
    raise CLIError(f"{len(live)} processes are serving: " + ", ".join(f"pid {t.pid}" for t in live),
                   hint="choose one with --pid PID (or --socket PATH), or address them all with --all")


def _candidates_hint(live: list[control.Target]) -> str | None:
    if not live:
        return None
    return "live processes: " + ", ".join(f"pid {t.pid}" for t in live)


def _label(target: control.Target, reply: dict | None = None) -> str:
    pid = (reply or {}).get("pid", target.pid)
    return f"pid {pid}" if pid is not None else str(target.path)


def _ask(target: control.Target, op: str, **fields: Any) -> dict:
    """One request; a transport failure becomes an ``ok: false`` reply like the server's."""
    try:
        return control.request(target.path, op, **fields)
    except control.ControlError as exc:
        return {"ok": False, "pid": target.pid, "error": {"type": "ControlError", "message": str(exc),
                                                          "hint": exc.hint}}


def _print_error(message: str, hint: str | None = None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _report_failure(target: control.Target, reply: dict, what: str) -> None:
    err = reply.get("error") or {}
    kind = err.get("type", "Error")
    _print_error(f"{_label(target, reply)}: {what} failed: {kind}: {err.get('message', '')}",
                 err.get("hint") or _HINTS.get(kind))


def _emit_json(entries: list[dict], several: bool) -> None:
    doc: Any = entries if several else entries[0]
    print(json.dumps(doc, indent=2))


# --------------------------------------------------------------------------- commands

def _module_op(args: argparse.Namespace, op: str, describe: Callable[[dict], str]) -> int:
    """Send ``op`` on ``args.module`` to every target; print ``describe(reply)`` (or JSON) for each."""
    entries = []
    ok = True
    for target in resolve_targets(args):
        reply = _ask(target, op, module=args.module)
        reply.setdefault("socket", str(target.path))
        entries.append(reply)
        if not reply.get("ok"):
            ok = False
            _report_failure(target, reply, f"{op} of {args.module!r}")
        elif not args.json:
            print(f"{_label(target, reply)}: {describe(reply)}")
    if args.json:
        _emit_json(entries, args.all)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_reload(args: argparse.Namespace) -> int:
    return _module_op(args, "reload", lambda reply: (
        f"reloaded {args.module!r} generation {reply['generation_before']} {arrow(sys.stdout)} "
        f"{reply['generation']} in {reply['seconds'] * 1000:.1f} ms"))


def cmd_unload(args: argparse.Namespace) -> int:
    return _module_op(args, "unload", lambda reply: (
        f"unloaded {args.module!r} (generation {reply['generation']} draining)"))


def format_status(reply: dict, socket_path: str) -> str:
    """A readable table of one process's status reply."""
    lines = [f"pid {reply.get('pid')}  ({socket_path})"]
    modules = reply.get("modules") or []
    if not modules:
        lines.append("  no modules loaded")
        return "\n".join(lines)
    rows = [("MODULE", "GEN", "IMAGE", "STATE", "IN FLIGHT", "PATH")]
    for m in modules:
        images = m.get("images") or [{}]
        for i, image in enumerate(images):
            first = i == 0
            rows.append((m["name"] if first else "", str(m.get("generation")) if first else "",
                         str(image.get("generation", "-")), image.get("state", "-"),
                         str(image.get("in_flight", "-")), (m.get("path") or "") if first else ""))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [row[c].ljust(widths[c]) for c in range(len(widths))] + [row[-1]]
        lines.append("  " + "  ".join(cells).rstrip())
    for m in modules:
        note = _old_images_note(m)
        if note:
            lines.append(f"  {m['name']}: {note}")
    return "\n".join(lines)


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
    if draining:
        calls = sum(i.get("in_flight") or 0 for i in draining)
        parts.append(f"draining: generation {', '.join(str(i.get('generation')) for i in draining)} "
                     f"({calls} call(s) in flight)")
    if len(closed) == 1:
        parts.append(f"old image drained (generation {closed[0]})")
    elif closed:
        contiguous = closed == list(range(closed[0], closed[-1] + 1))
        span = f"{closed[0]}-{closed[-1]}" if contiguous else ", ".join(map(str, closed))
        parts.append(f"old images drained (generations {span})")
    return "; ".join(parts) or None


def cmd_status(args: argparse.Namespace) -> int:
    targets = resolve_targets(args)
    entries = []
    ok = True
    for n, target in enumerate(targets):
        reply = _ask(target, "status")
        reply.setdefault("socket", str(target.path))
        entries.append(reply)
        if not reply.get("ok"):
            ok = False
            _report_failure(target, reply, "status")
        elif not args.json:
            if n:
                print()
            print(format_status(reply, str(target.path)))
    if args.json:
        _emit_json(entries, args.all)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_build(args: argparse.Namespace) -> int:
    try:
        result = build_mod.build(args.source_dir, args.build_dir, target=args.target, config=args.config)
    except build_mod.BuildError as exc:
        raise CLIError(str(exc), hint=exc.hint) from None
    if args.json:
        print(json.dumps({"ok": True, "seconds": result.seconds, "configured": result.configured,
                          "built": [{"name": m.name, "path": str(m.path)} for m in result.built],
                          "modules": [{"name": m.name, "path": str(m.path)} for m in result.modules]},
                         indent=2))
        return EXIT_OK
    for m in result.built:
        print(f"built {m.name}: {m.path}")
    if not result.built:
        if result.modules:
            print(f"up to date: {', '.join(m.name for m in result.modules)} ({len(result.modules)} module(s))")
        else:
            print(f"built, but found no module files (use nativereload_add_module() in CMakeLists.txt, or put "
                  f"the libraries in {Path(args.build_dir) / 'modules'})")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    from . import watch

    # Fail early on a usage problem (no sources, no such process) rather than after a build.
    if not Path(args.source_dir).is_dir():
        raise CLIError(f"source directory {args.source_dir} does not exist",
                       hint="run from your project's directory or pass --source-dir")
    if args.socket or args.pid is not None:
        resolve_targets(args)
    try:
        watch.watch_sources(args.source_dir, args.build_dir, config=args.config, interval=args.interval, poll=args.poll,
                            targets=lambda: _watch_targets(args))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return EXIT_OK


def _watch_targets(args: argparse.Namespace) -> list[control.Target]:
    """Targets for one round of ``watch``: re-discovered each time (processes come and go)."""
    if args.socket or args.pid is not None:
        return resolve_targets(args)
    try:
        return control.discover()
    except control.ControlError as exc:
        raise CLIError(str(exc), hint=exc.hint) from None


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    # With --json the live report goes to stderr: stdout carries only the JSON document.
    report = demo.run(threads=args.threads, seconds=args.seconds, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report, indent=2))
    return EXIT_OK if report["ok"] else EXIT_FAILED


# --------------------------------------------------------------------------- interfaces: cdef, embed, check

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

    c = sub.add_parser("cdef", help="print a cffi cdef made from a C header (a third-party library's)")
    header_options(c)
    c.add_argument("--library", metavar="FILE", help="also report the declared functions FILE does not export")
    c.add_argument("-o", "--output", metavar="FILE", help="write the cdef to FILE (default: stdout)")

    e = sub.add_parser("embed", help="write a C file that embeds a header's interface in the module it is "
                       "compiled into")
    header_options(e)
    e.add_argument("-o", "--output", metavar="FILE.c", required=True, help="the C file to write")
    e.add_argument("--depfile", metavar="FILE", help="also write the files the header read, Makefile style")

    k = sub.add_parser("check", help="compare the interfaces embedded in two builds: exit 0 if a reload would "
                       "be accepted, 1 if refused, 2 if a file has no interface")
    k.add_argument("old", help="the serving (released) build of the module")
    k.add_argument("new", help="the new build")
    k.add_argument("--json", action="store_true", help="print the difference as JSON")


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
            message = f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}"
            return _check_failure(args, message, "pass the paths of two built modules")
        if embedded is None:
            return _check_failure(args, f"{path} has no embedded interface",
                                  "build it with nativereload_add_module(NAME SOURCES ... INTERFACE header.h), or "
                                  "compile in the file `nativereload embed header.h -o FILE.c` writes")
        found.append(embedded)
    difference = interface.diff(found[0], found[1])
    if args.json:
        print(json.dumps({"ok": True, "old": {"path": args.old, "digest": found[0].digest},
                          "new": {"path": args.new, "digest": found[1].digest}, **difference.to_json()}, indent=2))
    else:
        verdict = "a reload would be accepted" if difference.compatible else "a reload would be refused"
        print(f"{args.old} {arrow(sys.stdout)} {args.new}: {difference.summary()}: {verdict}")
        if difference:
            print(difference.render(indent="  "))
    return EXIT_OK if difference.compatible else EXIT_FAILED


def _check_failure(args: argparse.Namespace, message: str, hint: str) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": {"message": message, "hint": hint}}, indent=2))
    _print_error(message, hint)
    return EXIT_USAGE


_COMMANDS = {"build": cmd_build, "reload": cmd_reload, "unload": cmd_unload, "status": cmd_status,
             "watch": cmd_watch, "demo": cmd_demo, "cdef": cmd_cdef, "embed": cmd_embed, "check": cmd_check}


def _install_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("nativereload")
    root.addHandler(handler)
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default sys.argv[1:]); return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except CLIError as exc:
        _print_error(str(exc), exc.hint)
        return exc.code
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.cmake_dir:
        print(build_mod.cmake_dir())
        return EXIT_OK
    if args.include_dir:
        from .cdefgen import include_dir

        print(include_dir())
        return EXIT_OK
    if not args.command:
        _print_error("no command given", "`nativereload --help` lists the commands")
        return EXIT_USAGE
    own_handler = not logging.getLogger("nativereload").handlers
    if own_handler:
        _install_logging(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except CLIError as exc:
        _print_error(str(exc), exc.hint)
        return exc.code
    except NativeReloadError as exc:
        _print_error(str(exc), getattr(exc, "hint", None))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILED
    except OSError as exc:
        # The environment refused something (a directory we cannot read or
        # create, a full disk): an expected failure, reported without a traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        _print_error(f"{exc.strerror or exc}{where}", "check the paths and permissions involved; -v logs more")
        return EXIT_FAILED
    finally:
        if own_handler:
            root = logging.getLogger("nativereload")
            for h in list(root.handlers):
                root.removeHandler(h)
