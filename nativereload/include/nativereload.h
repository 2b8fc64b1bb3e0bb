/* nativereload.h: what a C module built for nativereload may include.
 *
 * Print this directory with `nativereload --include-dir`; the CMake helper
 * (nativereload_add_module) adds it to each module's include path.
 *
 * THE MODULE'S INTERFACE
 *   A module's own header (counter.h, included by counter.c so the compiler
 *   checks the code against it) is the single source of truth for what
 *   Python may call. `nativereload_add_module(counter SOURCES counter.c
 *   INTERFACE counter.h)` or `nativereload embed counter.h -o counter_iface.c`
 *   preprocesses that header and embeds the declarations in the library, in
 *   the ELF section NATIVERELOAD_INTERFACE_SECTION. nativereload reads it
 *   from the file before loading the library: `reg.load("counter")` needs no
 *   cdef, and a reload that would change a declaration under its callers is
 *   refused.
 *
 * NATIVERELOAD_CDEF
 *   Defined (to 1) while nativereload reads a header for its interface
 *   (embed, `nativereload cdef`, the CMake helper's INTERFACE). The header is
 *   then turned into a cffi cdef: function prototypes, structs, unions,
 *   enums, typedefs and `#define NAME <integer>` are kept; attributes,
 *   `__asm__` labels, `__restrict`, inline function bodies and
 *   `_Static_assert` are dropped by nativereload itself. Hide anything else
 *   cffi cannot take, or that callers must not rely on:
 *
 *       #ifndef NATIVERELOAD_CDEF
 *       static inline long counter_twice(long x) { return 2 * x; }
 *       #endif
 *
 *   A struct is embedded with the layout cffi computes, and the file that
 *   embeds it asserts that layout at compile time (`_Static_assert` on size,
 *   alignment and member offsets): an attribute hidden from the cdef view
 *   that changes the layout (packed, aligned) fails the build, it is never
 *   misread at run time.
 *
 * WHAT A RELOAD ACCEPTS
 *   Adding functions, types and constants. Changing or removing any of them
 *   (a function's result or parameter types, a struct's members, an enum's
 *   values) is refused unless the reload says allow_interface_change=True.
 */
#ifndef NATIVERELOAD_H
#define NATIVERELOAD_H

/* Where the interface is embedded, and the version of its format. */
#define NATIVERELOAD_INTERFACE_SECTION ".nativereload.interface"
#define NATIVERELOAD_INTERFACE_FORMAT 1

/* NATIVERELOAD_EXPORT: exports a function even from a library built with
 * -fvisibility=hidden (nativereload calls only exported functions).
 *     NATIVERELOAD_EXPORT long counter_add(long a, long b);            */
#if defined(NATIVERELOAD_CDEF)
#  define NATIVERELOAD_EXPORT
#elif defined(__GNUC__) || defined(__clang__)
#  define NATIVERELOAD_EXPORT __attribute__((visibility("default")))
#else
#  define NATIVERELOAD_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ==== Lifecycle hooks ====================================================
 * Reserved: the module context struct and nativereload_init() /
 * nativereload_fini() are declared here (see the lifecycle issue).
 * ======================================================================= */

#ifdef __cplusplus
}
#endif

#endif /* NATIVERELOAD_H */
