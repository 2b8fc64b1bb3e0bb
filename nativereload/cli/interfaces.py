"""The interface commands: cdef, embed, check.

``cdef`` makes a cffi cdef from a C header, ``embed`` writes the C file that
embeds a header's interface in the module it is compiled into, ``check``
compares the interfaces two builds embed. The work is ``cdefgen``'s and
``interface``'s, imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import NativeReloadError
from ..output import arrow
from .outcome import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, emit_json


def cmd_cdef(args: argparse.Namespace) -> int:
    from .. import cdefgen

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
    from .. import cdefgen

    embedded = cdefgen.embed_header(args.header, args.output, args.include_dirs, args.defines,
                                    compiler=args.compiler, depfile=args.depfile, also=args.also)
    print(f"wrote {args.output}: the interface of {args.header} ({len(embedded.functions)} function(s), "
          f"{len(embedded.types)} type(s), {len(embedded.constants)} constant(s); digest {embedded.digest[:12]})")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from .. import interface

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
        emit_json({"ok": True, "old": {"path": args.old, "digest": found[0].digest},
                   "new": {"path": args.new, "digest": found[1].digest}, **difference.to_json()})
    else:
        verdict = "a reload would be accepted" if difference.compatible else "a reload would be refused"
        print(f"{args.old} {arrow(sys.stdout)} {args.new}: {difference.summary()}: {verdict}")
        if difference:
            print(difference.render(indent="  "))
    return EXIT_OK if difference.compatible else EXIT_FAILED
