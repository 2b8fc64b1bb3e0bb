// unique: a C++ module the dynamic loader refuses to unmap.
//
// A static local of an inline function is an STB_GNU_UNIQUE symbol with g++'s
// defaults; glibc then keeps the library mapped after dlclose(). The registry
// must notice ("leaked") instead of believing it closed. Building with
// -fno-gnu-unique (as nativereload_add_module does for C++) avoids this; this
// sample turns that flag off on purpose.
inline int &unique_counter()
{
    static int value = 0;
    return value;
}

extern "C" int unique_next(void)
{
    return ++unique_counter();
}
