/* demo: the module `nativereload demo` builds, calls from several threads,
 * rebuilds with another DEMO_VERSION and reloads while the calls go on.
 *
 *   DEMO_VERSION=N   what version() reports and what work() mixes in
 */
#include <time.h>

#ifndef DEMO_VERSION
#define DEMO_VERSION 1
#endif

int version(void)
{
    return DEMO_VERSION;
}

/* A little arithmetic, so a call does some work inside the image. */
long work(long x)
{
    long acc = x;
    for (int i = 0; i < 64; i++)
        acc = acc * 31 + i;
    return (acc & 0xffff) * 10 + DEMO_VERSION;
}

static int holding_now;

/* Whether a hold() call is inside this image now: the demo reloads only once
 * it is (a thread that was started is not yet a call in flight). */
int holding(void)
{
    return __atomic_load_n(&holding_now, __ATOMIC_SEQ_CST);
}

/* Stays inside the image for `ms` milliseconds, then reports its version:
 * the call that is still running on the old image while the reload happens. */
int hold(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    __atomic_store_n(&holding_now, 1, __ATOMIC_SEQ_CST);
    while (nanosleep(&ts, &ts) != 0)
        ;
    __atomic_store_n(&holding_now, 0, __ATOMIC_SEQ_CST);
    return DEMO_VERSION;
}
