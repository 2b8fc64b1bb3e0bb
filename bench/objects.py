"""Objects across reloads (issue 7): what a pin, a bound handle and a leased pointer result cost per call.

Variants, each against the plain cffi ABI call of the same function, measured
in the same interleaved loop (timing.compare_calls):
    no pointer      image_version(): a Func (no object in the signature: no policy)
    pin             image_version() through mod.pin(): the pinned image's own cffi function
    bound handle    obj_value(obj *): the handle is looked up, the call routed to its image
    pointer result  version_string() of the sample: the returned const char * is leased
d and the others are measured once per gate.
"""

from __future__ import annotations

import cffi

from registries import available_gates, make_registry, path_label
from timing import compare_calls

OBJECTS_CDEF = """
typedef struct obj obj;
int image_version(void);
obj *obj_new(long);
long obj_value(obj *);
int obj_free(obj *);
"""
SAMPLE_CDEF = "const char *version_string(void);"

VARIANTS = {
    # key: (label, baseline statement, nativereload statement)
    "plain": ("int image_version(void) via Func (no pointer)", "a_version()", "d_version()"),
    "pin": ("int image_version(void) through a pin", "a_version()", "p_version()"),
    "handle": ("long obj_value(obj *) with a bound handle", "a_value(a_obj)", "d_value(d_obj)"),
    "pointer": ("const char *version_string(void), leased result", "a_string()", "d_string()"),
}


def per_call(rows, *, objects: str, sample: str, library_dir: str, tmpdir: str, repeats: int,
             block_seconds: float) -> dict:
    """Section 6: the ratios above; returns {gate: {variant: ratio}} for the targets."""
    ffi = cffi.FFI()
    ffi.cdef(OBJECTS_CDEF + SAMPLE_CDEF)
    plain_objects, plain_sample = ffi.dlopen(objects), ffi.dlopen(sample)
    ratios = {}
    for gate in available_gates():
        registry = make_registry(gate, library_dir, tmpdir)
        try:
            mod = registry.load("objects", cdef=OBJECTS_CDEF, destructors=["obj_free"])
            strings = registry.load("sample", cdef=SAMPLE_CDEF)
            pin = mod.pin()
            namespace = {
                "a_version": plain_objects.image_version, "d_version": mod.func("image_version"),
                "p_version": pin.func("image_version"),
                "a_value": plain_objects.obj_value, "a_obj": plain_objects.obj_new(7),
                "d_value": mod.func("obj_value"), "d_obj": mod.obj_new(7),
                "a_string": plain_sample.version_string, "d_string": strings.func("version_string"),
            }
            assert mod.obj_value(namespace["d_obj"]) == 7
            statements = {}
            for key, (_, baseline, ours) in VARIANTS.items():
                statements[f"{key}.a"] = (baseline, namespace)
                statements[f"{key}.nr"] = (ours, namespace)
            stats = compare_calls(statements, repeats, block_seconds)
            ratios[gate] = {}
            for key, (label, _, _) in VARIANTS.items():
                base, ours = stats[f"{key}.a"], stats[f"{key}.nr"]
                ratios[gate][key] = ours.median / base.median
                rows.add("6 objects across reloads", f"{label}, {path_label(gate)}", "ns", ours,
                         ratio=ratios[gate][key], ratio_of="plain cffi (same block)", key=f"objects.{gate}.{key}")
            pin.release()
            mod.obj_free(namespace["d_obj"])
            plain_objects.obj_free(namespace["a_obj"])
        finally:
            registry.close()
    return ratios
