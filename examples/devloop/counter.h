/* counter.h: the interface of the counter module. nativereload_add_module(...
 * INTERFACE counter.h) embeds these declarations in counter.so: serve.py
 * loads it with no cdef, and a reload that would change them is refused. */
int version(void);
long step(long by);
