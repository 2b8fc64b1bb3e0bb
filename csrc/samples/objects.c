/* objects: a module that hands out objects, for the objects-across-reloads tests.
 *
 * Each object remembers which image made it (the address of a static in that
 * image), and every function checks it: a call that reaches another image
 * than the one that made its object returns WRONG_IMAGE instead of working,
 * so a test sees a misrouted call as a value, not as a crash.
 *
 *   struct obj       opaque in the cdef (a handle by default): made by obj_new
 *                    (returned) or obj_open (through an out-parameter),
 *                    freed by obj_free
 *   struct stream    has a body in the cdef, like zlib's z_stream: set up by
 *                    stream_init (which stores a pointer to a function of this
 *                    image in it), used by stream_push, ended by stream_end
 *   obj_name()       a pointer into this image's static data
 *
 * SAMPLE_VERSION=N is what image_version() and obj_version() report.
 */
#include <stdlib.h>

#ifndef SAMPLE_VERSION
#define SAMPLE_VERSION 1
#endif

#define SAMPLE_STR2(x) #x
#define SAMPLE_STR(x) SAMPLE_STR2(x)
#define WRONG_IMAGE (-1000)

static const char image_marker = 0;

struct obj {
    const char *made_by;
    long value;
};

struct stream {
    long total;
    long (*step)(long);
    const char *made_by;
};

int image_version(void)
{
    return SAMPLE_VERSION;
}

struct obj *obj_new(long value)
{
    struct obj *o = malloc(sizeof *o);
    if (o != NULL) {
        o->made_by = &image_marker;
        o->value = value;
    }
    return o;
}

int obj_open(long value, struct obj **out)
{
    *out = obj_new(value);
    return *out != NULL ? 0 : -1;
}

/* The object's value, or WRONG_IMAGE if this image did not make it. */
long obj_value(struct obj *o)
{
    return o->made_by == &image_marker ? o->value : WRONG_IMAGE;
}

/* This image's version, or WRONG_IMAGE if this image did not make the object. */
int obj_version(struct obj *o)
{
    return o->made_by == &image_marker ? SAMPLE_VERSION : WRONG_IMAGE;
}

/* Both objects' values added (NULL counts as 0), or WRONG_IMAGE if either was made elsewhere. */
long obj_sum(struct obj *a, struct obj *b)
{
    if ((a != NULL && a->made_by != &image_marker) || (b != NULL && b->made_by != &image_marker))
        return WRONG_IMAGE;
    return (a != NULL ? a->value : 0) + (b != NULL ? b->value : 0);
}

/* 1 for NULL (which no image made), else whether this image made the object. */
int obj_is_ours(struct obj *o)
{
    return o == NULL || o->made_by == &image_marker;
}

int obj_free(struct obj *o)
{
    if (o == NULL)
        return 0;
    int ok = o->made_by == &image_marker;
    free(o);
    return ok ? 0 : WRONG_IMAGE;
}

const char *obj_name(void)
{
    return "objects v" SAMPLE_STR(SAMPLE_VERSION);
}

static long step(long x)
{
    return x * SAMPLE_VERSION;
}

int stream_init(struct stream *s)
{
    s->total = 0;
    s->step = step;
    s->made_by = &image_marker;
    return 0;
}

/* Adds step(x) to the total through the function pointer stored at init: if
 * the image that stored it were unmapped, this would crash. */
long stream_push(struct stream *s, long x)
{
    if (s->made_by != &image_marker)
        return WRONG_IMAGE;
    s->total += s->step(x);
    return s->total;
}

int stream_end(struct stream *s)
{
    int ok = s->made_by == &image_marker;
    s->step = NULL;
    return ok ? 0 : WRONG_IMAGE;
}
