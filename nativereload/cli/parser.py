"""The argparse parser of the ``nativereload`` command: every subcommand, its options, help and examples.

``build_parser()`` returns a fresh parser; it parses and does nothing else.
Usage errors are raised as ``CLIError`` (exit 2), never ``sys.exit``: only
``--help`` and ``--version`` exit, through argparse, and ``main`` catches that.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from .. import __version__
from .outcome import EXIT_USAGE, CLIError


class Parser(argparse.ArgumentParser):
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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="nativereload", description="Build C modules and hot-reload them in running processes.",
                epilog="`nativereload COMMAND --help` describes a command, with examples.")
    p.add_argument("--version", action="version", version=f"nativereload {__version__}")
    p.add_argument("--cmake-dir", action="store_true",
                   help="print the directory of the CMake helper (nativereload_add_module) and exit")
    p.add_argument("--include-dir", action="store_true",
                   help="print the directory of nativereload.h (for -I) and exit")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

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
