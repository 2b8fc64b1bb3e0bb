"""interface.py: a module's declarations as data, read from the .so before it is loaded, and compared."""

from __future__ import annotations

import json
import os
import signal

import cffi
import pytest

from nativereload import interface
from nativereload.errors import InterfaceError

from conftest import run_python

BASE = """
#define LIMIT 10
struct point { int x; int y; };
typedef struct { double re, im; } complex_t;
typedef long count_t;
enum mode { FAST = 1, SAFE = 2 };
struct opaque;
count_t add(count_t a, long b);
int version(void);
long norm1(const struct point *p);
int logf_(const char *fmt, ...);
void (*callback(int which))(int);
extern int verbose;
"""


def _changed(old: str, new: str) -> interface.Diff:
    return interface.diff(interface.parse(BASE), interface.parse(BASE.replace(old, new)))


# --------------------------------------------------------------------------- describing a cdef

def test_parse_describes_every_kind_of_declaration():
    i = interface.parse(BASE)
    add = i.functions["add"]
    assert (add.result, add.params, add.variadic) == ("long", ("long", "long"), False)   # typedef resolved
    assert add.declaration == "long add(long, long)"
    assert i.functions["logf_"].variadic and i.functions["logf_"].params == ("char *",)
    assert i.functions["logf_"].declaration == "int logf_(const char *, ...)"
    assert i.functions["callback"].declaration == "void (*callback(int))(int)"
    point = i.types["struct point"]
    assert (point.kind, point.size, point.alignment) == ("struct", 8, 4)
    assert [(f.name, f.offset, f.type) for f in point.fields] == [("x", 0, "int"), ("y", 4, "int")]
    assert i.types["complex_t"].size == 16 and i.types["complex_t"].declaration.startswith("typedef struct {")
    assert i.types["count_t"].target == "long"
    assert i.types["enum mode"].values == (("FAST", 1), ("SAFE", 2))
    assert i.types["struct opaque"].fields is None
    assert i.constants == {"LIMIT": 10} and i.variables == {"verbose": "int"}
    assert i.names == ("add", "version", "norm1", "logf_", "callback")
    assert i.declaration("struct point") == "struct point { int x; int y; }"
    assert i.declaration("LIMIT") == "#define LIMIT 10" and i.declaration("nope") is None
    assert i.ffi is not None and i.cdef == BASE


def test_parse_errors_are_interface_errors():
    with pytest.raises(InterfaceError, match="empty"):
        interface.parse("  ")
    with pytest.raises(InterfaceError, match="does not parse") as info:
        interface.parse("int f(;", module="m")
    assert info.value.module == "m"


def test_digest_ignores_order_parameter_names_and_const():
    a = interface.parse("int f(const char *s); long g(long x);")
    b = interface.parse("long g(long);\nint f(const char *name);")
    assert a.digest == b.digest and a == b and not interface.diff(a, b)
    # const is not part of what a caller relies on: same meaning, so no change (digests may differ).
    c = interface.parse("int f(char *s); long g(long x);")
    assert not interface.diff(a, c)


# --------------------------------------------------------------------------- diff rules

@pytest.mark.parametrize("old, new, name, detail", [
    ("int version(void);", "double version(void);", "version", "returns double, was int"),
    ("count_t add(count_t a, long b);", "count_t add(count_t a, int b);", "add", "parameter 2 is int, was long"),
    ("count_t add(count_t a, long b);", "count_t add(count_t a);", "add", "takes 1 parameter(s), was 2"),
    ("int logf_(const char *fmt, ...);", "int logf_(const char *fmt);", "logf_", "no longer variadic"),
    ("struct point { int x; int y; };", "struct point { int x; long y; };", "struct point",
     "member y: offset 8, was 4, type long, was int"),
    ("struct point { int x; int y; };", "struct point { int y; int x; };", "struct point", "member x: offset 4, was 0"),
    ("enum mode { FAST = 1, SAFE = 2 };", "enum mode { FAST = 1, SAFE = 3 };", "enum mode", "SAFE = 3, was 2"),
    ("enum mode { FAST = 1, SAFE = 2 };", "enum mode { FAST = 1, SAFE = 2, PARANOID };", "enum mode",
     "PARANOID added"),
    ("typedef long count_t;", "typedef int count_t;", "count_t", "names int, was long"),
    ("#define LIMIT 10", "#define LIMIT 11", "LIMIT", "11, was 10"),
    ("extern int verbose;", "extern long verbose;", "verbose", "type long, was int"),
])
def test_changes_are_incompatible(old, new, name, detail):
    difference = _changed(old, new)
    assert not difference.compatible and difference
    changes = {c.name: c for c in difference.changed}
    assert name in changes and detail in changes[name].details
    assert changes[name].old and changes[name].new and changes[name].old != changes[name].new


def test_removal_is_incompatible_and_additions_are_compatible():
    removed = _changed("int version(void);", "")
    assert not removed.compatible and [c.name for c in removed.removed] == ["version"]
    assert removed.removed[0].old == "int version(void)" and removed.removed[0].new is None
    added = _changed("int version(void);", "int version(void);\nlong triple(long);\nstruct extra { char c; };\n"
                     "#define EXTRA 3")
    assert added.compatible and bool(added)
    assert {(c.category, c.name) for c in added.added} == {("function", "triple"), ("type", "struct extra"),
                                                           ("constant", "EXTRA")}
    assert added.summary() == "3 added (compatible)"


def test_render_shows_old_and_new_together():
    difference = _changed("int version(void);", "double version(void);")
    text = difference.render()
    assert text.splitlines() == ["changed function version: returns double, was int",
                                 "    old: int version(void)", "    new: double version(void)"]
    doc = json.loads(json.dumps(difference.to_json()))
    assert doc["compatible"] is False and doc["changed"][0]["old"] == "int version(void)"
    assert interface.Diff().render() == "no change" and interface.Diff().compatible


def test_error_names_the_function_and_both_declarations():
    difference = _changed("int version(void);", "double version(void);")
    error = difference.error(module="counter", path="/b/counter.so", outcome="reload refused; generation 3 "
                             "still serving")
    assert isinstance(error, InterfaceError)
    assert (error.module, error.path, error.function) == ("counter", "/b/counter.so", "version")
    assert (error.old, error.new, error.diff) == ("int version(void)", "double version(void)", difference)
    message = str(error)
    assert "module 'counter'" in message and "generation 3 still serving" in message
    assert "old: int version(void)" in message and "new: double version(void)" in message
    assert "allow_interface_change=True" in message


def test_added_cdef_grows_an_ffi_that_holds_the_old_interface():
    old = interface.parse(BASE)
    new = interface.parse(BASE + "struct later;\n"
                                 "typedef struct { complex_t c; struct point p; } pair_t;\n"
                                 "enum shade { DARK = 4 };\n"
                                 "struct later { pair_t pair; enum shade shade; };\n"
                                 "pair_t make_pair(struct later *);\n#define MORE 7\n")
    difference = interface.diff(old, new)
    assert difference.compatible
    ffi = old.ffi
    before = ffi.new("struct point *", {"x": 1, "y": 2})
    ffi.cdef(difference.added_cdef)         # no duplicate declaration, every dependency in order
    later = ffi.new("struct later *")
    later.pair.p = before[0]                # cdata made before the growth mixes with the new types
    assert later.pair.p.y == 2 and ffi.sizeof("pair_t") == 24 and ffi.sizeof("struct later") == 32
    grown = interface.from_ffi(ffi, old.cdef + difference.added_cdef)
    assert grown.digest == new.digest


# --------------------------------------------------------------------------- embedded in a library

def test_embedded_interfaces_of_the_samples(samples):
    base = interface.read(samples["contract"])
    assert base is not None and base.source == str(samples["contract"])
    assert set(base.functions) == {"contract_version", "contract_add", "contract_norm1", "contract_weight",
                                   "contract_wait_fd", "contract_scaled"}
    assert "contract_twice" not in base.cdef       # hidden behind NATIVERELOAD_CDEF
    assert base.constants == {"CONTRACT_LIMIT": 100}
    assert interface.read(samples["v1"]) is None   # built without INTERFACE
    expected = {"contract_v2": None, "contract_abort": None, "contract_add": "added",
                "contract_return": "changed", "contract_param": "changed", "contract_struct": "changed",
                "contract_enum": "changed", "contract_drop": "removed"}
    for variant, kind in expected.items():
        difference = interface.diff(base, interface.read(samples[variant]))
        assert difference.compatible == (kind in (None, "added")), variant
        assert bool(difference) == (kind is not None), variant
        if kind:
            assert len(getattr(difference, kind)) == 1, variant


def test_embedded_cdef_loads_the_library(samples):
    embedded = interface.read(samples["contract"])
    ffi = cffi.FFI()
    ffi.cdef(embedded.cdef)
    lib = ffi.dlopen(str(samples["contract"]))
    assert lib.contract_version() == 1 and lib.contract_add(2, 3) == 5
    assert lib.contract_norm1(ffi.new("struct contract_point *", {"x": -3, "y": 4})) == 7
    assert lib.contract_weight(lib.CONTRACT_SAFE) == 10 and lib.contract_scaled(21) == 42
    assert lib.CONTRACT_LIMIT == 100


def test_added_cdef_with_a_real_module(samples):
    old, new = interface.read(samples["contract"]), interface.read(samples["contract_add"])
    ffi = cffi.FFI()
    ffi.cdef(old.cdef)
    point = ffi.new("struct contract_point *", {"x": 1, "y": -2})
    ffi.cdef(interface.diff(old, new).added_cdef)
    lib = ffi.dlopen(str(samples["contract_add"]))
    assert lib.contract_added(1) == 101 and lib.contract_norm1(point) == 3   # old cdata, new library


def test_reading_the_interface_runs_none_of_the_library(samples):
    path = str(samples["contract_abort"])
    read = run_python(f"from nativereload import interface\n"
                      f"print(sorted(interface.read({path!r}).functions))")
    assert read.returncode == 0, read.stderr
    assert "contract_version" in read.stdout
    # The constructor really would abort: loading it kills the process.
    loaded = run_python(f"import cffi\ncffi.FFI().dlopen({path!r})\nprint('survived')")
    assert loaded.returncode == -signal.SIGABRT and "survived" not in loaded.stdout


def test_read_fd_does_not_move_the_offset(samples):
    fd = os.open(samples["contract"], os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        assert interface.read_fd(fd) is not None
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7
    finally:
        os.close(fd)


def test_read_refuses_what_is_not_an_interface(tmp_path):
    with pytest.raises(InterfaceError, match="not an ELF"):
        (tmp_path / "x.so").write_bytes(b"not elf at all, not at all, really")
        interface.read(tmp_path / "x.so")
    good = interface.parse("int f(void);").section_bytes()
    assert interface.from_section(good).functions["f"].result == "int"
    assert interface.from_section(good + b"\0\0\0").digest                 # padding is fine
    with pytest.raises(InterfaceError, match="more than one interface"):
        interface.from_section(good + good)
    with pytest.raises(InterfaceError, match="not a nativereload interface"):
        interface.from_section(b"something else\n{}")
    with pytest.raises(InterfaceError, match="upgrade nativereload"):
        interface.from_section(good.replace(b"interface 1 ", b"interface 9 ", 1))
    with pytest.raises(InterfaceError, match="truncated"):
        interface.from_section(good[:-20])
    corrupt = good.replace(b'"functions"', b'"functions!', 1)
    lazy = interface.from_section(corrupt)          # the header alone is read at once
    with pytest.raises(InterfaceError, match="corrupt"):
        lazy.functions


def test_an_unchanged_interface_is_compared_without_decoding():
    old = interface.from_section(interface.parse(BASE).section_bytes())
    new = interface.from_section(interface.parse(BASE).section_bytes())
    assert not interface.diff(old, new)
    assert old._raw is None and new._raw is None      # equal digests: no JSON decoded


def test_unchanged_embedded_interface_is_compared_without_decoding(samples):
    old, new = interface.read(samples["contract"]), interface.read(samples["contract_v2"])
    assert not interface.diff(old, new)
    assert old._raw is None and new._raw is None      # equal digests: no JSON decoded


def test_read_fd_returns_the_serving_interface_when_unchanged(samples):
    serving = interface.read(samples["contract"])
    for variant, same in (("contract_v2", True), ("contract_add", False), ("v1", None)):
        fd = os.open(samples[variant], os.O_RDONLY)
        try:
            found = interface.read_fd(fd, serving=serving)
        finally:
            os.close(fd)
        if same is None:
            assert found is None               # no interface embedded
        elif same:
            assert found is serving            # only the first line was read
        else:
            assert found is not serving and found != serving


def test_sections_are_found_by_whole_name(samples):
    from nativereload import elf

    fd = os.open(samples["contract"], os.O_RDONLY)
    try:
        assert elf.read_section(fd, ".dynstr").count(b"contract_add\0") == 1
        assert elf.read_section(fd, ".dyn") is None and elf.read_section(fd, "dynstr") is None
        offset, size = elf.find_section(fd, interface.SECTION)
        assert os.pread(fd, 23, offset) == b"nativereload-interface "
    finally:
        os.close(fd)
    assert {"contract_add", "contract_version"} <= elf.defined_symbols(samples["contract"])
    assert "contract_twice" not in elf.defined_symbols(samples["contract"])   # static inline: not exported
