"""A module's declarations as data: parse a cdef, read the one embedded in a .so, compare two.

An :class:`Interface` describes what a caller relies on: each function's
result and parameter types (and whether it is variadic), each struct and
union's size, alignment and fields (name, offset, type), each enum's values,
each typedef, integer constant and variable. Types are spelled canonically
(typedefs resolved, qualifiers dropped), so two interfaces compare equal
exactly when cffi would call and lay out everything the same way.

Where it comes from:
  - :func:`parse` a cdef (what ``load(name, cdef=...)`` is given);
  - :func:`read` / :func:`read_fd` the interface embedded in a shared library
    by ``nativereload embed`` or ``nativereload_add_module(... INTERFACE h)``:
    an ELF section read with pread, before any dlopen, so nothing of the
    library runs (constructors included).

:func:`diff` says what changed between two interfaces; a reload is
``compatible`` when the new one only adds. A reload of an unchanged
interface costs one string comparison: every interface carries a digest of
its description, and an embedded one stores it in its first line, so the
description itself is decoded only when the digests differ.

The embedded format (section ``.nativereload.interface``), version 1::

    nativereload-interface 1 <sha256 of the description> <payload bytes>\\n
    <payload: UTF-8 JSON>\\0

The JSON object holds ``cdef`` (the declarations' text, as cffi takes it),
``functions`` {name: [result, [params], variadic, declaration]}, ``types``
{name: [kind, ...kind's fields..., declaration]}, ``constants`` {name: int}
and ``variables`` {name: [type, declaration]}. A reader refuses a newer
version rather than guess at it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import weakref
from pathlib import Path
from typing import Any, Mapping

import cffi
from cffi import model

from .errors import InterfaceError

__all__ = ["FORMAT", "SECTION", "Change", "Declarations", "Diff", "Field", "Function", "Interface", "Type", "diff",
           "embed_source", "from_ffi", "from_section", "parse", "read", "read_fd"]

#: The ELF section an embedded interface lives in.
SECTION = ".nativereload.interface"
#: The version of the embedded format this module writes (and the newest it reads).
FORMAT = 1
_MAGIC = b"nativereload-interface "
_CATEGORIES = ("functions", "types", "constants", "variables")


# --------------------------------------------------------------------------- the description

@dataclasses.dataclass(frozen=True)
class Function:
    """A declared function. Types are canonical spellings (``"char *"``, ``"struct point"``)."""

    name: str
    result: str
    params: tuple[str, ...]
    variadic: bool
    declaration: str


@dataclasses.dataclass(frozen=True)
class Field:
    """A struct or union member: ``bits`` is its width for a bit-field, else None."""

    name: str
    offset: int | None
    type: str
    bits: int | None = None


@dataclasses.dataclass(frozen=True)
class Type:
    """A struct, union, enum or typedef.

    Attributes:
        name: as C spells it: ``"struct point"``, ``"enum color"``, or a typedef name.
        kind: "struct", "union", "enum" or "typedef".
        size, alignment: in bytes (structs and unions; None while opaque).
        fields: the members, anonymous members' flattened (None while opaque).
        values: (enumerator, value) in order (enums).
        target: the type a typedef names.
        declaration: the C declaration.
    """

    name: str
    kind: str
    declaration: str
    size: int | None = None
    alignment: int | None = None
    fields: tuple[Field, ...] | None = None
    values: tuple[tuple[str, int], ...] | None = None
    target: str | None = None


class Interface:
    """The declarations of one module, comparable with :func:`diff`.

    Attributes:
        cdef: the declarations' text, as ``ffi.cdef()`` takes it.
        digest: hex SHA-256 of the description (equal digests: equal interfaces).
        ffi: the cffi.FFI that parsed ``cdef`` (None for one read from a file).

    The mappings (``functions``, ``types``, ``constants``, ``variables``) are
    built on first use: an interface read from a file decodes its
    description only when something asks for it.
    """

    def __init__(self, *, digest: str, raw: dict | None = None, payload: bytes | None = None,
                 ffi: cffi.FFI | None = None, source: str | None = None) -> None:
        self.digest = digest
        self.ffi = ffi
        self.source = source
        self._raw = raw
        self._payload = payload
        self._views: dict[str, Mapping] = {}

    def __repr__(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return f"<Interface {self.digest[:12]}{where}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Interface) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    @property
    def raw(self) -> dict:
        """The description as plain data (the embedded JSON, decoded)."""
        if self._raw is None:
            try:
                raw = json.loads(self._payload or b"{}")
                if not isinstance(raw, dict) or not all(isinstance(raw.get(c, {}), dict) for c in _CATEGORIES):
                    raise ValueError("not an object of the expected shape")
            except ValueError as exc:
                raise InterfaceError(f"the interface embedded in {self.source or 'the module'} is corrupt "
                                     f"({exc}) — rebuild the module") from None
            self._raw = raw
            self._payload = None
        return self._raw

    @property
    def cdef(self) -> str:
        return self.raw.get("cdef", "")

    @property
    def names(self) -> tuple[str, ...]:
        """The function names, in declaration order (cheaper than ``functions``)."""
        return tuple(self.raw.get("functions", ()))

    @property
    def functions(self) -> Mapping[str, Function]:
        return self._view("functions", lambda name, e: Function(name, e[0], tuple(e[1]), bool(e[2]), e[3]))

    @property
    def types(self) -> Mapping[str, Type]:
        return self._view("types", _type_from_entry)

    @property
    def constants(self) -> Mapping[str, int]:
        return self._view("constants", lambda name, e: e)

    @property
    def variables(self) -> Mapping[str, str]:
        """name -> the variable's type."""
        return self._view("variables", lambda name, e: e[0])

    def _view(self, category: str, build) -> Mapping:
        view = self._views.get(category)
        if view is None:
            view = {name: build(name, entry) for name, entry in self.raw.get(category, {}).items()}
            self._views[category] = view
        return view

    def declaration(self, name: str) -> str | None:
        """The C declaration of the function, type, constant or variable ``name`` (None if not declared)."""
        for category in _CATEGORIES:
            entry = self.raw.get(category, {}).get(name)
            if entry is not None:
                return _declaration(category, name, entry)
        return None

    def to_json(self) -> dict:
        """The description (without the cdef text), for ``--json`` output."""
        return {"digest": self.digest, **{c: self.raw.get(c, {}) for c in _CATEGORIES}}

    def section_bytes(self) -> bytes:
        """The bytes of the embedded form (what ``nativereload embed`` puts in the section)."""
        payload = json.dumps({"format": FORMAT, "cdef": self.cdef, **{c: self.raw.get(c, {}) for c in _CATEGORIES}},
                             ensure_ascii=False, separators=(",", ":")).encode()
        return _MAGIC + f"{FORMAT} {self.digest} {len(payload)}\n".encode() + payload + b"\0"


def _type_from_entry(name: str, e: list) -> Type:
    kind = e[0]
    if kind in ("struct", "union"):
        fields = None if e[3] is None else tuple(Field(*f) for f in e[3])
        return Type(name, kind, e[-1], size=e[1], alignment=e[2], fields=fields)
    if kind == "enum":
        return Type(name, kind, e[-1], values=tuple((n, v) for n, v in e[1]))
    return Type(name, kind, e[-1], target=e[1])


def _declaration(category: str, name: str, entry: Any) -> str:
    if category == "constants":
        return f"#define {name} {entry}"
    return entry[-1]


def _digest(raw: Mapping) -> str:
    # Sorted keys: the digest says what is declared, not in which order.
    text = json.dumps([raw.get(c, {}) for c in _CATEGORIES], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- from a cdef

def parse(cdef: str, *, module: str | None = None) -> Interface:
    """The interface a cdef declares.

    Costs what cffi's parser costs (about 0.1 ms per declaration); the
    returned interface's ``ffi`` holds the parsed declarations, ready for
    ``dlopen``.

    Raises:
        InterfaceError: the cdef is empty or cffi cannot parse it.
    """
    who = f"module '{module}': " if module else ""
    if not isinstance(cdef, str) or not cdef.strip():
        raise InterfaceError(f"{who}the cdef is empty — pass the C declarations of the functions to call",
                             module=module)
    ffi = cffi.FFI()
    try:
        ffi.cdef(cdef)
    except Exception as exc:   # cffi raises CDefError, FFIError, pycparser's ParseError
        raise InterfaceError(f"{who}the cdef does not parse: {exc} — fix the declarations (plain C "
                             "declarations; `nativereload cdef HEADER` makes one from a real header)",
                             module=module) from exc
    return from_ffi(ffi, cdef)


def from_ffi(ffi: cffi.FFI, cdef: str) -> Interface:
    """The interface of the declarations ``ffi`` holds (``cdef`` is their text, kept for display and reuse).

    Raises:
        InterfaceError: a struct cffi cannot lay out (a member of an incomplete type).
    """
    raw = _describe(ffi)
    raw["cdef"] = cdef
    return Interface(digest=_digest(raw), raw=raw, ffi=ffi)


def _describe(ffi: cffi.FFI) -> dict:
    # cffi has no public list of declarations; its parser's has been stable since cffi 1.0.
    functions: dict[str, list] = {}
    types: dict[str, list] = {}
    constants: dict[str, int] = {}
    variables: dict[str, list] = {}
    with ffi._lock:
        declarations = list(ffi._parser._declarations.items())
        for key, (tp, quals) in declarations:
            kind, _, name = key.partition(" ")
            if kind == "function":
                raw_fn = tp.as_raw_function()
                functions[name] = [_spell(tp.result), [_spell(a) for a in tp.args], bool(tp.ellipsis),
                                   _spell(raw_fn, name, display=True)]
            elif kind in ("struct", "union", "enum", "anonymous"):
                if name.startswith("$"):
                    if isinstance(tp, model.EnumType):   # enum { A, B }; declares constants only
                        constants.update(zip(tp.enumerators, tp.enumvalues))
                    continue
                type_name = name if kind == "anonymous" else f"{kind} {name}"
                types[type_name] = _type_entry(ffi, tp, type_name, typedef=kind == "anonymous")
            elif kind == "typedef":
                if isinstance(tp, (model.StructOrUnion, model.EnumType)) and tp.name == "$" + name:
                    continue   # typedef struct {...} name: described as the type "name"
                types[name] = ["typedef", _spell(tp), "typedef " + _spell(tp, name, display=True)]
            elif kind == "macro":
                if isinstance(tp, int):
                    constants[name] = tp
            elif kind in ("variable", "constant"):
                variables[name] = [_spell(tp), "extern " + _spell(tp, name, display=True, const=bool(quals & 1))]
    return {"functions": functions, "types": types, "constants": constants, "variables": variables}


def _type_entry(ffi: cffi.FFI, tp: Any, name: str, *, typedef: bool) -> list:
    declaration = _type_declaration(tp, name, typedef)
    if isinstance(tp, model.EnumType):
        return ["enum", [[n, v] for n, v in zip(tp.enumerators, tp.enumvalues)], declaration]
    if tp.fldtypes is None:
        return [tp.kind, None, None, None, declaration]
    try:
        ctype = ffi._get_cached_btype(tp)
        size, alignment = ffi.sizeof(ctype), ffi.alignof(ctype)
        offsets = {n: f.offset for n, f in ctype.fields}
    except Exception as exc:   # a member of incomplete type: cffi cannot lay it out
        raise InterfaceError(f"{name} cannot be laid out: {exc} — declare the types of its members "
                             "completely") from None
    fields = [[n, offsets.get(n), _spell(ftp), bits if bits >= 0 else None]
              for n, ftp, bits, _quals in tp.enumfields() if n]
    return [tp.kind, size, alignment, fields, declaration]


def _type_declaration(tp: Any, name: str, typedef: bool) -> str:
    if isinstance(tp, model.EnumType):
        body = "{ " + ", ".join(f"{n} = {v}" for n, v in zip(tp.enumerators, tp.enumvalues)) + " }"
        return f"typedef enum {body} {name}" if typedef else f"{name} {body}"
    if tp.fldtypes is None:
        return f"typedef {tp.kind} {name} {name}" if typedef else name
    body = _struct_body(tp)
    return f"typedef {tp.kind} {body} {name}" if typedef else f"{name} {body}"


def _struct_body(tp: Any) -> str:
    members = []
    quals = tp.fldquals or (0,) * len(tp.fldnames)
    for fname, ftp, bits, q in zip(tp.fldnames, tp.fldtypes, tp.fldbitsize, quals):
        if not fname and isinstance(ftp, model.StructOrUnion) and ftp.name.startswith("$"):
            members.append(f"{ftp.kind} {_struct_body(ftp)};")   # anonymous member
            continue
        member = _spell(ftp, fname, display=True, const=bool(q & 1))
        members.append(member + (f" : {bits}" if bits >= 0 else "") + ";")
    return "{ " + " ".join(members) + " }"


def _base(tp: Any) -> str:
    if isinstance(tp, model.VoidType):
        return "void"
    if isinstance(tp, (model.StructOrUnion, model.EnumType)):
        if tp.name.startswith("$"):
            # Anonymous: known by its typedef's name if it has one.
            return tp.forcename if tp.forcename and not tp.forcename.startswith("$") else f"{tp.kind} <anonymous>"
        return f"{tp.kind} {tp.name}"
    return getattr(tp, "name", None) or tp._get_c_name()


def _spell(tp: Any, inner: str = "", *, display: bool = False, const: bool = False) -> str:
    """C spelling of ``tp`` declaring ``inner``; canonical (no qualifiers) unless ``display``."""
    if isinstance(tp, model.NamedPointerType) and not display:
        tp = model.PointerType(tp.totype, tp.quals)
    if isinstance(tp, model.PointerType) and not isinstance(tp, model.NamedPointerType):
        star = "*const " if const and display else "*"
        pointee_const = bool(tp.quals & 1) and display
        inner = star + inner
        if isinstance(tp.totype, (model.ArrayType, model.BaseFunctionType)):
            inner = f"({inner})"
        return _spell(tp.totype, inner, display=display, const=pointee_const)
    if isinstance(tp, model.ArrayType):
        length = "" if tp.length is None else str(tp.length)
        return _spell(tp.item, f"{inner}[{length}]", display=display, const=const)
    if isinstance(tp, model.FunctionPtrType):
        return _spell(tp.as_raw_function(), f"(*{inner})", display=display)
    if isinstance(tp, model.RawFunctionType):
        args = [_spell(a, display=display) for a in tp.args]
        if tp.ellipsis:
            args.append("...")
        return _spell(tp.result, f"{inner}({', '.join(args) or 'void'})", display=display)
    base = tp.name if isinstance(tp, model.NamedPointerType) else _base(tp)
    if const and display:
        base = "const " + base
    if not inner:
        return base
    return base + inner if inner.startswith("[") else f"{base} {inner}".replace("* ", "*").rstrip()


# --------------------------------------------------------------------------- embedded in a library

def from_section(data: bytes, *, source: str | None = None) -> Interface:
    """The interface in the bytes of an interface section.

    Raises:
        InterfaceError: not an interface, a format newer than this version
            reads, or two interfaces linked into one library.
    """
    where = source or "the module"
    newline = data.find(b"\n", 0, 256)
    if not data.startswith(_MAGIC) or newline < 0:
        raise InterfaceError(f"the {SECTION} section of {where} is not a nativereload interface — rebuild "
                             "the module with `nativereload embed` or the CMake helper")
    try:
        version, digest, length = data[len(_MAGIC):newline].decode("ascii").split(" ")
        version_number, size = int(version), int(length)
    except ValueError:
        raise InterfaceError(f"the interface embedded in {where} has a corrupt header — rebuild the module") \
            from None
    if version_number > FORMAT:
        raise InterfaceError(f"the interface embedded in {where} has format {version_number}; this nativereload "
                             f"reads format {FORMAT} — upgrade nativereload")
    payload = data[newline + 1:newline + 1 + size]
    rest = data[newline + 1 + size:]
    if len(payload) != size:
        raise InterfaceError(f"the interface embedded in {where} is truncated — rebuild the module")
    if rest.strip(b"\0"):
        raise InterfaceError(f"{where} embeds more than one interface (two files from `nativereload embed` "
                             "linked into one library?) — link exactly one")
    return Interface(digest=digest, payload=payload, source=source)


def read_fd(fd: int, *, source: str | None = None, serving: Interface | None = None) -> Interface | None:
    """The interface embedded in the ELF file open as ``fd``; None if it has none.

    Reads the file with pread (the offset is not moved); never loads it.

    Args:
        serving: the interface now serving, if any. When the embedded one has
            the same digest, ``serving`` itself is returned after reading only
            the section's first line: the common reload (new code, same
            header) costs the section-header lookup and one small read.

    Raises:
        InterfaceError: the file is not ELF, or its section is not a readable interface.
    """
    from .elf import ELFError, find_section

    try:
        where = find_section(fd, SECTION)
        if where is None:
            return None
        offset, size = where
        head = os.pread(fd, min(size, _HEAD_BYTES), offset)
        if serving is not None and head.startswith(_MAGIC):
            line = head[len(_MAGIC):head.find(b"\n")].split(b" ")
            if len(line) == 3 and line[1].decode("ascii", "replace") == serving.digest and line[0] == b"%d" % FORMAT:
                return serving
        data = head if size <= len(head) else head + os.pread(fd, size - len(head), offset + len(head))
    except ELFError as exc:
        raise InterfaceError(f"cannot read the interface of {source or 'the module'}: {exc}") from None
    if len(data) != size:
        raise InterfaceError(f"cannot read the interface of {source or 'the module'}: the file shrank while "
                             "being read")
    return from_section(data, source=source)


# The first line of an embedded interface: magic, version, a 64-digit digest and a length.
_HEAD_BYTES = 128


def read(path: str | os.PathLike) -> Interface | None:
    """The interface embedded in the library at ``path``; None if it has none. See :func:`read_fd`.

    Raises:
        InterfaceError: as :func:`read_fd`.
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_fd(fd, source=str(path))
    finally:
        os.close(fd)


def embed_source(interface: Interface, *, header: str | os.PathLike | None = None,
                 output: str | os.PathLike | None = None) -> str:
    """The C file that embeds ``interface`` in the library it is compiled into.

    With ``header``, the file also includes it and has the compiler check the
    layout cffi computed for each struct (size, alignment, member offsets):
    a difference (an attribute the cdef view hid, ``#pragma pack``) fails the
    build instead of misreading objects at run time. Define
    ``NATIVERELOAD_NO_LAYOUT_CHECK`` to skip that check.

    Args:
        output: where the file will be written, to include ``header`` by a relative path.
    """
    data = interface.section_bytes()
    lines = [
        "/* Generated by `nativereload embed`: do not edit (regenerate when the header changes).",
        f" * The module's interface, in ELF section {SECTION}, where nativereload reads it from the",
        " * library file before loading it (format {0}; digest {1}). */".format(FORMAT, interface.digest[:16]),
        "#include <stddef.h>",
    ]
    if header is not None:
        lines.append("#ifndef NATIVERELOAD_NO_LAYOUT_CHECK")
        lines.append(f'#include "{_include_path(Path(header), output)}"')
        lines.append("#endif")
    lines += [
        "",
        "#if defined(__GNUC__) || defined(__clang__)",
        "#  if defined(__has_attribute)",
        "#    if __has_attribute(retain)",
        "#      define NATIVERELOAD_RETAIN_ __attribute__((retain))   /* survives --gc-sections */",
        "#    endif",
        "#  endif",
        "#  ifndef NATIVERELOAD_RETAIN_",
        "#    define NATIVERELOAD_RETAIN_",
        "#  endif",
        "#  pragma GCC diagnostic push",
        "#  pragma GCC diagnostic ignored \"-Woverlength-strings\"",
        f'__attribute__((section("{SECTION}"), used, aligned(1))) NATIVERELOAD_RETAIN_',
        "#else",
        "#  error \"nativereload embeds interfaces with GCC or Clang (the section attribute)\"",
        "#endif",
        f"static const char nativereload_interface_[{len(data)}] =",
    ]
    lines += [f"    {chunk}" for chunk in _c_string_chunks(data[:-1])]
    lines[-1] += ";"
    lines.append("#pragma GCC diagnostic pop")
    checks = _layout_checks(interface) if header is not None else []
    if checks:
        lines += [
            "",
            "/* cffi's layout of each struct, checked by the compiler that builds the module. */",
            "#ifndef NATIVERELOAD_NO_LAYOUT_CHECK",
            "#ifdef __cplusplus",
            "#  define NATIVERELOAD_CHECK_(c, m) static_assert(c, m)",
            "#else",
            "#  define NATIVERELOAD_CHECK_(c, m) _Static_assert(c, m)",
            "#endif",
            *checks,
            "#endif",
        ]
    return "\n".join(lines) + "\n"


def _include_path(header: Path, output: str | os.PathLike | None) -> str:
    header = header.resolve()
    if output is not None:
        try:
            return os.path.relpath(header, Path(output).resolve().parent)
        except ValueError:
            pass
    return str(header)


def _c_string_chunks(data: bytes, width: int = 100) -> list[str]:
    chunks = []
    piece = []
    length = 0
    for byte in data:
        if byte == 0x22 or byte == 0x5C:
            text = "\\" + chr(byte)
        elif 0x20 <= byte < 0x7F and byte != 0x3F:   # "?" is escaped: no trigraphs
            text = chr(byte)
        elif byte == 0x0A:
            text = "\\n"
        else:
            text = f"\\{byte:03o}"
        piece.append(text)
        length += len(text)
        if byte == 0x0A or length >= width:
            chunks.append('"' + "".join(piece) + '"')
            piece, length = [], 0
    if piece or not chunks:
        chunks.append('"' + "".join(piece) + '"')
    return chunks


def _layout_checks(interface: Interface) -> list[str]:
    checks = []
    for name, t in interface.types.items():
        if t.kind not in ("struct", "union") or t.size is None:
            continue
        message = (f"nativereload: {name} is laid out differently by the compiler than by cffi (an attribute "
                   f"or #pragma the cdef view does not see?)")
        checks.append(f'NATIVERELOAD_CHECK_(sizeof({name}) == {t.size}, "{message}");')
        checks.append(f'NATIVERELOAD_CHECK_(__alignof__({name}) == {t.alignment}, "{message}");')
        for f in t.fields or ():
            if f.bits is None and f.offset is not None:
                checks.append(f'NATIVERELOAD_CHECK_(offsetof({name}, {f.name}) == {f.offset}, "{message}");')
    return checks


# --------------------------------------------------------------------------- comparing two

@dataclasses.dataclass(frozen=True)
class Change:
    """One declaration added, removed or changed.

    Attributes:
        category: "function", "type", "constant" or "variable".
        name: the declared name (``"struct point"`` for a struct).
        old, new: the declarations before and after (None when absent).
        details: what changed, e.g. ``("returns double, was int",)``.
    """

    category: str
    name: str
    old: str | None
    new: str | None
    details: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"category": self.category, "name": self.name, "old": self.old, "new": self.new,
                "details": list(self.details)}


@dataclasses.dataclass(frozen=True)
class Diff:
    """What changed from one interface to another.

    A reload is ``compatible`` when nothing was removed or changed: callers
    and objects made under the old interface keep their meaning, and the
    additions are new names.
    """

    added: tuple[Change, ...] = ()
    removed: tuple[Change, ...] = ()
    changed: tuple[Change, ...] = ()
    _new: Interface | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def compatible(self) -> bool:
        return not self.removed and not self.changed

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def render(self, indent: str = "") -> str:
        """Readable text: one block per change, the old and the new declaration one under the other."""
        if not self:
            return f"{indent}no change"
        lines = []
        for verb, changes in (("changed", self.changed), ("removed", self.removed), ("added", self.added)):
            for c in changes:
                what = c.name if c.category == "type" and " " in c.name else f"{c.category} {c.name}"
                head = f"{indent}{verb} {what}"
                lines.append(head + (": " + "; ".join(c.details) if c.details else ""))
                if c.old is not None:
                    lines.append(f"{indent}    old: {c.old}")
                if c.new is not None:
                    lines.append(f"{indent}    new: {c.new}")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: ``"1 changed, 2 added (refused)"``."""
        if not self:
            return "no change"
        parts = [f"{len(x)} {verb}" for verb, x in (("changed", self.changed), ("removed", self.removed),
                                                     ("added", self.added)) if x]
        return ", ".join(parts) + (" (compatible)" if self.compatible else " (incompatible)")

    def to_json(self) -> dict:
        return {"compatible": self.compatible, "added": [c.to_json() for c in self.added],
                "removed": [c.to_json() for c in self.removed], "changed": [c.to_json() for c in self.changed]}

    @property
    def added_cdef(self) -> str:
        """The declarations of what was added, as a cdef an FFI holding the old interface can take.

        Types come first (struct/union forward declarations, then definitions,
        each after the typedefs it names), then functions, variables and
        constants.
        """
        if self._new is None or not self.added:
            return ""
        raw = self._new.raw
        added = {(c.category, c.name) for c in self.added}
        types = {name: e for name, e in raw.get("types", {}).items() if ("type", name) in added}
        lines = [f"{e[0]} {name.split(' ', 1)[1]};" for name, e in types.items()
                 if e[0] in ("struct", "union") and " " in name]
        lines += [e[-1] + ";" for e in _in_dependency_order(types)
                  if not (e[0] in ("struct", "union") and e[3] is None and not e[-1].startswith("typedef"))]
        lines += [e[-1] + ";" for name, e in raw.get("functions", {}).items() if ("function", name) in added]
        lines += [e[-1] + ";" for name, e in raw.get("variables", {}).items() if ("variable", name) in added]
        lines += [f"#define {name} {v}" for name, v in raw.get("constants", {}).items()
                  if ("constant", name) in added]
        return "\n".join(lines) + "\n"

    def error(self, *, module: str | None = None, path: str | None = None,
              outcome: str = "reload refused", fix: str | None = None) -> InterfaceError:
        """An InterfaceError that shows every incompatible change, old and new declaration together.

        Args:
            outcome: what the refusal means, e.g. "reload refused; generation 3 still serving".
            fix: what to do (default: keep the declarations, or reload with allow_interface_change=True).
        """
        first = (self.changed + self.removed)[0] if not self.compatible else None
        who = f"module '{module}': " if module else ""
        where = f" of {path}" if path else ""
        fix = fix or ("keep the old declarations and add new functions instead, or reload with "
                      "allow_interface_change=True to accept the change on purpose")
        refused = Diff(removed=self.removed, changed=self.changed)
        message = (f"{who}the interface{where} is incompatible with the one serving ({outcome}):\n"
                   f"{refused.render(indent='  ')}\n— {fix}")
        return InterfaceError(message, module=module, path=path, diff=self,
                              function=first.name if first and first.category == "function" else None,
                              old=first.old if first else None, new=first.new if first else None)


def _in_dependency_order(types: dict[str, list]) -> list[list]:
    """Type entries ordered so that each comes after the added types its declaration names.

    cffi needs a typedef name declared before it is used, and an enum's
    values on its first mention; structs and unions are forward-declared
    first anyway, so for them the order does not matter.
    """
    mentions = {name: set(re.findall(r"(?:(?:struct|union|enum)\s+)?[A-Za-z_]\w*", e[-1]))
                for name, e in types.items()}
    order: list[list] = []
    state: dict[str, bool] = {}

    def visit(name: str) -> None:
        if name in state:
            return
        state[name] = False
        for other in types:
            if other != name and other in mentions[name]:
                visit(other)
        state[name] = True
        order.append(types[name])

    for name in types:
        visit(name)
    return order


def diff(old: Interface, new: Interface) -> Diff:
    """What ``new`` changes from ``old``. Equal digests answer at once, without decoding either.

    A declaration counts as changed when what cffi makes of it changed: a
    function's result, parameters or variadic-ness; a struct or union's
    size, alignment or any member's name, offset, type or width; an enum's
    enumerators or values; a typedef's target; a constant's value; a
    variable's type. Parameter names and ``const`` are not part of it.
    """
    if old.digest == new.digest:
        return Diff()
    added, removed, changed = [], [], []
    singular = {"functions": "function", "types": "type", "constants": "constant", "variables": "variable"}
    old_raw, new_raw = old.raw, new.raw
    for category in _CATEGORIES:
        before = old_raw.get(category, {})
        after = new_raw.get(category, {})
        if before == after:
            continue
        kind = singular[category]
        lookup = after.get
        kept = len(before)
        for name, entry in before.items():
            other = lookup(name)
            if other is None:
                kept -= 1
                removed.append(Change(kind, name, _declaration(category, name, entry), None))
            elif other != entry and _meaning(category, other) != _meaning(category, entry):
                changed.append(Change(kind, name, _declaration(category, name, entry),
                                      _declaration(category, name, other), _details(category, entry, other)))
        if len(after) > kept:      # some names are new
            for name, entry in after.items():
                if name not in before:
                    added.append(Change(kind, name, None, _declaration(category, name, entry)))
    return Diff(tuple(added), tuple(removed), tuple(changed), new)


def _meaning(category: str, entry: Any) -> Any:
    """The part of an entry a caller depends on (its declaration text is not)."""
    return entry if category == "constants" else entry[:-1]


def _details(category: str, old: Any, new: Any) -> tuple[str, ...]:
    if category == "constants":
        return (f"{new}, was {old}",)
    if category == "variables":
        return (f"type {new[0]}, was {old[0]}",)
    if category == "functions":
        out = []
        if old[0] != new[0]:
            out.append(f"returns {new[0]}, was {old[0]}")
        if len(old[1]) != len(new[1]):
            out.append(f"takes {len(new[1])} parameter(s), was {len(old[1])}")
        for i, (a, b) in enumerate(zip(old[1], new[1]), 1):
            if a != b:
                out.append(f"parameter {i} is {b}, was {a}")
        if old[2] != new[2]:
            out.append("now variadic" if new[2] else "no longer variadic")
        return tuple(out)
    kind = new[0]
    if kind != old[0]:
        return (f"is now a {kind}, was a {old[0]}",)
    if kind == "typedef":
        return (f"names {new[1]}, was {old[1]}",)
    if kind == "enum":
        a, b = dict((n, v) for n, v in old[1]), dict((n, v) for n, v in new[1])
        out = [f"{n} = {b[n]}, was {a[n]}" for n in a if n in b and a[n] != b[n]]
        out += [f"{n} removed" for n in a if n not in b] + [f"{n} added" for n in b if n not in a]
        return tuple(out) or ("enumerators reordered",)
    out = []
    if old[3] is None or new[3] is None:
        return ("now opaque" if new[3] is None else "now complete (was opaque)",)
    if old[1] != new[1]:
        out.append(f"size {new[1]}, was {old[1]}")
    if old[2] != new[2]:
        out.append(f"alignment {new[2]}, was {old[2]}")
    a = {f[0]: f for f in old[3]}
    b = {f[0]: f for f in new[3]}
    for name, f in a.items():
        g = b.get(name)
        if g is None:
            out.append(f"member {name} removed")
        elif f != g:
            parts = []
            if f[1] != g[1]:
                parts.append(f"offset {g[1]}, was {f[1]}")
            if f[2] != g[2]:
                parts.append(f"type {g[2]}, was {f[2]}")
            if f[3] != g[3]:
                parts.append(f"width {g[3]}, was {f[3]}")
            out.append(f"member {name}: " + ", ".join(parts))
    out += [f"member {name} added" for name in b if name not in a]
    return tuple(out) or ("members reordered",)


# --------------------------------------------------------------------------- made callable

class Declarations:
    """An interface made callable: the FFI holding its declarations, and each declared function's cffi type.

    A module keeps one FFI for its whole life and, when a reload only adds
    declarations, grows it in place (:meth:`grow`): cdata made before the
    reload keep the same types, so the new functions accept them. An
    incompatible change accepted on purpose starts a new FFI.

    Attributes:
        interface: the Interface described.
        ffi: the cffi.FFI (shared by every Declarations grown from the same one).
        cdef: the declarations' text.
        function_types: function name -> its cffi ctype, in declaration order.
        functions: the function names.
    """

    def __init__(self, interface: Interface, ffi: cffi.FFI) -> None:
        self.interface = interface
        self.ffi = ffi
        self.cdef = interface.cdef
        wanted = interface.names
        # cffi has no public accessor for a declared function's type; its
        # parser's declarations (and _get_cached_btype) have been stable since cffi 1.0.
        with ffi._lock:
            declared = ffi._parser._declarations
            self.function_types = {name: ffi._get_cached_btype(declared["function " + name][0])
                                   for name in wanted if "function " + name in declared}
        self.functions = tuple(self.function_types)

    @classmethod
    def of(cls, interface: Interface, *, module: str | None = None) -> "Declarations":
        """Declarations on an FFI of their own (the interface's, when it was parsed from a cdef)."""
        ffi = interface.ffi if interface.ffi is not None else parse(interface.cdef, module=module).ffi
        _given.setdefault(ffi, interface)
        return cls(interface, ffi)

    def grow(self, new: Interface, *, module: str | None = None) -> "Declarations":
        """``new`` on this FFI, which is given whatever ``new`` adds to what it holds.

        Raises:
            InterfaceError: ``new`` is not an extension of what the FFI holds
                (the caller decides: refuse, or start over with :meth:`of`).
        """
        change = diff(_given[self.ffi], new)
        if not change:
            return Declarations(new, self.ffi)
        if not change.compatible:
            raise change.error(module=module)
        try:
            self.ffi.cdef(change.added_cdef)
        except Exception as exc:    # cffi's CDefError, FFIError, pycparser's ParseError
            raise InterfaceError(f"{'module ' + repr(module) + ': ' if module else ''}cannot add the new "
                                 f"declarations to the module's FFI: {exc}", module=module) from exc
        _given[self.ffi] = new
        return Declarations(new, self.ffi)


# What each module FFI has been given so far: a reload that was prepared and
# then aborted may have grown it beyond the interface that serves.
_given: "weakref.WeakKeyDictionary[cffi.FFI, Interface]" = weakref.WeakKeyDictionary()
