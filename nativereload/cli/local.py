"""The commands that work here rather than in a serving process: build, watch, demo.

``build`` and ``watch`` compile C files (``build.compile_sources``) or build
the CMake project (``build.build``); ``watch`` then reloads, through
``nativereload.watch``, in the processes that have a rebuilt file loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import build as build_mod
from ..control import discovery
from ..control.discovery import Target
from ..errors import ControlError
from .outcome import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, emit_json


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
        emit_json({"ok": True, "seconds": result.seconds, "configured": result.configured,
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
    from .. import watch

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
    from .. import demo

    # With --json the live report goes to stderr: stdout carries only the JSON document.
    report = demo.run(threads=args.threads, seconds=args.seconds, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        emit_json(report)
    return EXIT_OK if report["ok"] else EXIT_FAILED
