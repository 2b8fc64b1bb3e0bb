/* contract: see contract.h. Variants (compile definitions):
 *   CONTRACT_VERSION=N             what contract_version() returns; the interface does not change
 *   CONTRACT_RETURN_TYPE           contract_version() returns double (N + 0.5)
 *   CONTRACT_PARAM_TYPE            contract_add() takes (long, int)
 *   CONTRACT_STRUCT_FIELD          struct contract_point's y is a long
 *   CONTRACT_ENUM_VALUE            CONTRACT_SAFE is 3
 *   CONTRACT_DROP_FUNCTION         no contract_scaled()
 *   CONTRACT_ADD_FUNCTION          also contract_added()
 *   CONTRACT_ABORT_IN_CONSTRUCTOR  a constructor aborts the process: proves the interface is read
 *                                  from the file without running any of the library's code
 */
#include <stdlib.h>
#include <unistd.h>

#include "contract.h"

#ifndef CONTRACT_VERSION
#define CONTRACT_VERSION 1
#endif

#ifdef CONTRACT_ABORT_IN_CONSTRUCTOR
__attribute__((constructor)) static void contract_refuse_to_load(void)
{
    abort();
}
#endif

#ifdef CONTRACT_RETURN_TYPE
double contract_version(void)
{
    return CONTRACT_VERSION + 0.5;
}
#else
int contract_version(void)
{
    return CONTRACT_VERSION;
}
#endif

#ifdef CONTRACT_PARAM_TYPE
long contract_add(long a, int b)
#else
long contract_add(long a, long b)
#endif
{
    return a + b;
}

long contract_norm1(const struct contract_point *p)
{
    long x = p->x, y = p->y;
    return (x < 0 ? -x : x) + (y < 0 ? -y : y);
}

int contract_weight(enum contract_mode mode)
{
    return mode == CONTRACT_SAFE ? 10 : mode == CONTRACT_FAST ? 1 : -1;
}

int contract_wait_fd(int fd)
{
    char byte;
    if (read(fd, &byte, 1) != 1)
        return -1;
    return (int)contract_version();
}

#ifndef CONTRACT_DROP_FUNCTION
long contract_scaled(long x)
{
    return contract_twice(x) * CONTRACT_VERSION;
}
#endif

#ifdef CONTRACT_ADD_FUNCTION
long contract_added(long x)
{
    return x + CONTRACT_LIMIT;
}
#endif
