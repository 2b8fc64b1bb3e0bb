"""Real C headers as cffi cdefs: ``nativereload cdef HEADER``.

No real header parses as a cdef as it stands (``#include``, attributes,
inline bodies, ``sizeof`` in array bounds, ...). This module lets the system
compiler do the C: it preprocesses the header (``cc -E -dD``, with
``NATIVERELOAD_CDEF`` defined, so a header can hide what cffi cannot take),
then keeps, from the declarations the line markers attribute to that header:
  - typedefs, struct/union/enum definitions, function prototypes and extern
    variables, with attributes, ``__asm__`` labels, ``__extension__``,
    ``__restrict``, ``inline`` and the like removed;
  - the types they need from the other headers it includes (``zconf.h``'s
    ``uLong``, glibc's ``off_t`` chain), except those cffi knows natively
    (``size_t``, ``uint32_t``, ``FILE``, ...);
  - every ``#define NAME VALUE`` whose value is an integer constant, computed
    with C's arithmetic (``(0ULL - 1)`` is 18446744073709551615, as in C).

and drops, with a one-line comment saying why, what cffi cannot take: inline
function bodies, ``_Static_assert``, declarations using ``va_list``,
``__int128`` or ``_Float128``. Array bounds and enum values that are not
plain numbers (``sizeof(XXH128_hash_t)``) are replaced by their values, which
the compiler computes. So is the size and alignment of every struct kept:
one cffi would lay out differently from the compiler (``_Alignas``, packed)
is declared opaque instead of wrong. Finally the result is parsed by cffi;
a declaration cffi still refuses is dropped (with its error as the comment).

``cdef_from_source(c_file)`` does the same for a C file's own non-static
function *definitions*: their prototypes, plus the types they need.

Nothing here loads or runs the library or the code being described.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import cffi

from . import atomicfile
from ._cdecl import Decl, analyze, clean, is_ident, join, opaque, scan, skip_balanced, split, strip_calls
from ._cexpr import NotConstant, evaluate
from .errors import InterfaceError

__all__ = ["Cdef", "cdef_from_header", "cdef_from_source", "compiler_command", "embed_header", "include_dir",
           "unexported"]

#: Defined (to 1) while a header is read for its interface.
CDEF_MACRO = "NATIVERELOAD_CDEF"

try:   # the type names cffi knows without a declaration (size_t, uint32_t, FILE, bool, ...)
    from cffi import commontypes as _commontypes
    from cffi import model as _model
    _NATIVE_TYPES = frozenset(_commontypes.COMMON_TYPES) | frozenset(_model.PrimitiveType.ALL_PRIMITIVE_TYPES)
except (ImportError, AttributeError):   # pragma: no cover - cffi moved them
    _NATIVE_TYPES = frozenset("""bool FILE size_t ssize_t ptrdiff_t intptr_t uintptr_t wchar_t char16_t char32_t
        int8_t int16_t int32_t int64_t uint8_t uint16_t uint32_t uint64_t intmax_t uintmax_t""".split())

_CFFI_LITERAL = re.compile(r"-?(?:0[xX][0-9a-fA-F]+|[0-9]+)[uUlL]*$")
_HEADER_GUARD = re.compile(r"(?:^|_)H(?:_[0-9A-Za-z]+)?_*$")
_CFFI_LINE = re.compile(r"(?:<cdef source string>|^):(\d+):", re.M)


@dataclasses.dataclass(frozen=True)
class Cdef:
    """A generated cdef and what went into it.

    Attributes:
        text: the declarations, as ``ffi.cdef()`` takes them.
        functions: the function names declared, in order.
        dropped: (name, reason) of each declaration left out of the header's own.
        files: every file the preprocessor read (for a build system's depfile).
        ffi: the cffi.FFI that parsed ``text`` (so a caller need not parse it again).
    """

    text: str
    functions: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]
    files: tuple[str, ...]
    ffi: cffi.FFI = dataclasses.field(repr=False, compare=False)


def compiler_command(compiler: str | Sequence[str] | None = None) -> list[str]:
    """The C compiler's argv: ``compiler``, else ``$CC``, else ``cc`` (``"ccache gcc"`` is split)."""
    if compiler is None:
        compiler = os.environ.get("CC") or "cc"
    return shlex.split(compiler) if isinstance(compiler, str) else list(compiler)


def include_dir() -> Path:
    """The directory of the shipped ``nativereload.h`` (``nativereload --include-dir``)."""
    return Path(__file__).resolve().parent / "include"


def _flags(include_dirs: Iterable, defines: Iterable[str], cdef_view: bool) -> list[str]:
    flags = [f"-D{CDEF_MACRO}=1"] if cdef_view else []
    flags += [f"-I{d}" for d in include_dirs]
    flags += [d if d.startswith("-D") else f"-D{d}" for d in defines]
    # <nativereload.h> is found without a -I, after everything the caller gave.
    flags += ["-idirafter", str(include_dir())]
    return flags


def _run_compiler(argv: list[str], what: str, path: Path) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise InterfaceError(f"cannot {what} {path}: the C compiler {argv[0]!r} is not installed — install one "
                             "(apt-get install gcc) or set CC") from None
    if proc.returncode != 0:
        raise InterfaceError(f"cannot {what} {path}: {argv[0]} failed (exit status {proc.returncode}):\n"
                             f"{proc.stderr.strip()}")
    return proc.stdout


# --------------------------------------------------------------------------- constants

class _Query:
    """A constant only the compiler can compute, standing in for its tokens until it has."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.value: int | None = None


def _fold_constants(decl: Decl, enum_values: dict[str, int], queries: list[_Query]) -> None:
    """Replace array bounds and enum values that are not plain numbers by their values (or a query)."""
    toks = decl.tokens
    out: list = []
    i = 0
    n = len(toks)
    in_enum_body = []   # stack: True for an enum's {...}
    next_value: list[int | None] = []
    while i < n:
        t = toks[i]
        if t == "[":
            end = skip_balanced(toks, i)
            inner = toks[i + 1:end - 1]
            out.append("[")
            if inner:
                out.extend(_constant(inner, enum_values, queries))
            out.append("]")
            i = end
            continue
        if t == "{":
            in_enum_body.append("enum" in toks[max(0, i - 2):i])   # "enum {" or "enum TAG {"
            next_value.append(0)
        elif t == "}":
            in_enum_body.pop()
            next_value.pop()
        elif in_enum_body and in_enum_body[-1] and is_ident(t) and (i == 0 or toks[i - 1] in ("{", ",")):
            # An enumerator: NAME [= expression] up to the next "," or "}" of this body.
            j = i + 1
            depth = 0
            while j < n and not (depth == 0 and toks[j] in (",", "}")):
                depth += toks[j] in ("(", "[")
                depth -= toks[j] in (")", "]")
                j += 1
            out.append(t)
            if j > i + 1 and toks[i + 1] == "=":
                folded = _constant(toks[i + 2:j], enum_values, queries)
                out.append("=")
                out.extend(folded)
                value = folded[0] if len(folded) == 1 and isinstance(folded[0], str) else None
                next_value[-1] = int(value) if value is not None else None
            if next_value[-1] is not None:
                enum_values[t] = next_value[-1]
                next_value[-1] += 1
            i = j
            continue
        out.append(t)
        i += 1
    decl.tokens = out


def _constant(tokens: list, enum_values: dict[str, int], queries: list[_Query]) -> list:
    if len(tokens) == 1 and isinstance(tokens[0], str) and _CFFI_LITERAL.match(tokens[0]):
        try:
            return [str(evaluate(tokens))]
        except NotConstant:
            pass
    try:
        return [str(evaluate(tokens, enum_values))]
    except NotConstant:
        query = _Query(join(tokens))
        queries.append(query)
        return [query]


def _compute(queries: Sequence[_Query], header: Path, flags: list[str], compiler: list[str]) -> str | None:
    """Ask the compiler for the values of ``queries`` (one compile to assembly); None, or why it failed.

    The values are read back from the data directives of the assembly the
    compiler writes: nothing is linked or run.
    """
    if not queries:
        return None
    lines = [f'#include "{header}"', "#include <stddef.h>"]
    for n, query in enumerate(queries):
        lines.append(f"const unsigned long long __nativereload_q{n} = (unsigned long long)({query.expression});")
        lines.append(f"const int __nativereload_n{n} = ({query.expression}) < 0;")
    with tempfile.TemporaryDirectory(prefix="nativereload-cdef-") as tmp:
        c_file = Path(tmp) / "query.c"
        c_file.write_text("\n".join(lines) + "\n")
        argv = [*compiler, "-S", "-O0", "-w", "-o", "-", *flags, "-x", "c", str(c_file)]
        try:
            # LC_ALL=C: the compiler's message may end up in a comment of the cdef: ASCII quotes, please.
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
                                  env={**os.environ, "LC_ALL": "C"})
        except OSError as exc:
            return str(exc)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        errors = [line for line in lines if "error" in line]
        return (errors or lines or [f"exit status {proc.returncode}"])[0]
    values = _data_values(proc.stdout)
    for n, query in enumerate(queries):
        unsigned = values.get(f"__nativereload_q{n}")
        negative = values.get(f"__nativereload_n{n}")
        if unsigned is None or negative is None:
            return f"no value for {query.expression} in the compiler's output"
        query.value = unsigned - (1 << 64) if negative else unsigned
    return None


_DATA = re.compile(r"\s*\.(quad|xword|8byte|dword|long|word|4byte|zero|skip|byte|value|short|2byte)\s+(\S+)")


def _data_values(assembly: str) -> dict[str, int]:
    """label -> the integer the data directives after it spell (little-endian, as laid out)."""
    sizes = {"quad": 8, "xword": 8, "8byte": 8, "dword": 8, "long": 4, "word": 4, "4byte": 4, "value": 2,
             "short": 2, "2byte": 2, "byte": 1}
    values: dict[str, int] = {}
    invalid: set[str] = set()
    label = None
    value = shift = 0
    for line in assembly.splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and not stripped.startswith("."):
            if label is not None:
                values[label] = value
            label, value, shift = stripped[:-1], 0, 0
            continue
        if label is None:
            continue
        match = _DATA.match(line)
        if not match:
            if stripped.startswith(".") and not stripped.startswith((".align", ".p2align", ".balign")):
                if shift:
                    values[label] = value
                    label = None
            continue
        kind, operand = match.groups()
        if kind in ("zero", "skip"):
            shift += int(operand.split(",")[0], 0) * 8
            continue
        try:
            word = int(operand, 0) & ((1 << (sizes[kind] * 8)) - 1)
        except ValueError:      # a label or an expression, not a number: no value for this one
            invalid.add(label)
            continue
        value |= word << shift
        shift += sizes[kind] * 8
    if label is not None:
        values[label] = value
    return {k: v for k, v in values.items() if k not in invalid}


# --------------------------------------------------------------------------- writing the cdef

# --------------------------------------------------------------------------- the whole job

def _generate(path: Path, decls: list[Decl], own: list[Decl], macros, files: list[str], system: set[str],
              flags: list[str], compiler: list[str], *, source: bool, own_files: frozenset[str], title: str) -> Cdef:
    typedefs: dict[str, Decl] = {}
    tag_defs: dict[str, Decl] = {}
    for d in decls:
        if d.kind == "typedef":
            for name in d.names:
                typedefs.setdefault(name, d)
        for tag in d.tags:
            tag_defs.setdefault(tag, d)

    # The types own declarations need, from wherever they are declared.
    keep: dict[int, Decl] = {id(d): d for d in own}
    queue = list(own)
    while queue:
        d = queue.pop()
        wanted = [typedefs.get(r) for r in d.refs if r not in _NATIVE_TYPES]
        wanted += [tag_defs.get(tag) for tag in d.tag_refs]
        # A struct defined in the project's own headers (not a system header) comes along
        # even when only pointed to: the caller may well want to allocate one (ffi.new).
        wanted += [tag_defs.get(tag) for tag in d.tag_mentions
                   if tag in tag_defs and tag_defs[tag].file not in system]
        for other in wanted:
            if other is not None and id(other) not in keep:
                keep[id(other)] = other
                queue.append(other)
    kept = sorted(keep.values(), key=lambda d: d.index)
    _propagate_drops(kept)

    # Constants: array bounds and enum values, then #define NAME VALUE.
    enum_values: dict[str, int] = {}
    queries: list[_Query] = []
    for d in kept:
        if not d.drop and not d.macro:
            _fold_constants(d, enum_values, queries)
    layout_queries: list[tuple[Decl, str, _Query, _Query]] = []
    for d in kept:
        for name in d.layout_names if not d.drop else ():
            size, align = _Query(f"sizeof({name})"), _Query(f"__alignof__({name})")
            layout_queries.append((d, name, size, align))
            queries += [size, align]
    if not source:
        kept += _macro_constants(own_files, macros, kept, enum_values)
        kept.sort(key=lambda d: d.index)
    failure = _compute(queries, path, flags, compiler)
    if failure:
        for d in kept:
            if any(isinstance(t, _Query) for t in d.tokens):
                d.drop = d.drop or f"a constant only the compiler knows, and it could not say ({failure})"
        layout_queries = []
        title += f" */\n/* struct layouts NOT checked against the compiler: {_comment(failure)}"
    header_lines = f"/* {title} */".split("\n")

    # cffi has the last word: parse, drop what it refuses, and check layouts against the compiler's.
    opaque_done: set[int] = set()
    for _attempt in range(len(layout_queries) + 2):
        text, ffi = _parse_dropping_refused(kept, header_lines, path)
        changed = False
        for d, name, size, align in layout_queries:
            if d.drop or id(d) in opaque_done or size.value is None:
                continue
            try:
                ours = (ffi.sizeof(name), ffi.alignof(name))
            except Exception:   # incomplete: it holds a struct made opaque
                ours = None
            if ours != (size.value, align.value):
                spelled = "unknown" if ours is None else f"{ours[0]} bytes aligned to {ours[1]}"
                d.note = (f"{name}: opaque here: cffi would lay it out as {spelled}, the compiler as "
                          f"{size.value} bytes aligned to {align.value} (alignment or packing cffi cannot express)")
                d.tokens = opaque(d)
                opaque_done.add(id(d))
                changed = True
        if not changed:
            break
    functions = tuple(n for d in kept if not d.drop and d.kind == "function" for n in d.names)
    own_ids = {id(d) for d in own}
    dropped = tuple((d.label(), d.drop) for d in kept if d.drop and id(d) in own_ids)
    return Cdef(text=text, functions=functions, dropped=dropped, files=tuple(files), ffi=ffi)


def _propagate_drops(kept: list[Decl], dropped: Iterable[Decl] | None = None) -> None:
    """A declaration that needs a dropped type is dropped too, saying which.

    Args:
        dropped: the declarations just dropped (default: every dropped one in ``kept``).
    """
    users: dict[str, list[Decl]] = {}
    for d in kept:
        if not d.drop:
            for ref in d.refs | d.tag_refs:
                users.setdefault(ref, []).append(d)
    queue = [d for d in (kept if dropped is None else dropped) if d.drop]
    while queue:
        gone = queue.pop()
        cause = gone.cause or gone.drop
        provided = (gone.names if gone.kind == "typedef" else ()) + gone.tags
        for name in provided:
            for d in users.get(name, ()):
                if not d.drop:
                    d.drop = f"needs {name}, which is left out: {cause}"
                    d.cause = cause
                    queue.append(d)


def _parse_dropping_refused(kept: list[Decl], header_lines: list[str], path: Path) -> tuple[str, cffi.FFI]:
    """The cdef text and the FFI that parsed it, after dropping each declaration cffi refuses.

    One parse when cffi takes everything (the usual case). Otherwise the
    declarations are fed to one FFI in chunks, restoring its parser's state
    after a refused chunk, so that each refusal costs a chunk's parse and not
    the whole text's (GL/glext.h leaves out thousands of declarations).
    """
    text, _owners = _render(kept, header_lines)
    ffi = cffi.FFI()
    try:
        ffi.cdef(text)
        return text, ffi
    except Exception:   # cffi raises CDefError, FFIError, pycparser's ParseError
        pass
    probe = cffi.FFI()
    parser = probe._parser

    def attempt(decls: list[Decl], keep: bool) -> tuple[Exception | None, dict[int, Decl]]:
        saved = dict(parser._declarations), dict(parser._int_constants)
        chunk_text, owners = _render(decls, [])
        try:
            probe.cdef(chunk_text)
        except Exception as exc:
            parser._declarations, parser._int_constants = saved
            return exc, owners
        if not keep:
            parser._declarations, parser._int_constants = saved
        return None, owners

    live = [d for d in kept if not d.drop]
    step = 64
    for start in range(0, len(live), step):
        while True:
            chunk = [d for d in live[start:start + step] if not d.drop]
            if not chunk:
                break
            exc, owners = attempt(chunk, keep=True)
            if exc is None:
                break
            culprit = _culprit(exc, owners, chunk)
            if culprit is None:   # no line to go by: the shortest failing prefix ends with it
                low, high = 0, len(chunk) - 1
                while low < high:
                    middle = (low + high) // 2
                    if attempt(chunk[:middle + 1], keep=False)[0] is None:
                        low = middle + 1
                    else:
                        high = middle
                culprit = chunk[low]
            culprit.drop = f"cffi cannot parse it: {_first_line(exc)}"
            _propagate_drops(kept, [culprit])
    text, _owners = _render(kept, header_lines)
    ffi = cffi.FFI()
    try:
        ffi.cdef(text)
    except Exception as exc:
        raise InterfaceError(f"cannot make a cdef of {path}: cffi refuses it: {exc}") from None
    return text, ffi


def _macro_constants(own_files: frozenset[str], macros, kept: list[Decl], enum_values: dict[str, int]) -> list[Decl]:
    """``#define NAME VALUE`` pseudo-declarations for the header's integer-valued macros."""
    bodies: dict[str, list[str]] = {}
    own: dict[str, tuple[int, str, list[str]]] = {}
    for position, file, name, body in macros:
        if body is None:
            bodies.pop(name, None)
            own.pop(name, None)
            continue
        bodies[name] = body
        if file in own_files:
            own[name] = (position, file, body)
    declared = {n for d in kept for n in d.names} | set(enum_values)
    names: dict = dict(bodies)
    names.update(enum_values)
    out = []
    for name, (position, file, body) in own.items():
        if name in declared or not body or (_HEADER_GUARD.search(name) and body in (["1"], [])):
            continue
        try:
            value = evaluate(body, names)
        except (NotConstant, RecursionError):
            continue
        out.append(Decl([], file, position, macro=(name, value), kind="macro"))
    return out


def _render(kept: list[Decl], header_lines: list[str]) -> tuple[str, dict[int, Decl]]:
    """The cdef text (one declaration per line) and which declaration each line holds.

    The ``#define`` constants come last: cffi's error messages count lines
    wrongly after a ``#define`` line, and a refused declaration is found by
    its line.
    """
    lines = list(header_lines)
    owners: dict[int, Decl] = {}
    live = [d for d in kept if not d.drop]
    for group in ([d for d in live if not d.macro], [d for d in live if d.macro]):
        file = None
        for d in group:
            if d.file != file:
                file = d.file
                lines.append(f"/* {'constants ' if d.macro else ''}from {file} */")
            if d.note:
                lines.append(f"/* {d.note} */")
            lines.append(f"#define {d.macro[0]} {d.macro[1]}" if d.macro else join(d.tokens) + ";")
            owners[len(lines)] = d
    notes = [d for d in kept if d.drop]
    if notes:
        lines.append("/* left out: */")
        lines += [f"/*   {d.label()}: {_comment(d.drop)} */" for d in notes]
    return "\n".join(lines) + "\n", owners


def _comment(text: str) -> str:
    return text.replace("*/", "* /").replace("\n", " ")


def _first_line(exc: BaseException) -> str:
    """cffi's complaint without its location (a line of the generated text would mean nothing to a reader)."""
    text = str(exc).strip().splitlines()
    # cffi's ParseError text is 'cannot parse "LINE"' then the location and message: keep the message.
    for line in reversed(text):
        message = re.sub(r"^(?:<cdef source string>)?(?::\d+)+:?\s*", "", line.strip())
        if message:
            return message
    return type(exc).__name__


def _culprit(exc: BaseException, owners: dict[int, Decl], kept: list[Decl]) -> Decl | None:
    match = _CFFI_LINE.search(str(exc))
    if match:
        return owners.get(int(match.group(1)))
    # "multiple declarations of function f": no line, but a name.
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(exc)))
    for d in reversed(kept):
        if not d.drop and words & set(d.names):
            return d
    return None


def _prepare(path: Path, include_dirs: Iterable, defines: Iterable[str], compiler, cdef_view: bool):
    path = Path(path).resolve()
    if not path.is_file():
        raise InterfaceError(f"cannot read {path}: no such file")
    argv = compiler_command(compiler)
    flags = _flags([Path(d).resolve() for d in include_dirs], list(defines), cdef_view)
    text = _run_compiler([*argv, "-E", "-dD", *flags, "-x", "c", str(path)], "preprocess", path)
    tokens, macros, files, system = scan(text)
    decls = split(strip_calls(tokens))
    typedef_names = set()
    for d in decls:
        clean(d)
        if d.tokens and d.tokens[0] == "typedef":
            analyze(d, set())
            typedef_names.update(d.names)
    for d in decls:
        if d.tokens:
            analyze(d, typedef_names)
    return path, argv, flags, decls, macros, files, system


def _integer_constant(decl: Decl) -> bool:
    """``static const int NAME = <literal>``: cffi declares it as an integer constant."""
    toks = decl.tokens
    if decl.kind != "variable" or "const" not in toks or "=" not in toks or len(decl.names) != 1:
        return False
    value = toks[toks.index("=") + 1:]
    if value[:1] == ["-"]:
        value = value[1:]
    return (len(value) == 1 and isinstance(value[0], str) and bool(_CFFI_LITERAL.match(value[0]))
            and all(t not in ("*", "[", "(") for t in toks))


def cdef_from_header(header: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] = (),
                     defines: Iterable[str] = (), *, compiler: str | Sequence[str] | None = None,
                     also: Iterable[str] = ()) -> Cdef:
    """A cdef of ``header``'s own declarations, the types they need, and its integer constants.

    Args:
        include_dirs: ``-I`` directories.
        defines: ``-D`` definitions, ``"NAME"`` or ``"NAME=VALUE"``; ``NATIVERELOAD_CDEF=1`` is always added.
        compiler: the C compiler (default ``$CC``, else ``cc``).
        also: glob patterns (``"z3_*.h"``, ``"*/glib/*.h"``) naming headers it includes whose
            declarations count as its own too: for an umbrella header, whose API is in others.

    Raises:
        InterfaceError: the header is missing, the compiler failed on it, or
            cffi refuses the result in a way no dropped declaration fixes.
    """
    path, argv, flags, decls, macros, files, system = _prepare(Path(header), include_dirs, defines, compiler, True)
    own_files = _own_files(str(path), files, also)
    own = []
    seen: set = set()
    for d in decls:
        if d.file not in own_files:
            continue
        if d.body:
            if "static" in d.storage or d.inline:
                continue   # inline helpers exist only in the caller's compiled code
            d.kind = "function"
        elif d.drop is None and "static" in d.storage and d.kind in ("function", "variable") \
                and not _integer_constant(d):
            continue       # not exported: nothing for dlopen to find
        key = (d.kind, d.names, d.tags) if (d.names or d.tags) else (d.kind, tuple(map(str, d.tokens)))
        if key in seen:
            continue       # declared twice (a prototype repeated): cffi refuses duplicates
        seen.add(key)
        own.append(d)
    return _generate(path, decls, own, macros, files, system, flags, argv, source=False, own_files=own_files,
                     title=f"cdef of {path.name}, made by nativereload from {path}")


def _own_files(main: str, files: Iterable[str], patterns: Iterable[str]) -> frozenset[str]:
    patterns = list(patterns)
    return frozenset([main] + [f for f in files
                               if any(fnmatch.fnmatch(f, p) or fnmatch.fnmatch(os.path.basename(f), p)
                                      for p in patterns)])


def cdef_from_source(c_file: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] = (),
                     defines: Iterable[str] = (), *, compiler: str | Sequence[str] | None = None) -> str:
    """A cdef declaring the non-static functions *defined* in ``c_file``, plus the types they need.

    Meant for code that has no header (a notebook cell compiled into a
    module): each definition becomes its prototype. ``static`` and ``inline``
    functions are left out (a loaded library does not export them).

    Raises:
        InterfaceError: the file is missing, the compiler failed on it, or cffi
            refuses the result.
    """
    path, argv, flags, decls, macros, files, system = _prepare(Path(c_file), include_dirs, defines, compiler, False)
    main = str(path)
    own = []
    names: set[str] = set()
    for d in decls:
        if d.file == main and d.body and "static" not in d.storage and not d.inline and not d.drop:
            d.kind = "function"
            if d.names and d.names[0] not in names:
                names.update(d.names)
                own.append(d)
    return _generate(path, decls, own, macros, files, system, flags, argv, source=True, own_files=frozenset([main]),
                     title=f"functions defined in {path.name}, declared by nativereload").text


def unexported(functions: Iterable[str], library: str | os.PathLike) -> list[str]:
    """The names in ``functions`` that ``library`` does not export (read from its file; nothing is loaded).

    Raises:
        InterfaceError: the library cannot be read or is not an ELF shared library.
    """
    from .elf import defined_symbols

    try:
        exported = defined_symbols(library)
    except (OSError, ValueError) as exc:
        raise InterfaceError(f"cannot read the symbols of {library}: {exc}") from None
    return [name for name in functions if name not in exported]


def embed_header(header: str | os.PathLike, output: str | os.PathLike, include_dirs: Iterable[str | os.PathLike] = (),
                 defines: Iterable[str] = (), *, compiler: str | Sequence[str] | None = None,
                 depfile: str | os.PathLike | None = None, also: Iterable[str] = ()):
    """Write ``output``: a C file that embeds ``header``'s interface in the library it is compiled into.

    The interface is the header's cdef (:func:`cdef_from_header`, read with
    ``NATIVERELOAD_CDEF`` defined); the file also includes the header so the
    compiler checks cffi's struct layouts (see :func:`interface.embed_source`).
    ``also`` is as for :func:`cdef_from_header`.
    The file is replaced by rename, never seen half-written. With
    ``depfile``, also writes a Makefile-style list of every file the header
    read, so a build system re-runs this when any of them changes.

    Returns:
        The embedded :class:`~nativereload.interface.Interface`.

    Raises:
        InterfaceError: as :func:`cdef_from_header`.
        OSError: ``output`` or ``depfile`` cannot be written.
    """
    from . import interface as interface_mod

    cdef = cdef_from_header(header, include_dirs, defines, compiler=compiler, also=also)
    embedded = interface_mod.from_ffi(cdef.ffi, cdef.text)
    text = interface_mod.embed_source(embedded, header=header, output=output)
    _write_atomically(Path(output), text)
    if depfile is not None:
        deps = " ".join(_make_escape(f) for f in cdef.files)
        _write_atomically(Path(depfile), f"{_make_escape(str(output))}: {deps}\n")
    return embedded


def _make_escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(" ", "\\ ").replace("#", "\\#").replace("$", "$$")


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomicfile.write_bytes(path, text.encode("utf-8"))
