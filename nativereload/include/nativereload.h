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
 * A module may export any of these; nativereload calls what it finds.
 *
 *   int  nativereload_init(nativereload_context *ctx);
 *        Runs when the image is loaded (in Registry.prepare(), or during the
 *        pause of an exclusive reload), after its functions are resolved and
 *        before any call reaches it. ctx->state / ctx->state_version hold the
 *        state of the image it replaces (NULL / 0 on a first load): read it,
 *        adopt it (leave the same pointer in ctx->state) or build a new one
 *        from it (a migration: set ctx->state and ctx->state_version to
 *        yours). Never free or change the old state here: the reload can
 *        still be aborted, and the old image keeps serving until the switch.
 *        Return 0 to accept; anything else refuses the load or reload (write
 *        why into ctx->error): the image is closed without fini and the old
 *        one keeps serving.
 *
 *   void nativereload_fini(nativereload_context *ctx);
 *        Runs once, when the image has drained (after a reload, an unload, or
 *        the registry closing; or when a prepared reload is aborted), before
 *        it is unmapped: stop the threads it started, flush its files. Free
 *        ctx->state only if ctx->adopted is 0: adopted means another image of
 *        the module (its successor) holds the same state pointer.
 *
 *   int  nativereload_selftest(void);
 *        Run by the crash canary (reload(..., canary=True)) in a separate
 *        process before the serving process loads the build: 0 = pass.
 *
 * The order of a reload: new image loaded -> new init (sees the old state)
 * -> switch (new calls go to the new image) -> old image drains -> old fini
 * (adopted: 1 or 0) -> old image unmapped.
 * ======================================================================= */

#define NATIVERELOAD_ERROR_SIZE 256

/* Why fini runs (nativereload_context.reason). */
#define NATIVERELOAD_FINI_REPLACED 1   /* a reload switched to a successor and this image drained */
#define NATIVERELOAD_FINI_UNLOADED 2   /* the module was unloaded, or the registry closed */
#define NATIVERELOAD_FINI_ABORTED  3   /* a prepared reload was aborted: this image never served */

typedef struct nativereload_context {
    unsigned int size;                 /* sizeof(nativereload_context) as nativereload knows it */
    const char *module;                /* the module's name */
    unsigned long generation;          /* this image's generation */
    unsigned long previous_generation; /* init: the generation it replaces (0 on a first load) */
    void *state;                       /* init: in, the previous image's state; out, this image's */
    unsigned long state_version;       /* the layout version of *state, as its owner set it */
    int adopted;                       /* fini: 1 if another image holds the same state pointer */
    int reason;                        /* fini: NATIVERELOAD_FINI_* */
    char error[NATIVERELOAD_ERROR_SIZE];   /* init: why it refused (NUL-terminated) */
} nativereload_context;

NATIVERELOAD_EXPORT int nativereload_init(nativereload_context *ctx);
NATIVERELOAD_EXPORT void nativereload_fini(nativereload_context *ctx);
NATIVERELOAD_EXPORT int nativereload_selftest(void);

#ifdef __cplusplus
}
#endif

#endif /* NATIVERELOAD_H */
