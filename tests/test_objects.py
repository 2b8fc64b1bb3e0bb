"""Objects that cross a reload: handle bindings, routing, destructors, pins and pointer-result leases.

The objects sample checks, inside every call, that the image running it made
the object it was given (else it returns WRONG_IMAGE), so a misrouted call is
a wrong value here, not a crash.
"""

from __future__ import annotations

import gc
import threading

import pytest

from nativereload import HandleError, InterfaceError, ModuleUnloaded, PinReleased, SymbolError

from conftest import OBJECTS_CDEF, WRONG_IMAGE, install, mapped_paths

DESTRUCTORS = ["obj_free", "stream_end"]


@pytest.fixture
def objects(reg, moddir, samples):
    install(samples["objects1"], moddir / "objects.so")
    return reg.load("objects", cdef=OBJECTS_CDEF, handles=["struct stream *"], destructors=DESTRUCTORS)


def reload_to(reg, moddir, samples, version):
    install(samples[f"objects{version}"], moddir / "objects.so")
    return reg.reload("objects")


def image(reg, generation):
    [status] = [m for m in reg.status() if m.name == "objects"]
    return next(i for i in status.images if i.generation == generation)


def generations(reg):
    return [(i.generation, i.state) for m in reg.status() if m.name == "objects" for i in m.images]


def test_a_returned_handle_keeps_using_the_image_that_made_it(reg, objects, moddir, samples):
    old = objects.obj_new(41)
    old_copy = image(reg, 1).copy_path
    reload_to(reg, moddir, samples, 2)
    new = objects.obj_new(7)
    assert objects.obj_version(old) == 1 and objects.obj_value(old) == 41      # routed to generation 1
    assert objects.obj_version(new) == 2 and objects.obj_value(new) == 7       # new objects: new code
    assert objects.image_version() == 2                                        # stateless calls: new code
    assert generations(reg) == [(1, "retired"), (2, "active")]
    assert dict(image(reg, 1).handles) == {"obj *": 1} and image(reg, 1).in_flight == 0
    assert old_copy in mapped_paths()
    assert objects.obj_free(old) == 0                                          # the destructor runs on 1 ...
    assert reg.wait_drained(timeout=5)                                         # ... and ends the hold
    assert generations(reg) == [(2, "active")]
    assert old_copy not in mapped_paths()
    assert objects.obj_free(new) == 0


def test_routing_survives_many_reloads_and_an_unload(reg, objects, moddir, samples):
    made = [objects.obj_new(100)]
    for n in range(2, 7):
        reload_to(reg, moddir, samples, 1 if n % 2 else 2)
        made.append(objects.obj_new(100 + n))
    assert [objects.obj_value(o) for o in made] == [100, 102, 103, 104, 105, 106]
    assert [objects.obj_version(o) for o in made] == [1, 2, 1, 2, 1, 2]
    assert [g for g, _ in generations(reg)] == [1, 2, 3, 4, 5, 6]
    reg.unload("objects")
    with pytest.raises(ModuleUnloaded):
        objects.image_version()
    assert objects.obj_value(made[0]) == 100          # a bound handle still routes to its image
    for o in made:
        assert objects.obj_free(o) == 0
    assert reg.wait_drained(timeout=5)
    assert reg.status() == []


def test_an_out_parameter_binds_the_handle_written_there(reg, objects, moddir, samples):
    out = objects.ffi.new("obj **")
    assert objects.obj_open(9, out) == 0
    handle = out[0]
    reload_to(reg, moddir, samples, 2)
    assert objects.obj_version(handle) == 1 and objects.obj_value(handle) == 9
    assert dict(image(reg, 1).handles) == {"obj *": 1}
    assert objects.obj_free(handle) == 0
    assert reg.wait_drained(timeout=5)


def test_a_struct_handle_is_bound_at_first_use(reg, objects, moddir, samples):
    """Like zlib's z_stream: allocated by the caller, set up by the library with pointers into itself."""
    stream = objects.ffi.new("struct stream *")
    assert objects.stream_init(stream) == 0
    assert objects.stream_push(stream, 5) == 5
    reload_to(reg, moddir, samples, 2)
    reload_to(reg, moddir, samples, 1)
    assert objects.stream_push(stream, 5) == 10       # generation 1's step(), through its function pointer
    assert dict(image(reg, 1).handles) == {"struct stream *": 1}
    assert generations(reg) == [(1, "retired"), (3, "active")]
    assert objects.stream_end(stream) == 0
    assert reg.wait_drained(timeout=5)
    fresh = objects.ffi.new("struct stream *")
    objects.stream_init(fresh)
    assert objects.stream_push(fresh, 5) == 5 and dict(image(reg, 3).handles) == {"struct stream *": 1}
    objects.stream_end(fresh)


def test_handles_of_two_generations_in_one_call_are_refused(reg, objects, moddir, samples):
    old = objects.obj_new(1)
    reload_to(reg, moddir, samples, 2)
    new = objects.obj_new(2)
    with pytest.raises(HandleError, match=r"generation 1 and generation 2.*nothing was called"):
        objects.obj_sum(old, new)
    assert objects.obj_sum(old, old) == 2 and objects.obj_sum(new, new) == 4
    assert image(reg, 1).in_flight == 0 and image(reg, 2).in_flight == 0
    objects.obj_free(old)
    objects.obj_free(new)


def test_release_ends_a_binding_without_the_destructor(reg, objects, moddir, samples):
    old = objects.obj_new(3)
    reload_to(reg, moddir, samples, 2)
    old_copy = image(reg, 1).copy_path
    assert reg.release(old) is True
    assert reg.release(old) is False
    assert reg.wait_drained(timeout=5) and old_copy not in mapped_paths()
    # Released: the handle is no longer routed (its image is gone), as if it were new.
    assert objects.obj_version(old) == WRONG_IMAGE
    reg.release(old)


def test_a_garbage_collected_handle_stays_bound(reg, objects, moddir, samples):
    address = int(objects.ffi.cast("intptr_t", objects.obj_new(5)))   # the cdata is dropped at once
    gc.collect()                                                        # the C object lives on
    reload_to(reg, moddir, samples, 2)
    assert generations(reg) == [(1, "retired"), (2, "active")]
    assert dict(image(reg, 1).handles) == {"obj *": 1}
    assert "1 handle (obj *)" in image(reg, 1).held_by
    same = objects.ffi.cast("obj *", address)       # any cdata with that address names the binding
    assert objects.obj_value(same) == 5
    assert objects.obj_free(same) == 0 and reg.wait_drained(timeout=5)


def test_handles_opt_out_and_validation(reg, moddir, samples):
    install(samples["objects1"], moddir / "objects.so")
    mod = reg.load("objects", cdef=OBJECTS_CDEF, handles=())
    old = mod.obj_new(1)
    reload_to(reg, moddir, samples, 2)
    assert mod.obj_version(old) == WRONG_IMAGE        # not a handle any more: the current image gets it
    # Still a pointer result: the cdata keeps generation 1 mapped while it lives.
    assert image(reg, 1).pointer_results == 1 and not image(reg, 1).handles
    del old
    assert reg.wait_drained(timeout=5)
    reg.unload("objects")
    with pytest.raises(InterfaceError, match="'obj_close' is not declared"):
        reg.load("objects", cdef=OBJECTS_CDEF, destructors=["obj_close"])
    with pytest.raises(InterfaceError, match="destructor 'image_version' takes no handle"):
        reg.load("objects", cdef=OBJECTS_CDEF, destructors=["image_version"])
    with pytest.raises(InterfaceError, match="no function the cdef declares takes or returns 'struct nope \\*'"):
        reg.load("objects", cdef=OBJECTS_CDEF, handles=["struct nope *"])
    with pytest.raises(InterfaceError, match="'nope_t' is not a type"):
        reg.load("objects", cdef=OBJECTS_CDEF, handles=["nope_t"])
    assert reg.status() == []


def test_reload_can_change_handles_and_destructors(reg, objects, moddir, samples):
    reg.reload("objects", handles=(), destructors=())
    old = objects.obj_new(1)
    reload_to(reg, moddir, samples, 2)
    assert objects.obj_version(old) == WRONG_IMAGE
    reg.reload("objects", handles=None, destructors=["obj_free"])
    made = objects.obj_new(2)
    reload_to(reg, moddir, samples, 1)
    assert objects.obj_version(made) == 2
    objects.obj_free(made)


def test_a_pin_calls_one_image_across_reloads(reg, objects, moddir, samples):
    with objects.pin() as pinned:
        assert pinned.generation == 1 and pinned.image_version() == 1
        version = pinned.func("image_version")
        reload_to(reg, moddir, samples, 2)
        assert pinned.image_version() == 1 and version() == 1
        assert objects.image_version() == 2
        assert image(reg, 1).pins == 1 and image(reg, 1).in_flight == 0
        assert "1 pin" in image(reg, 1).held_by
        made = pinned.obj_new(4)                     # bound to the pinned image
        assert objects.obj_version(made) == 1
        assert pinned.obj_free(made) == 0
        old_copy = image(reg, 1).copy_path
    assert reg.wait_drained(timeout=5) and old_copy not in mapped_paths()
    assert pinned.released
    pinned.release()                                  # twice is harmless
    with pytest.raises(PinReleased, match="was released"):
        pinned.image_version()
    other = reg.pin("objects")
    assert other.generation == 2
    other.release()
    reg.unload("objects")
    with pytest.raises(ModuleUnloaded):
        objects.pin()


def test_a_pin_refuses_a_handle_of_another_image(reg, objects, moddir, samples):
    old = objects.obj_new(1)
    reload_to(reg, moddir, samples, 2)
    with objects.pin() as pinned:
        with pytest.raises(HandleError, match="through a pin on generation 2"):
            pinned.obj_value(old)
    objects.obj_free(old)


def test_a_pointer_result_keeps_its_image_mapped_while_it_lives(reg, objects, moddir, samples):
    name = objects.obj_name()
    reload_to(reg, moddir, samples, 2)
    assert image(reg, 1).pointer_results == 1
    old_copy = image(reg, 1).copy_path
    assert old_copy in mapped_paths()
    assert objects.ffi.string(name) == b"objects v1"
    assert objects.ffi.string(objects.obj_name()) == b"objects v2"   # leased and released at once
    del name
    assert reg.wait_drained(timeout=5)
    assert old_copy not in mapped_paths()


def test_plain_functions_have_no_policy(reg, objects):
    assert objects.image_version.policy is None
    assert objects.obj_name.policy.pointer_result
    assert objects.obj_value.policy.handle_args == (0,)
    assert objects.obj_sum.policy.handle_args == (0, 1)


@pytest.mark.timeout(120)
def test_threads_make_and_free_handles_while_reloading(reg, objects, moddir, samples):
    errors, results = [], []
    stop = threading.Event()

    def worker(seed):
        n = 0
        try:
            while not stop.is_set():
                made = objects.obj_new(seed + n)
                out = objects.ffi.new("obj **")
                objects.obj_open(n, out)
                stream = objects.ffi.new("struct stream *")
                objects.stream_init(stream)
                version = objects.obj_version(made)
                checks = (objects.obj_value(made) == seed + n, objects.obj_value(out[0]) == n,
                          objects.obj_sum(made, made) == 2 * (seed + n),
                          objects.stream_push(stream, 3) in (3, 6),      # WRONG_IMAGE if misrouted
                          version in (1, 2), objects.obj_version(out[0]) in (1, 2),
                          objects.ffi.string(objects.obj_name()) in (b"objects v1", b"objects v2"))
                results.append(all(checks))
                assert objects.obj_free(made) == 0 and objects.obj_free(out[0]) == 0
                assert objects.stream_end(stream) == 0
                n += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i * 1_000_000,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        for n in range(60):
            reload_to(reg, moddir, samples, 1 + n % 2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert results and all(results)
    assert reg.wait_drained(timeout=10)
    assert [state for _, state in generations(reg)] == ["active"]


def test_status_says_what_holds_a_retired_image(reg, objects, moddir, samples):
    from nativereload.cli.tables import format_status
    from nativereload.control import server

    made = objects.obj_new(1)
    reload_to(reg, moddir, samples, 2)
    with objects.pin():
        reply = server.handle(reg, {"op": "status"})
    old = reply["modules"][0]["images"][0]
    assert old["state"] == "retired" and old["handles"] == {"obj *": 1} and old["pins"] == 0
    assert old["held_by"] == "0 calls, 1 handle (obj *)"
    assert "objects: generation 1: retired — 0 calls, 1 handle (obj *)" in format_status(reply, "/s")
    objects.obj_free(made)


def test_a_retired_image_held_too_long_is_named_in_a_warning(moddir, samples, tmpdir_for_copies, caplog):
    import logging
    import time

    from nativereload import Registry

    install(samples["objects1"], moddir / "objects.so")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, held_warning=0.2) as registry:
        mod = registry.load("objects", cdef=OBJECTS_CDEF, destructors=["obj_free"])
        made = mod.obj_new(1)
        with caplog.at_level(logging.WARNING, logger="nativereload"):
            registry.reload("objects")
            for _ in range(200):
                if "still held open" in caplog.text:
                    break
                time.sleep(0.01)
        assert ("module 'objects' generation 1 was retired 0.2 s ago and is still held open by 0 calls, 1 handle "
                "(obj *)") in caplog.text
        assert caplog.text.count("still held open") == 1          # once per image
        mod.obj_free(made)


def test_a_null_handle_is_never_bound_and_holds_nothing(reg, objects, moddir, samples):
    null = objects.ffi.NULL
    assert objects.obj_is_ours(null) == 1 and objects.obj_free(null) == 0     # a NULL argument is no object
    assert dict(image(reg, 1).handles) == {}
    with pytest.raises(TypeError):
        objects.obj_is_ours()                   # too few arguments: cffi's error, not the router's
    reload_to(reg, moddir, samples, 2)
    assert objects.obj_is_ours(null) == 1
    assert reg.wait_drained(timeout=5) and generations(reg) == [(2, "active")]   # nothing held generation 1
    old = objects.obj_new(5)
    reload_to(reg, moddir, samples, 1)
    # A NULL before a bound handle: the call still goes where the handle was made.
    assert objects.obj_sum(null, old) == 5 and objects.obj_sum(old, null) == 5
    assert objects.obj_free(old) == 0


def test_a_struct_handle_is_bound_at_its_first_use_in_any_position(reg, objects):
    # obj * is opaque (declared without a body): one the module did not hand out is bound to the image of
    # the first call that receives it, whichever argument it is.
    memory = objects.ffi.new("long[8]")              # zeroed: made_by is no image's marker
    stranger = objects.ffi.cast("obj *", memory)
    assert objects.obj_sum(objects.ffi.NULL, stranger) == WRONG_IMAGE
    assert dict(image(reg, 1).handles) == {"obj *": 1}
    assert reg.release(stranger) is True


def test_calls_that_take_or_return_objects_after_an_unload(reg, objects):
    obj_new, obj_is_ours = objects.obj_new, reg.func("objects.obj_is_ours")     # taken before the unload
    reg.unload("objects")
    with pytest.raises(ModuleUnloaded, match="'objects' was unloaded"):
        obj_new(1)
    with pytest.raises(ModuleUnloaded):
        obj_is_ours(objects.ffi.NULL)
    with pytest.raises(ModuleUnloaded):
        objects.obj_new(1)


def test_a_reload_that_changes_only_the_handles_applies_them(reg, moddir, samples):
    install(samples["objects1"], moddir / "objects.so")
    objects = reg.load("objects", cdef=OBJECTS_CDEF, destructors=["obj_free"])     # obj * only
    reg.reload("objects", handles=["struct stream *"])     # destructors kept, cdef kept: only the handles change
    stream = objects.ffi.new("struct stream *")
    assert objects.stream_init(stream) == 0
    assert dict(image(reg, 2).handles) == {"struct stream *": 1}      # bound at its first use
    assert reg.release(stream) is True


def test_a_reload_that_adds_functions_gives_them_policies(reg, moddir, samples):
    install(samples["objects1"], moddir / "objects.so")
    without = OBJECTS_CDEF.replace("int obj_is_ours(obj *);\n", "")
    objects = reg.load("objects", cdef=without, handles=["struct stream *"], destructors=DESTRUCTORS)
    reg.reload("objects", cdef=OBJECTS_CDEF)          # adds obj_is_ours (compatible), handles kept
    memory = objects.ffi.new("long[8]")
    stranger = objects.ffi.cast("obj *", memory)
    assert objects.obj_is_ours(stranger) == 0
    assert dict(image(reg, 2).handles) == {"obj *": 1}        # the new function binds like the others
    assert reg.release(stranger) is True


def test_a_reload_that_changes_only_the_destructors_applies_them(reg, moddir, samples):
    install(samples["objects1"], moddir / "objects.so")
    objects = reg.load("objects", cdef=OBJECTS_CDEF, handles=["struct stream *"], destructors=["obj_free"])
    reg.reload("objects", destructors=DESTRUCTORS)      # handles kept, cdef kept: stream_end now ends a binding
    stream = objects.ffi.new("struct stream *")
    assert objects.stream_init(stream) == 0
    assert dict(image(reg, 2).handles) == {"struct stream *": 1}
    assert objects.stream_end(stream) == 0
    assert dict(image(reg, 2).handles) == {}


def test_a_declared_function_the_library_lacks_takes_objects_and_says_so(reg, moddir, samples):
    install(samples["objects1"], moddir / "objects.so")
    objects = reg.load("objects", cdef=OBJECTS_CDEF + "int obj_absent(obj *);\n", missing="lazy")
    with pytest.raises(SymbolError, match="obj_absent"):
        objects.obj_absent(objects.ffi.NULL)
    assert image(reg, 1).in_flight == 0
