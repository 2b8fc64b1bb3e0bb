/* counter: the module examples/devloop/serve.py keeps calling. Change
 * version() (or step()), run `nativereload build && nativereload reload
 * counter`, and watch the running process pick it up: the total carries on,
 * handed from one generation to the next by the init/fini hooks. */
#include <stdio.h>
#include <stdlib.h>

#include <nativereload.h>

#include "counter.h"

struct counter_state {
    long total;
};

static struct counter_state *state;

/* Adopt the previous generation's state, or start one on a first load. */
int nativereload_init(nativereload_context *ctx)
{
    if (ctx->state == NULL) {
        ctx->state = calloc(1, sizeof(struct counter_state));
        if (ctx->state == NULL) {
            snprintf(ctx->error, sizeof ctx->error, "out of memory");
            return -1;
        }
        ctx->state_version = 1;
    }
    state = ctx->state;
    return 0;
}

/* Free the state only if no successor adopted it. */
void nativereload_fini(nativereload_context *ctx)
{
    if (!ctx->adopted)
        free(ctx->state);
}

int version(void)
{
    return 1;
}

long step(long by)
{
    return __atomic_add_fetch(&state->total, by, __ATOMIC_RELAXED);
}
