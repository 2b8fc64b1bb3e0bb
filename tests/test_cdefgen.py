"""`nativereload cdef`: real headers as cdefs, and cdef_from_source for code without a header."""

from __future__ import annotations

import subprocess
import textwrap
import zlib
from pathlib import Path

import cffi
import pytest

from nativereload import cdefgen
from nativereload._cdecl import lex
from nativereload._cexpr import NotConstant, evaluate
from nativereload.errors import InterfaceError

from conftest import SYSTEM_LIBDIR, require_real_library

LIBDIR = SYSTEM_LIBDIR
INCLUDE = Path("/usr/include")


def _system(header: str, library: str) -> tuple[cdefgen.Cdef, cffi.FFI, object]:
    require_real_library(INCLUDE / header, LIBDIR / library)
    cdef = cdefgen.cdef_from_header(INCLUDE / header)
    ffi = cffi.FFI()
    ffi.cdef(cdef.text)     # parses as it is
    return cdef, ffi, ffi.dlopen(str(LIBDIR / library))


def _resolvable(lib, names) -> list[str]:
    missing = []
    for name in names:
        try:
            getattr(lib, name)
        except AttributeError:
            missing.append(name)
    return missing


# --------------------------------------------------------------------------- the five real libraries

def test_zlib():
    cdef, ffi, z = _system("zlib.h", "libz.so.1")
    assert len(cdef.functions) >= 75 and "deflateInit_" in cdef.functions
    assert z.crc32(0, b"hello", 5) == zlib.crc32(b"hello")
    assert z.adler32(1, b"hello", 5) == zlib.adler32(b"hello")
    size = ffi.new("uLongf *", z.compressBound(1000))
    out = ffi.new("Bytef[]", size[0])
    assert z.compress(out, size, b"x" * 1000, 1000) == z.Z_OK == 0
    assert zlib.decompress(ffi.buffer(out, size[0])[:]) == b"x" * 1000
    # zconf.h's types and glibc's off_t chain came along; va_list's function did not.
    assert "typedef unsigned long uLong;" in cdef.text and "off_t" in cdef.text
    assert dict(cdef.dropped)["gzvprintf"].startswith("needs va_list")
    assert ffi.sizeof("z_stream") == 112   # the layout the compiler gives (checked by cdefgen too)
    assert cdefgen.unexported(cdef.functions, LIBDIR / "libz.so.1") == []


def test_zstd():
    cdef, ffi, s = _system("zstd.h", "libzstd.so.1")
    data = b"nativereload " * 50
    bound = s.ZSTD_compressBound(len(data))
    out = ffi.new("char[]", bound)
    size = s.ZSTD_compress(out, bound, data, len(data), 3)
    assert not s.ZSTD_isError(size)
    back = ffi.new("char[]", len(data))
    assert s.ZSTD_decompress(back, len(data), out, size) == len(data) and ffi.buffer(back)[:] == data
    # Macros computed with C's arithmetic: (0ULL - 1) is not -1.
    assert s.ZSTD_CONTENTSIZE_UNKNOWN == 2**64 - 1 and s.ZSTD_VERSION_NUMBER == s.ZSTD_versionNumber()
    assert s.ZSTD_c_compressionLevel == 100   # enum values kept
    assert _resolvable(s, cdef.functions) == []


def test_lz4():
    cdef, ffi, lz = _system("lz4.h", "liblz4.so.1")
    data = b"abcabcabc" * 40
    bound = lz.LZ4_compressBound(len(data))
    out = ffi.new("char[]", bound)
    size = lz.LZ4_compress_default(data, out, len(data), bound)
    back = ffi.new("char[]", len(data))
    assert lz.LZ4_decompress_safe(out, back, size, len(data)) == len(data) and ffi.buffer(back)[:] == data
    assert lz.LZ4_versionNumber() == lz.LZ4_VERSION_NUMBER
    assert _resolvable(lz, cdef.functions) == []


def test_xxhash_sizeof_bounds():
    cdef, ffi, x = _system("xxhash.h", "libxxhash.so.0")
    # Known answers (the xxHash specification's empty-input values).
    assert x.XXH64(b"", 0, 0) == 0xEF46DB3751D8E999
    assert x.XXH32(b"", 0, 0) == 0x02CC5D05
    # "unsigned char digest[sizeof(XXH128_hash_t)]": the compiler's value, in the cdef as a number.
    assert "sizeof" not in cdef.text.replace("/*", "\n").split("\n", 1)[0]
    assert ffi.sizeof("XXH128_canonical_t") == 16 and ffi.sizeof("XXH64_canonical_t") == 8
    canonical = ffi.new("XXH64_canonical_t *")
    x.XXH64_canonicalFromHash(canonical, 0x0102030405060708)
    assert bytes(canonical.digest) == bytes(range(1, 9))
    assert _resolvable(x, cdef.functions) == []


def test_sqlite_reports_unexported_functions():
    cdef, ffi, q = _system("sqlite3.h", "libsqlite3.so.0")
    assert len(cdef.functions) > 250
    missing = cdefgen.unexported(cdef.functions, LIBDIR / "libsqlite3.so.0")
    # Compile-time options Debian's build leaves out: declared, not exported.
    assert {"sqlite3_win32_set_directory", "sqlite3_snapshot_get"} <= set(missing)
    assert missing == _resolvable(q, cdef.functions)   # what dlsym says, read from the file alone
    db = ffi.new("sqlite3 **")
    assert q.sqlite3_open(b":memory:", db) == q.SQLITE_OK
    stmt = ffi.new("sqlite3_stmt **")
    assert q.sqlite3_prepare_v2(db[0], b"select 6 * 7", -1, stmt, ffi.NULL) == q.SQLITE_OK
    assert q.sqlite3_step(stmt[0]) == q.SQLITE_ROW and q.sqlite3_column_int(stmt[0], 0) == 42
    q.sqlite3_finalize(stmt[0])
    assert q.sqlite3_close(db[0]) == q.SQLITE_OK
    assert "SQLITE_TRANSIENT" not in cdef.text   # a cast to a pointer is no integer constant


# --------------------------------------------------------------------------- what cffi cannot take

def _header(tmp_path: Path, text: str, name: str = "h.h") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_strips_what_cffi_cannot_parse(tmp_path):
    header = _header(tmp_path, """
        #include <stddef.h>
        #include <stdarg.h>
        #define API __attribute__((visibility("default")))
        __extension__ typedef long long big_t;
        API extern int f(const char *__restrict s, size_t n) __attribute__((nonnull(1)));
        extern int g(int) __asm__("g_v2");
        _Static_assert(sizeof(int) == 4, "int");
        static inline int helper(int x) { return x + 1; }
        static int hidden(void);
        int vf(const char *fmt, va_list ap);
        __int128 wide(void);
        int f(const char *s, size_t n);
        static const int SCONST = 42;
        static int private_counter;
        struct s { char buf[sizeof(long) * 2]; int n; };
        enum e { E_A = 1 << 4, E_B, E_C = sizeof(struct s) };
        enum
        { ANON = ((3) < 8 ? ((1 << (3)) << 8) : 0) };
        #define BIG (0ULL - 1)
        #define SHIFTED (1u << 31)
        #define NEG (-5)
        #define STR "text"
        #define FLT 1.5
        #define FN(x) (x)
        #ifdef NATIVERELOAD_CDEF
        #define ONLY_IN_CDEF_VIEW 1
        #else
        int only_for_the_compiler(struct unknown_to_cffi x);
        #endif
        """)
    cdef = cdefgen.cdef_from_header(header)
    ffi = cffi.FFI()
    ffi.cdef(cdef.text)
    assert cdef.functions == ("f", "g")          # f once, though declared twice
    dropped = dict(cdef.dropped)
    assert set(dropped) >= {"vf", "wide"} and "helper" not in cdef.text and "hidden" not in cdef.text
    assert "__int128" in dropped["wide"]
    assert "__attribute__" not in cdef.text and "__asm__" not in cdef.text and "restrict" not in cdef.text
    assert "_Static_assert" not in cdef.text.split("/* left out")[0]
    assert ffi.sizeof("struct s") == 20 and ffi.sizeof("big_t") == 8
    lib = ffi.dlopen(None)
    assert (lib.BIG, lib.SHIFTED, lib.NEG, lib.ONLY_IN_CDEF_VIEW) == (2**64 - 1, 2**31, -5, 1)
    assert lib.SCONST == 42 and "private_counter" not in cdef.text
    assert (lib.E_A, lib.E_B, lib.E_C, lib.ANON) == (16, 17, 20, 2048)
    for name in ("STR", "FLT", "FN", "only_for_the_compiler"):
        assert name not in cdef.text


def test_struct_cffi_would_lay_out_wrong_becomes_opaque(tmp_path):
    header = _header(tmp_path, """
        struct packed { char c; int i; } __attribute__((packed));
        typedef struct { char c; _Alignas(16) int i; } aligned_t;
        struct plain { char c; int i; };
        int use(struct packed *, aligned_t *, struct plain *);
        """)
    cdef = cdefgen.cdef_from_header(header)
    ffi = cffi.FFI()
    ffi.cdef(cdef.text)
    assert ffi.sizeof("struct plain") == 8
    for opaque in ("struct packed", "aligned_t"):
        with pytest.raises(ValueError):
            ffi.sizeof(opaque)        # declared, but opaque: better than a wrong size
    assert "opaque here" in cdef.text and "the compiler as 5 bytes" in cdef.text


def test_layouts_unchecked_when_the_header_does_not_compile(tmp_path):
    header = _header(tmp_path, """
        struct s { int a; };
        static inline int broken(void) { return no_such_variable; }
        int use(struct s *);
        """)
    cdef = cdefgen.cdef_from_header(header)     # preprocessing works; compiling it does not
    assert "struct layouts NOT checked against the compiler" in cdef.text and "no_such_variable" in cdef.text
    assert cdef.functions == ("use",)


def test_needed_types_from_other_headers_come_along(tmp_path):
    _header(tmp_path, """
        typedef unsigned long other_t;
        typedef other_t other2_t;
        struct by_value { int a; };
        struct by_pointer { int b; };
        typedef int unused_t;
        """, "other.h")
    header = _header(tmp_path, """
        #include <stdint.h>
        #include <time.h>
        #include "other.h"
        other2_t f(struct by_value v, struct by_pointer *p, uint32_t u, struct tm *t);
        """)
    cdef = cdefgen.cdef_from_header(header)
    text = cdef.text
    assert "typedef unsigned long other_t;" in text and "typedef other_t other2_t;" in text
    assert "struct by_value { int a; };" in text and "unused_t" not in text
    # Pointed to only: complete from a project header (the caller may allocate one), opaque from a system one.
    assert "struct by_pointer { int b; };" in text and "struct tm {" not in text
    assert "uint32_t;" not in text      # cffi knows it natively
    assert str(tmp_path / "other.h") in cdef.files


@pytest.mark.parametrize("by_line", [True, False])
def test_many_refused_declarations(tmp_path, monkeypatch, by_line):
    """A header that is not self-contained (it uses types another header defines): each use is left out."""
    lines = [f"typedef void (*callback{i}_t)(undefined_t value, int n);" for i in range(300)]
    lines += ["typedef int fine_t;", "fine_t works(fine_t);", "undefined_t broken(void);"]
    header = _header(tmp_path, "\n".join(lines) + "\n")
    if not by_line:   # an error that names no line: found by bisection
        monkeypatch.setattr(cdefgen, "_culprit", lambda exc, owners, kept: None)
    cdef = cdefgen.cdef_from_header(header)
    assert cdef.functions == ("works",)
    dropped = dict(cdef.dropped)
    assert len(dropped) == 301 and "broken" in dropped and "callback299_t" in dropped
    cffi.FFI().cdef(cdef.text)


def test_umbrella_header_with_also(tmp_path):
    _header(tmp_path, "int part_one(void);\n#define PART_ONE 1\n", "lib_one.h")
    _header(tmp_path, "int part_two(void);\n", "lib_two.h")
    _header(tmp_path, "int elsewhere(void);\n", "other.h")
    umbrella = _header(tmp_path, '#include "lib_one.h"\n#include "lib_two.h"\n#include "other.h"\nint top(void);\n',
                       "lib.h")
    assert cdefgen.cdef_from_header(umbrella).functions == ("top",)
    cdef = cdefgen.cdef_from_header(umbrella, also=["lib_*.h"])
    assert cdef.functions == ("part_one", "part_two", "top") and "#define PART_ONE 1" in cdef.text
    assert cdefgen.cdef_from_header(umbrella, also=[str(tmp_path / "other.h")]).functions == ("elsewhere", "top")


def test_missing_header_and_compiler_errors(tmp_path):
    with pytest.raises(InterfaceError, match="no such file"):
        cdefgen.cdef_from_header(tmp_path / "nope.h")
    bad = _header(tmp_path, "#include <no_such_header_here.h>\n")
    with pytest.raises(InterfaceError, match="no_such_header_here.h"):
        cdefgen.cdef_from_header(bad)
    with pytest.raises(InterfaceError, match="not installed"):
        cdefgen.cdef_from_header(_header(tmp_path, "int f(void);\n", "ok.h"), compiler="no-such-cc-xyz")


def test_include_dirs_and_defines(tmp_path):
    (tmp_path / "inc").mkdir()
    _header(tmp_path / "inc", "typedef int from_include_dir_t;\n", "dep.h")
    header = _header(tmp_path, """
        #include <dep.h>
        #if WANT == 2
        from_include_dir_t two(void);
        #else
        int other(void);
        #endif
        """)
    cdef = cdefgen.cdef_from_header(header, [tmp_path / "inc"], ["WANT=2"])
    assert cdef.functions == ("two",)


# --------------------------------------------------------------------------- cdef_from_source

CELL = """
#include <stdint.h>
#include <string.h>
typedef struct { double x, y; } vec2;
struct acc { long total; int count; };
static int helper(int x) { return x * 2; }
static inline int ihelper(int x) { return x; }
double dot(vec2 a, vec2 b) { return a.x * b.x + a.y * b.y; }
long accumulate(struct acc *acc, const int32_t *values, size_t n)
{
    for (size_t i = 0; i < n; i++) { acc->total += values[i]; acc->count++; }
    return acc->total;
}
int twice(int x) { return helper(x) + ihelper(0); }
size_t length(const char *s) { return strlen(s); }
"""


def test_cdef_from_source_declares_defined_functions(tmp_path):
    source = tmp_path / "cell.c"
    source.write_text(CELL)
    cdef = cdefgen.cdef_from_source(source)
    assert "helper" not in cdef.replace("twice", "")
    library = tmp_path / "cell.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    lib = ffi.dlopen(str(library))
    assert lib.dot({"x": 1.0, "y": 2.0}, {"x": 3.0, "y": 4.0}) == 11.0
    acc = ffi.new("struct acc *")       # defined in the file: declared complete, not opaque
    assert lib.accumulate(acc, ffi.new("int32_t[]", [1, 2, 3]), 3) == 6 and acc.count == 3
    assert lib.twice(21) == 42 and lib.length(b"four") == 4


# --------------------------------------------------------------------------- C's integer arithmetic

@pytest.mark.parametrize("expression, value", [
    ("(0ULL - 1)", 2**64 - 1), ("-1", -1), ("(unsigned)-1", 2**32 - 1), ("1u << 31", 2**31),
    ("0x80000000", 2**31), ("-7 / 2", -3), ("-7 % 2", -1), ("(1 ? 2 : 3) + (0 || 5) * 10", 12),
    ("'A' + 1", 66), ("(int)(2147483647 + 1u)", -2**31), ("~0u", 2**32 - 1), ("~0UL", 2**64 - 1),
])
def test_evaluate(expression, value):
    assert evaluate(lex(expression)) == value


@pytest.mark.parametrize("expression", ["sizeof(int)", "(void *)0", "x + 1", '"s"', "1 / 0", "1.5",
                                        "((sqlite3_destructor_type)-1)"])
def test_evaluate_refuses_non_constants(expression):
    with pytest.raises(NotConstant):
        evaluate(lex(expression))


def test_evaluate_expands_macros_without_looping():
    names = {"A": ["B", "+", "1"], "B": ["2"], "SELF": ["SELF"]}
    assert evaluate(["A", "*", "3"], names) == 9
    with pytest.raises(NotConstant):
        evaluate(["SELF"], names)
