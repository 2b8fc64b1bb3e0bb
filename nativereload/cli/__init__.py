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

Where things are: ``parser`` (the argparse parser, help and examples),
``outcome`` (exit codes, ``CLIError``, the JSON document), ``processes``
(reload, rollback, unload, status, ps: the commands that talk to running
processes), ``tables`` (their human-readable output), ``cluster`` (the same
commands with ``--dask``), ``local`` (build, watch, demo) and ``interfaces``
(cdef, embed, check). This module holds ``main`` and the command table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .. import build as build_mod
from ..errors import NativeReloadError
from ..output import print_error
from .interfaces import cmd_check, cmd_cdef, cmd_embed
from .local import cmd_build, cmd_demo, cmd_watch
from .outcome import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, emit_json, error_doc
from .parser import build_parser
from .processes import cmd_ps, cmd_reload, cmd_status, cmd_unload

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "main"]

logger = logging.getLogger(__name__)

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "build": cmd_build, "reload": cmd_reload, "rollback": cmd_reload, "unload": cmd_unload, "status": cmd_status,
    "ps": cmd_ps, "watch": cmd_watch, "demo": cmd_demo, "cdef": cmd_cdef, "embed": cmd_embed, "check": cmd_check,
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
        emit_json(error_doc(kind, message, hint))
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
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
        from ..cdefgen import include_dir

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
