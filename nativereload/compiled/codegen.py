"""The code generator: declared functions -> call *shapes* -> the C of one cffi API-mode extension.

A compiled wrapper does not call a symbol: it calls whatever address it is
given, through a function pointer of the right *shape*. The shape of a
function is its signature spelled with types that every cffi FFI shares
(primitives, ``void``, and pointers, arrays and function pointers made of
them); a type cffi makes anew per FFI (a struct, union or enum, or a pointer
to one) is spelled ``void *`` or, for an enum, as its integer type. So:

* One extension serves every image of an interface, and every interface with
  the same set of shapes: a reload only swaps addresses, and a changed
  interface compiles only if it brings a shape that was not there.
* The extension knows nothing of the module's types, so it accepts and
  returns the very ctypes of the module's ``ffi`` (what the user's
  ``mod.ffi.new(...)`` made). For an argument spelled ``void *`` the call
  checks that it is a cdata of the declared ctype (and takes the gate's cffi
  function otherwise, which accepts or refuses it exactly as before); a
  result spelled ``void *`` is cast back to the declared ctype
  (``_gate.CompiledFunction``).

A shape's wrapper ``_nrw_<i>(uintptr_t target, args...)`` is a cffi
declaration; the C behind it is a macro that casts ``target`` to the shape's
function pointer type and calls it, so cffi generates every argument and
result conversion and releases the GIL around the call exactly as in API mode.

Functions that keep the gate's cffi call (per function, never per module):
variadic ones (no wrapper can forward ``...``), ones that pass or return a
struct or union by value (cffi converts those only into its own per-FFI
type), and ones using ``long double``, complex or other types outside
:data:`SHARED_PRIMITIVES`.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import sysconfig
from typing import Any, Mapping, NamedTuple

import cffi

__all__ = ["GENERATOR_VERSION", "Plan", "Shape", "plan", "write_source"]

#: Bump when the generated C changes meaning: it is part of every cache key.
GENERATOR_VERSION = 2

#: How the extension is compiled (part of every cache key). _CFFI_NO_LIMITED_API: the extension is built
#: for one interpreter anyway (the key names its ABI), the full API's macros are faster, and free-threaded
#: builds have no limited API (cffi 1.17 would otherwise ask for it).
COMPILE_FLAGS = ("-shared", "-fPIC", "-O2", "-D_CFFI_NO_LIMITED_API")

#: Primitive types the generated C can spell with the standard headers below,
#: and whose ctypes cffi shares between all FFIs.
SHARED_PRIMITIVES = frozenset({
    "char", "signed char", "unsigned char", "short", "unsigned short", "int", "unsigned int", "long",
    "unsigned long", "long long", "unsigned long long", "float", "double", "_Bool", "size_t", "ssize_t",
    "intptr_t", "uintptr_t", "ptrdiff_t", "intmax_t", "uintmax_t", "wchar_t", "char16_t", "char32_t",
    *(f"{sign}int{bits}_t" for sign in ("", "u") for bits in (8, 16, 32, 64)),
    *(f"{sign}int_{kind}{bits}_t" for sign in ("", "u") for kind in ("least", "fast") for bits in (8, 16, 32, 64)),
})

# Types a shape's *fast entry* converts itself (see write_source): integers, floating point, and bytes
# passed as char *. Plain "char" is not among them: cffi converts it to and from bytes of length 1.
_FAST_SIGNED = frozenset({
    "signed char", "short", "int", "long", "long long", "ssize_t", "intptr_t", "ptrdiff_t", "intmax_t",
    *(f"int{bits}_t" for bits in (8, 16, 32, 64)),
    *(f"int_{kind}{bits}_t" for kind in ("least", "fast") for bits in (8, 16, 32, 64)),
})
_FAST_UNSIGNED = frozenset({
    "unsigned char", "unsigned short", "unsigned int", "unsigned long", "unsigned long long", "size_t",
    "uintptr_t", "uintmax_t",
    *(f"uint{bits}_t" for bits in (8, 16, 32, 64)),
    *(f"uint_{kind}{bits}_t" for kind in ("least", "fast") for bits in (8, 16, 32, 64)),
})
_FAST_FLOAT = frozenset({"float", "double"})

_ENUM_SPELLING = {1: ("signed char", "unsigned char"), 2: ("short", "unsigned short"),
                  4: ("int", "unsigned int"), 8: ("long long", "unsigned long long")}

_PREAMBLE = """\
/* nativereload compiled calls: each _nrw_<i>(target, ...) calls `target` as shape <i>. */
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <wchar.h>
#include <uchar.h>
"""

_scratch = cffi.FFI()       # spells shared types (they are the same ctype objects in every FFI)


class Unsupported(Exception):
    """A function that keeps the gate's cffi call; the message says why (for the log and status)."""


class Shape(NamedTuple):
    """A call shape: the result's and the arguments' C spellings (shared types only)."""

    result: str
    args: tuple[str, ...]

    def declaration(self, name: str) -> str:
        """The cdef of this shape's wrapper: ``result name(uintptr_t, args...)``."""
        params = ", ".join(("uintptr_t",) + self.args)
        return _scratch.getctype(_scratch.typeof(self.result), f"{name}({params})")

    @property
    def fast(self) -> bool:
        """Whether this shape gets a fast entry (every type one the entry converts itself)."""
        return (self.result in _FAST_SIGNED or self.result in _FAST_UNSIGNED or self.result in _FAST_FLOAT
                or self.result == "void") and all(
            arg in _FAST_SIGNED or arg in _FAST_UNSIGNED or arg in _FAST_FLOAT or arg == "char *"
            for arg in self.args)

    def pointer_type(self) -> str:
        """The C type of a pointer to a function of this shape."""
        return _scratch.getctype(_scratch.typeof(self.result), f"(*)({', '.join(self.args) or 'void'})")


class Entry(NamedTuple):
    """How one declared function is compiled: its shape's index, and what the call must check and cast."""

    index: int
    arity: int
    checks: tuple | None        # per argument: None, or the declared ctype a void *-spelled argument must have
    result_type: Any            # None, or the declared ctype a void *-spelled result is cast back to


class Plan(NamedTuple):
    """The compiled path of one interface: its shapes, which function uses which, and the cache key.

    Attributes:
        shapes: the distinct shapes, sorted (wrapper ``_nrw_<i>`` is ``shapes[i]``).
        entries: symbol -> Entry, for each function that is compiled.
        skipped: symbol -> why it keeps the gate's cffi call.
        key: the text the cache is keyed by (generator, cffi, Python ABI, machine, shapes).
        digest: SHA-256 of ``key``; names the extension and its cache file.
    """

    shapes: tuple[Shape, ...]
    entries: Mapping[str, Entry]
    skipped: Mapping[str, str]
    key: str
    digest: str

    @property
    def module_name(self) -> str:
        return f"_nativereload_calls_{self.digest[:24]}"


def _shared(ctype: Any) -> bool:
    """Whether cffi gives ``ctype`` the same ctype object in every FFI (and C can spell it with _PREAMBLE)."""
    kind = ctype.kind
    if kind == "void":
        return True
    if kind == "primitive":
        return ctype.cname in SHARED_PRIMITIVES
    if kind in ("pointer", "array"):
        return _shared(ctype.item)
    if kind == "function":
        return not ctype.ellipsis and _shared(ctype.result) and all(_shared(a) for a in ctype.args)
    return False


def _spell(ffi: Any, ctype: Any, where: str) -> tuple[str, bool]:
    """(spelling, spelled void * instead of the declared pointer type) for one argument or the result.

    Raises:
        Unsupported: a type the compiled path does not take.
    """
    kind = ctype.kind
    if _shared(ctype):
        if kind == "array":        # an array parameter is a pointer (cffi already decays them; be sure)
            return _scratch.getctype(_scratch.typeof(ctype.item.cname), "*"), False
        return ctype.cname, False
    if kind == "enum":
        size = ffi.sizeof(ctype)
        if size not in _ENUM_SPELLING:
            raise Unsupported(f"its {where} is an enum of {size} bytes")
        signed = int(ffi.cast(ctype, -1)) < 0
        return _ENUM_SPELLING[size][0 if signed else 1], False
    if kind in ("pointer", "array", "function"):
        return "void *", True
    if kind in ("struct", "union"):
        raise Unsupported(f"it passes a {kind} by value ({where} {ctype.cname})")
    raise Unsupported(f"its {where} type {ctype.cname} has no compiled conversion")


def _function_shape(ffi: Any, ctype: Any) -> tuple[Shape, tuple | None, Any]:
    if ctype.ellipsis:
        raise Unsupported("it is variadic")
    result, cast_result = _spell(ffi, ctype.result, "result")
    args, checks = [], []
    for position, arg in enumerate(ctype.args):
        spelling, checked = _spell(ffi, arg, f"argument {position + 1}")
        args.append(spelling)
        checks.append(arg if checked else None)
    return (Shape(result, tuple(args)), tuple(checks) if any(c is not None for c in checks) else None,
            ctype.result if cast_result else None)


def abi_tag() -> str:
    """What makes a compiled extension loadable by this interpreter (part of every cache key)."""
    gil_disabled = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    return (f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')} abiflags={sys.abiflags!r} "
            f"gil_disabled={gil_disabled} {platform.machine()} {sys.platform}")


def plan(ffi: Any, function_types: Mapping[str, Any]) -> Plan:
    """The compiled path of the functions ``function_types`` (name -> cffi function ctype of ``ffi``)."""
    found: dict[str, tuple[Shape, tuple | None, Any, int]] = {}
    skipped: dict[str, str] = {}
    for name, ctype in function_types.items():
        try:
            shape, checks, result_type = _function_shape(ffi, ctype)
        except Unsupported as why:
            skipped[name] = str(why)
            continue
        found[name] = (shape, checks, result_type, len(ctype.args))
    shapes = tuple(sorted({shape for shape, *_ in found.values()}))
    index = {shape: i for i, shape in enumerate(shapes)}
    entries = {name: Entry(index[shape], arity, checks, result_type)
               for name, (shape, checks, result_type, arity) in found.items()}
    key = "\n".join([
        f"nativereload compiled calls, generator {GENERATOR_VERSION}",
        f"cffi {cffi.__version__}",
        f"python {abi_tag()}",
        f"flags {' '.join(COMPILE_FLAGS)}",
        *(shape.declaration(f"_nrw_{i}") for i, shape in enumerate(shapes)),
    ]) + "\n"
    return Plan(shapes, entries, skipped, key, hashlib.sha256(key.encode()).hexdigest())


def _fast_entry(i: int, shape: Shape) -> str:
    """C of shape ``i``'s fast entry: ``PyObject *_nrf_<i>(void *target, PyObject *const *args)``.

    It takes only arguments whose conversion is plain (an exact int in range, an exact float, exact bytes
    for ``char *``), converts them as cffi would, and calls ``target`` with the GIL released and errno
    kept as cffi keeps it. For anything else it returns NULL with no exception set: the caller then calls
    the cffi wrapper, which accepts or refuses the arguments exactly as cffi does.
    """
    lines = [f"static PyObject *_nrf_{i}(void *_nr_t, PyObject *const *_nr_a)", "{"]
    for k, arg in enumerate(shape.args):
        lines.append(f"    {arg} x{k};")
        if arg in _FAST_FLOAT:
            lines.append(f"    if (!PyFloat_CheckExact(_nr_a[{k}])) return NULL;")
            lines.append(f"    x{k} = ({arg})PyFloat_AS_DOUBLE(_nr_a[{k}]);")
        elif arg == "char *":
            lines.append(f"    if (!PyBytes_CheckExact(_nr_a[{k}])) return NULL;")
            lines.append(f"    x{k} = PyBytes_AS_STRING(_nr_a[{k}]);")
        else:
            wide, convert = (("long long", "PyLong_AsLongLong") if arg in _FAST_SIGNED else
                             ("unsigned long long", "PyLong_AsUnsignedLongLong"))
            lines += [f"    if (!PyLong_CheckExact(_nr_a[{k}])) return NULL;",
                      f"    {{ {wide} v = {convert}(_nr_a[{k}]);",
                      f"      if (v == ({wide})-1 && PyErr_Occurred()) {{ PyErr_Clear(); return NULL; }}",
                      f"      if (({wide})({arg})v != v) return NULL;",
                      f"      x{k} = ({arg})v; }}"]
    call = f"(({shape.pointer_type()})_nr_t)({', '.join(f'x{k}' for k in range(len(shape.args)))})"
    if shape.result != "void":
        lines.append(f"    {shape.result} r;")
        call = "r = " + call
    lines += ["    Py_BEGIN_ALLOW_THREADS", "    _cffi_restore_errno();", f"    {call};", "    _cffi_save_errno();",
              "    Py_END_ALLOW_THREADS"]
    if shape.result == "void":
        lines.append("    Py_RETURN_NONE;")
    elif shape.result in _FAST_FLOAT:
        lines.append("    return PyFloat_FromDouble((double)r);")
    elif shape.result in _FAST_SIGNED:
        lines.append("    return PyLong_FromLongLong((long long)r);")
    else:
        lines.append("    return PyLong_FromUnsignedLongLong((unsigned long long)r);")
    lines.append("}")
    return "\n".join(lines)


def write_source(the_plan: Plan, path: str) -> None:
    """Write the C source of ``the_plan``'s extension to ``path`` (cffi's recompiler does the conversions).

    Besides the wrappers, each shape whose types allow it gets a fast entry (:func:`_fast_entry`);
    ``_nr_fast(i)`` returns its address (0 if none), which ``_gate.CompiledFunction`` calls directly,
    skipping the argument tuple and cffi's generic conversions.
    """
    ffi = cffi.FFI()
    ffi.cdef("".join(f"{shape.declaration(f'_nrw_{i}')};\n" for i, shape in enumerate(the_plan.shapes))
             + "uintptr_t _nr_fast(int);\n")
    macros, fast = [], []
    for i, shape in enumerate(the_plan.shapes):
        params = [f"a{k}" for k in range(len(shape.args))]
        macros.append(f"#define _nrw_{i}({', '.join(['t', *params])}) "
                      f"(({shape.pointer_type()})(t))({', '.join(params)})")
        if shape.fast:
            fast.append((i, _fast_entry(i, shape)))
    cases = "".join(f"    case {i}: return (uintptr_t)&_nrf_{i};\n" for i, _ in fast)
    lookup = f"static uintptr_t _nr_fast(int i)\n{{\n    switch (i) {{\n{cases}    default: return 0;\n    }}\n}}\n"
    source = _PREAMBLE + "\n".join(macros) + "\n\n" + "\n\n".join(body for _, body in fast) + "\n\n" + lookup
    # compiler_verbose=False: cffi prints no "generating ..." line
    ffi.set_source(the_plan.module_name, source, compiler_verbose=False)
    ffi.emit_c_code(path)
