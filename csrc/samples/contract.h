/* contract: a module whose interface travels inside it.
 *
 * Built with nativereload_add_module(... INTERFACE contract.h): the
 * declarations below are embedded in the library, so it loads with no cdef
 * and a reload that changes one of them is refused. contract.c is built in
 * variants, each changing one thing a caller relies on (see
 * CMakeLists.txt); the defines select them here and in contract.c alike, so
 * the compiler checks each variant's code against its declarations.
 */
#ifndef CONTRACT_H
#define CONTRACT_H

#define CONTRACT_LIMIT 100

struct contract_point {
    int x;
#ifdef CONTRACT_STRUCT_FIELD
    long y;             /* was int: the size and y's offset change */
#else
    int y;
#endif
};

enum contract_mode {
    CONTRACT_FAST = 1,
#ifdef CONTRACT_ENUM_VALUE
    CONTRACT_SAFE = 3   /* was 2 */
#else
    CONTRACT_SAFE = 2
#endif
};

#ifdef CONTRACT_RETURN_TYPE
double contract_version(void);             /* was int */
#else
int contract_version(void);
#endif

#ifdef CONTRACT_PARAM_TYPE
long contract_add(long a, int b);          /* was long b */
#else
long contract_add(long a, long b);
#endif

long contract_norm1(const struct contract_point *p);
int contract_weight(enum contract_mode mode);
/* Blocks until a byte can be read from fd, then returns contract_version():
 * holds a call inside an image while a test reloads. */
int contract_wait_fd(int fd);

#ifndef CONTRACT_DROP_FUNCTION
long contract_scaled(long x);
#endif

#ifdef CONTRACT_ADD_FUNCTION
long contract_added(long x);
#endif

#ifndef NATIVERELOAD_CDEF
/* Not part of the interface: cffi never sees it (NATIVERELOAD_CDEF is defined while the header is read for it). */
static inline long contract_twice(long x) { return 2 * x; }
#endif

#endif /* CONTRACT_H */
