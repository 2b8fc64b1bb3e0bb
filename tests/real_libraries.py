"""Scenarios with the real C libraries Debian ships, run one per child process by test_real_libraries.py.

    python tests/real_libraries.py SCENARIO TMPDIR

Each scenario loads a system library by ``file=`` through a Registry whose
copies go to TMPDIR, reloads it (the same file: every reload is a new image)
while objects made by earlier images are still in use, checks every result,
and prints one JSON line with what it measured. A crash kills only this
process: the test sees the signal.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import zlib

import cffi

import nativereload

LIBDIR = "/usr/lib/x86_64-linux-gnu" if os.path.isdir("/usr/lib/x86_64-linux-gnu") else "/usr/lib"

SQLITE_CDEF = """
typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;
int sqlite3_open(const char *filename, sqlite3 **ppDb);
int sqlite3_close(sqlite3 *);
int sqlite3_exec(sqlite3 *, const char *sql, int (*callback)(void *, int, char **, char **), void *,
                 char **errmsg);
int sqlite3_prepare_v2(sqlite3 *db, const char *zSql, int nByte, sqlite3_stmt **ppStmt, const char **pzTail);
int sqlite3_step(sqlite3_stmt *);
int sqlite3_column_int(sqlite3_stmt *, int iCol);
int sqlite3_finalize(sqlite3_stmt *pStmt);
int sqlite3_changes(sqlite3 *);
const char *sqlite3_errmsg(sqlite3 *);
const char *sqlite3_libversion(void);
"""
SQLITE_DESTRUCTORS = ["sqlite3_close", "sqlite3_finalize"]

ZSTD_CDEF = """
typedef struct ZSTD_CCtx_s ZSTD_CCtx;
typedef struct ZSTD_DCtx_s ZSTD_DCtx;
typedef struct ZSTD_inBuffer_s { const void *src; size_t size; size_t pos; } ZSTD_inBuffer;
typedef struct ZSTD_outBuffer_s { void *dst; size_t size; size_t pos; } ZSTD_outBuffer;
typedef enum { ZSTD_e_continue = 0, ZSTD_e_flush = 1, ZSTD_e_end = 2 } ZSTD_EndDirective;
ZSTD_CCtx *ZSTD_createCCtx(void);
size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx);
ZSTD_DCtx *ZSTD_createDCtx(void);
size_t ZSTD_freeDCtx(ZSTD_DCtx *dctx);
size_t ZSTD_compressStream2(ZSTD_CCtx *cctx, ZSTD_outBuffer *output, ZSTD_inBuffer *input,
                            ZSTD_EndDirective endOp);
size_t ZSTD_decompressStream(ZSTD_DCtx *zds, ZSTD_outBuffer *output, ZSTD_inBuffer *input);
unsigned ZSTD_isError(size_t code);
const char *ZSTD_getErrorName(size_t code);
size_t ZSTD_decompress(void *dst, size_t dstCapacity, const void *src, size_t compressedSize);
unsigned ZSTD_versionNumber(void);
"""
ZSTD_DESTRUCTORS = ["ZSTD_freeCCtx", "ZSTD_freeDCtx"]

ZLIB_CDEF = """
typedef void *(*alloc_func)(void *opaque, unsigned int items, unsigned int size);
typedef void (*free_func)(void *opaque, void *address);
typedef struct z_stream_s {
    const unsigned char *next_in; unsigned int avail_in; unsigned long total_in;
    unsigned char *next_out; unsigned int avail_out; unsigned long total_out;
    const char *msg; struct internal_state *state;
    alloc_func zalloc; free_func zfree; void *opaque;
    int data_type; unsigned long adler; unsigned long reserved;
} z_stream;
int deflateInit_(z_stream *strm, int level, const char *version, int stream_size);
int deflate(z_stream *strm, int flush);
int deflateEnd(z_stream *strm);
const char *zlibVersion(void);
"""

LZ4_CDEF = "int LZ4_versionNumber(void); int LZ4_compressBound(int inputSize);"


def registry(tmpdir: str) -> nativereload.Registry:
    return nativereload.Registry(tmpdir=tmpdir)


def mapped(path: str) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip("\n").removesuffix(" (deleted)").endswith(path) for line in maps)


def reloader(reg: nativereload.Registry, name: str, count: int, done: threading.Event, errors: list) -> None:
    try:
        for _ in range(count):
            reg.reload(name)
    except BaseException as exc:       # reported by the scenario
        errors.append(repr(exc))
    finally:
        done.set()


def sqlite_threads(tmpdir: str) -> dict:
    """4 threads loop open -> create -> insert -> select -> finalize -> close while 200 reloads happen."""
    reg = registry(tmpdir)
    mod = reg.load("sqlite", cdef=SQLITE_CDEF, file=f"{LIBDIR}/libsqlite3.so.0", destructors=SQLITE_DESTRUCTORS)
    ffi = mod.ffi
    done = threading.Event()
    errors: list[str] = []
    counts = [0] * 4

    def worker(index: int) -> None:
        try:
            n = 0
            while not done.is_set() or n < 3:
                out = ffi.new("sqlite3 **")
                assert mod.sqlite3_open(b":memory:", out) == 0
                db = out[0]
                assert mod.sqlite3_exec(db, b"create table t(x integer)", ffi.NULL, ffi.NULL, ffi.NULL) == 0
                values = [index * 1000 + n + k for k in range(5)]
                for value in values:
                    sql = f"insert into t values ({value})".encode()
                    assert mod.sqlite3_exec(db, sql, ffi.NULL, ffi.NULL, ffi.NULL) == 0, \
                        ffi.string(mod.sqlite3_errmsg(db))
                    assert mod.sqlite3_changes(db) == 1
                statement = ffi.new("sqlite3_stmt **")
                assert mod.sqlite3_prepare_v2(db, b"select sum(x), count(*) from t", -1, statement, ffi.NULL) == 0
                assert mod.sqlite3_step(statement[0]) == 100            # SQLITE_ROW
                got = (mod.sqlite3_column_int(statement[0], 0), mod.sqlite3_column_int(statement[0], 1))
                assert got == (sum(values), 5), (got, values)
                assert mod.sqlite3_step(statement[0]) == 101            # SQLITE_DONE
                assert mod.sqlite3_finalize(statement[0]) == 0
                assert mod.sqlite3_close(db) == 0
                n += 1
            counts[index] = n
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    reloader(reg, "sqlite", 200, done, errors)
    for thread in threads:
        thread.join(60)
    drained = reg.wait_drained(timeout=30)
    images = [i for m in reg.status() for i in m.images]
    reg.close(timeout=10)
    return {"errors": errors, "loops": counts, "generation": mod.generation, "drained": drained,
            "images_left": len(images)}


def sqlite_connection_across_reloads(tmpdir: str) -> dict:
    """A connection opened before 50 reloads answers after them; its image unmaps only at sqlite3_close."""
    reg = registry(tmpdir)
    mod = reg.load("sqlite", cdef=SQLITE_CDEF, file=f"{LIBDIR}/libsqlite3.so.0", destructors=SQLITE_DESTRUCTORS)
    ffi = mod.ffi
    out = ffi.new("sqlite3 **")
    assert mod.sqlite3_open(b":memory:", out) == 0
    db = out[0]
    mod.sqlite3_exec(db, b"create table t(x integer); insert into t values (20), (22)", ffi.NULL, ffi.NULL,
                     ffi.NULL)
    first_copy = reg.status()[0].images[0].copy_path
    for _ in range(50):
        reg.reload("sqlite")
    statement = ffi.new("sqlite3_stmt **")
    assert mod.sqlite3_prepare_v2(db, b"select sum(x) from t", -1, statement, ffi.NULL) == 0
    assert mod.sqlite3_step(statement[0]) == 100
    answer = mod.sqlite3_column_int(statement[0], 0)
    mod.sqlite3_finalize(statement[0])
    held = [(i.generation, i.state, dict(i.handles)) for i in reg.status()[0].images]
    mapped_before_close = mapped(first_copy)
    assert mod.sqlite3_close(db) == 0
    drained = reg.wait_drained(timeout=10)
    mapped_after_close = mapped(first_copy)
    reg.close(timeout=10)
    return {"answer": answer, "held": held, "mapped_before_close": mapped_before_close,
            "mapped_after_close": mapped_after_close, "drained": drained}


def zstd_contexts(tmpdir: str) -> dict:
    """A ZSTD_CCtx and a ZSTD_DCtx made before 100 reloads stream through them."""
    reg = registry(tmpdir)
    mod = reg.load("zstd", cdef=ZSTD_CDEF, file=f"{LIBDIR}/libzstd.so.1", destructors=ZSTD_DESTRUCTORS)
    ffi = mod.ffi
    cctx, dctx = mod.ZSTD_createCCtx(), mod.ZSTD_createDCtx()
    reference = cffi.FFI()
    reference.cdef("size_t ZSTD_decompress(void *, size_t, const void *, size_t); unsigned ZSTD_isError(size_t);")
    plain = reference.dlopen(f"{LIBDIR}/libzstd.so.1")
    source, frame, streamed = b"", b"", b""
    for n in range(101):
        chunk = (f"chunk {n} " * (n + 1)).encode()
        source += chunk
        data = ffi.from_buffer(chunk)
        inbuf = ffi.new("ZSTD_inBuffer *", {"src": data, "size": len(chunk), "pos": 0})
        out = ffi.new("char[]", 1 << 16)
        outbuf = ffi.new("ZSTD_outBuffer *", {"dst": out, "size": 1 << 16, "pos": 0})
        directive = 2 if n == 100 else 1
        left = mod.ZSTD_compressStream2(cctx, outbuf, inbuf, directive)
        assert not mod.ZSTD_isError(left) and left == 0, ffi.string(mod.ZSTD_getErrorName(left))
        piece = ffi.buffer(out, outbuf.pos)[:]
        frame += piece
        # the decompressing context follows along, one flushed piece at a time
        pin = ffi.from_buffer(piece)
        dinbuf = ffi.new("ZSTD_inBuffer *", {"src": pin, "size": len(piece), "pos": 0})
        dout = ffi.new("char[]", 1 << 17)
        doutbuf = ffi.new("ZSTD_outBuffer *", {"dst": dout, "size": 1 << 17, "pos": 0})
        result = mod.ZSTD_decompressStream(dctx, doutbuf, dinbuf)
        assert not mod.ZSTD_isError(result), ffi.string(mod.ZSTD_getErrorName(result))
        streamed += ffi.buffer(dout, doutbuf.pos)[:]
        if n < 100:
            reg.reload("zstd")
    check = reference.new("char[]", len(source) + 1)
    size = plain.ZSTD_decompress(check, len(source) + 1, frame, len(frame))
    assert not plain.ZSTD_isError(size)
    held = [(i.generation, i.state, dict(i.handles)) for i in reg.status()[0].images]
    mod.ZSTD_freeCCtx(cctx)
    mod.ZSTD_freeDCtx(dctx)
    drained = reg.wait_drained(timeout=10)
    reg.close(timeout=10)
    return {"round_trip": streamed == source, "reference": reference.buffer(check, size)[:] == source,
            "held": held, "drained": drained}


def zlib_stream(tmpdir: str, use_pin: bool) -> dict:
    """A z_stream set up by deflateInit_ before reloads, deflated and ended after several."""
    reg = registry(tmpdir)
    if use_pin:
        mod = reg.load("zlib", cdef=ZLIB_CDEF, file=f"{LIBDIR}/libz.so.1", handles=())
    else:
        mod = reg.load("zlib", cdef=ZLIB_CDEF, file=f"{LIBDIR}/libz.so.1", handles=["z_stream *"],
                       destructors=["deflateEnd"])
    ffi = mod.ffi
    pin = mod.pin() if use_pin else None
    z = pin if use_pin else mod
    strm = ffi.new("z_stream *")
    assert z.deflateInit_(strm, 6, z.zlibVersion(), ffi.sizeof("z_stream")) == 0
    source = b"".join(f"line {n}: {'x' * (n % 37)}\n".encode() for n in range(4000))
    out = ffi.new("unsigned char[]", len(source) + 1024)
    strm.next_out, strm.avail_out = out, len(source) + 1024
    keep = []
    for n, start in enumerate(range(0, len(source), 8000)):
        chunk = ffi.from_buffer(source[start:start + 8000])
        keep.append(chunk)
        strm.next_in, strm.avail_in = chunk, len(source[start:start + 8000])
        last = start + 8000 >= len(source)
        assert z.deflate(strm, 4 if last else 0) == (1 if last else 0)       # Z_FINISH -> Z_STREAM_END
        reg.reload("zlib")
        reg.reload("zlib")
    compressed = ffi.buffer(out, strm.total_out)[:]
    generation_before_end = mod.generation
    assert z.deflateEnd(strm) == 0
    if pin is not None:
        pin.release()
    drained = reg.wait_drained(timeout=10)
    reg.close(timeout=10)
    return {"round_trip": zlib.decompress(compressed) == source, "reloads": generation_before_end - 1,
            "drained": drained}


def static_strings(tmpdir: str) -> dict:
    """ffi.string() of a pointer into static data, in 4 threads, while 500 reloads happen."""
    reg = registry(tmpdir)
    mod = reg.load("zstd", cdef=ZSTD_CDEF, file=f"{LIBDIR}/libzstd.so.1", destructors=ZSTD_DESTRUCTORS)
    ffi = mod.ffi
    done = threading.Event()
    errors: list[str] = []
    calls = [0] * 4
    expected = ffi.string(mod.ZSTD_getErrorName(ffi.cast("size_t", -1)))

    def worker(index: int) -> None:
        try:
            while not done.is_set():
                assert ffi.string(mod.ZSTD_getErrorName(ffi.cast("size_t", -1))) == expected
                calls[index] += 1
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    reloader(reg, "zstd", 500, done, errors)
    for thread in threads:
        thread.join(60)
    drained = reg.wait_drained(timeout=10)
    reg.close(timeout=10)
    return {"errors": errors, "calls": calls, "drained": drained, "expected": expected.decode()}


def soname(tmpdir: str) -> dict:
    """A private copy of liblz4.so.1 is not what dlopen("liblz4.so.1") finds, and it unmaps at unload."""
    import ctypes
    import logging

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("nativereload").addHandler(Collect())
    reg = registry(tmpdir)
    mod = reg.load("lz4", cdef=LZ4_CDEF, file=f"{LIBDIR}/liblz4.so.1")
    copy = reg.status()[0].images[0].copy_path
    ours = mod.LZ4_versionNumber()
    system = ctypes.CDLL("liblz4.so.1")
    address = ctypes.cast(system.LZ4_versionNumber, ctypes.c_void_p).value
    owner = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high and len(fields) >= 6:
                owner = fields[5]
    assert system.LZ4_versionNumber() == ours
    reg.unload("lz4")
    drained = reg.wait_drained(timeout=10)
    states = [i.state for m in reg.status() for i in m.images]
    copy_mapped = mapped(copy)
    reg.close(timeout=10)
    return {"owner": owner, "copy": copy, "copy_mapped_after_unload": copy_mapped, "drained": drained,
            "states": states, "warnings": warnings}


SCENARIOS = {
    "sqlite_threads": sqlite_threads,
    "sqlite_connection_across_reloads": sqlite_connection_across_reloads,
    "zstd_contexts": zstd_contexts,
    "zlib_stream_handles": lambda tmpdir: zlib_stream(tmpdir, use_pin=False),
    "zlib_stream_pin": lambda tmpdir: zlib_stream(tmpdir, use_pin=True),
    "static_strings": static_strings,
    "soname": soname,
}

if __name__ == "__main__":
    name, tmpdir = sys.argv[1], sys.argv[2]
    print(json.dumps(SCENARIOS[name](tmpdir)))
    sys.stdout.flush()
    os._exit(0)      # skip interpreter teardown: what is measured is the scenario, not exit order
