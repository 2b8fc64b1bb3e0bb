/* lifecycle: a module with nativereload's hooks (nativereload.h), for the lifecycle and canary tests.
 *
 * Its state is a counter that continues across reloads instead of restarting:
 *   SAMPLE_VERSION=1   the state is struct state_v1 (state_version 1)
 *   SAMPLE_VERSION=2   the state is struct state_v2 (state_version 2), which
 *                      also counts the reloads; init migrates a v1 state into
 *                      a new v2 one (and back, for a rollback), and adopts a
 *                      state of its own version as it is
 * init refuses when the environment variable LIFECYCLE_REFUSE is this
 * image's version ("2"), with a message. When LIFECYCLE_EVENTS names a file,
 * init and fini each append one line to it ("init 2 prev=1 state=migrated",
 * "fini 1 adopted=0 reason=1"): the tests read the exact order of events.
 *
 * lifecycle_work() checks that no call runs in an image other than the one
 * that owns the state (the last to init): the state counts the violations,
 * which an exclusive reload must keep at zero.
 *
 * Canary variants:
 *   LIFECYCLE_CRASH_CTOR   a constructor writes through NULL (SIGSEGV)
 *   LIFECYCLE_SELFTEST=N   nativereload_selftest() returns N (default 0)
 *   LIFECYCLE_HANG         nativereload_selftest() never returns
 */
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nativereload.h>

#ifndef SAMPLE_VERSION
#define SAMPLE_VERSION 1
#endif
#ifndef LIFECYCLE_SELFTEST
#define LIFECYCLE_SELFTEST 0
#endif

/* Both layouts begin alike; only v2 has `reloads`. */
struct state_v1 {
    long counter;
    const char *owner;          /* the image that owns the state: the last one whose init ran */
    atomic_long violations;     /* calls that ran in an image that did not own the state */
};

struct state_v2 {
    long counter;
    const char *owner;
    atomic_long violations;
    long reloads;               /* how many images adopted or migrated this state */
};

static const char marker = 0;   /* its address identifies this image */
static struct state_v1 *state;  /* v1 or v2: the first members are the same */

#ifdef LIFECYCLE_CRASH_CTOR
__attribute__((constructor)) static void crash_on_load(void)
{
    /* The pointer itself volatile: the compiler cannot see it is NULL (a
     * store through a known NULL is undefined behaviour it may delete). */
    volatile int *volatile nowhere = NULL;
    *nowhere = 1;
}
#endif

static void event(const char *format, ...) __attribute__((format(printf, 1, 2)));

static void event(const char *format, ...)
{
    const char *path = getenv("LIFECYCLE_EVENTS");
    if (path == NULL || *path == '\0')
        return;
    char line[256];
    __builtin_va_list args;
    __builtin_va_start(args, format);
    int n = vsnprintf(line, sizeof line - 1, format, args);
    __builtin_va_end(args);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        if (write(fd, line, (size_t)n) < 0) {
            /* nothing to do: the test will see the line missing */
        }
        close(fd);
    }
}

/* A zeroed state of this version's layout, or NULL (with ctx->error said). */
static struct state_v1 *new_state(nativereload_context *ctx)
{
#if SAMPLE_VERSION == 2
    struct state_v1 *fresh = calloc(1, sizeof(struct state_v2));
#else
    struct state_v1 *fresh = calloc(1, sizeof(struct state_v1));
#endif
    if (fresh == NULL)
        snprintf(ctx->error, sizeof ctx->error, "out of memory");
    return fresh;
}

int nativereload_init(nativereload_context *ctx)
{
    const char *refuse = getenv("LIFECYCLE_REFUSE");
    if (refuse != NULL && atoi(refuse) == SAMPLE_VERSION) {
        snprintf(ctx->error, sizeof ctx->error, "LIFECYCLE_REFUSE=%s: version %d will not start", refuse,
                 SAMPLE_VERSION);
        event("refused %lu", ctx->generation);
        return 7;
    }
    const char *how;
    if (ctx->state == NULL) {
        how = "new";
        if ((ctx->state = new_state(ctx)) == NULL)
            return 1;
    }
    else if (ctx->state_version == SAMPLE_VERSION) {
        how = "adopted";        /* same layout: keep using it (ctx->state stays) */
    }
    else {
        how = "migrated";       /* another layout: a new state built from the old one, which is left alone */
        const struct state_v1 *old = ctx->state;
        struct state_v1 *fresh = new_state(ctx);
        if (fresh == NULL)
            return 1;
        fresh->counter = old->counter;
        ctx->state = fresh;
    }
    ctx->state_version = SAMPLE_VERSION;
    state = ctx->state;
    state->owner = &marker;
#if SAMPLE_VERSION == 2
    if (ctx->previous_generation != 0)
        ((struct state_v2 *)state)->reloads += 1;
#endif
    event("init %lu prev=%lu state=%s", ctx->generation, ctx->previous_generation, how);
    return 0;
}

void nativereload_fini(nativereload_context *ctx)
{
    event("fini %lu adopted=%d reason=%d", ctx->generation, ctx->adopted, ctx->reason);
    if (!ctx->adopted)
        free(ctx->state);
    state = NULL;
}

int nativereload_selftest(void)
{
#ifdef LIFECYCLE_HANG
    for (;;)
        pause();
#endif
    return LIFECYCLE_SELFTEST;
}

int lifecycle_version(void)
{
    return SAMPLE_VERSION;
}

/* The counter, one higher: it continues across reloads. */
long lifecycle_next(void)
{
    return ++state->counter;
}

/* How many reloads the state has lived through (v2); -1 from v1, which does not count them. */
long lifecycle_reloads(void)
{
#if SAMPLE_VERSION == 2
    return ((struct state_v2 *)state)->reloads;
#else
    return -1;
#endif
}

/* Sleeps `microseconds` inside the image, noting a violation if this image does not own the state. */
long lifecycle_work(long microseconds)
{
    struct state_v1 *s = state;
    if (s->owner != &marker)
        atomic_fetch_add(&s->violations, 1);
    if (microseconds > 0)
        usleep((useconds_t)microseconds);
    if (s->owner != &marker)
        atomic_fetch_add(&s->violations, 1);
    return SAMPLE_VERSION;
}

long lifecycle_violations(void)
{
    return atomic_load(&state->violations);
}

/* Blocks until a byte can be read from fd, then returns this image's version. */
int lifecycle_wait_fd(int fd)
{
    char byte;
    if (read(fd, &byte, 1) != 1)
        return -1;
    return SAMPLE_VERSION;
}
