/* sample: the module the tests, the benchmarks and the examples reload.
 *
 * Built in several versions from this one file:
 *   SAMPLE_VERSION=N        what version() and scaled() report (1 by default)
 *   SAMPLE_DROP_SYMBOL      leaves out scaled(): a reload without a new cdef must be refused
 *   SAMPLE_UNDEFINED        calls a function no library defines: dlopen(RTLD_NOW) must fail
 *   SAMPLE_PADDING=BYTES    adds that many bytes of read-only data: a build too big for a process
 *                           whose file size limit (RLIMIT_FSIZE) is lower to store (a cluster
 *                           worker that refuses it while the others take it)
 */
#include <stddef.h>
#include <unistd.h>

#ifndef SAMPLE_VERSION
#define SAMPLE_VERSION 1
#endif

#define SAMPLE_STR2(x) #x
#define SAMPLE_STR(x) SAMPLE_STR2(x)

#ifdef SAMPLE_UNDEFINED
extern int nativereload_sample_missing_function(void);
#endif

#ifdef SAMPLE_PADDING
__attribute__((used)) static const unsigned char sample_padding[SAMPLE_PADDING] = {1};
#endif

/* Per-image state: a fresh image starts again at zero. */
static long counter;

int version(void)
{
#ifdef SAMPLE_UNDEFINED
    return nativereload_sample_missing_function();
#else
    return SAMPLE_VERSION;
#endif
}

const char *version_string(void)
{
    return "sample v" SAMPLE_STR(SAMPLE_VERSION);
}

long add(long a, long b)
{
    return a + b;
}

#ifndef SAMPLE_DROP_SYMBOL
long scaled(long x)
{
    return x * SAMPLE_VERSION;
}
#endif

long counter_next(void)
{
    return ++counter;
}

double dot4(double a, double b, double c, double d)
{
    return a * 1.0 + b * 2.0 + c * 3.0 + d * 4.0;
}

long sum_bytes(const char *buf, long n)
{
    long total = 0;
    for (long i = 0; i < n; i++)
        total += (unsigned char)buf[i];
    return total;
}

/* Blocks until a byte can be read from fd, then reports this image's version:
 * lets a test hold a call inside an image while it reloads. */
int wait_fd(int fd)
{
    char byte;
    if (read(fd, &byte, 1) != 1)
        return -1;
    return SAMPLE_VERSION;
}
