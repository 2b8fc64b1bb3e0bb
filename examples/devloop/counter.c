/* counter: the module examples/devloop/serve.py keeps calling. Change
 * version() (or step()), run `nativereload build && nativereload reload
 * counter`, and watch the running process pick it up. */
static long total;   /* per image: a reloaded image starts again at 0 */

int version(void)
{
    return 1;
}

long step(long by)
{
    total += by;
    return total;
}
