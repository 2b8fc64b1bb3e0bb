"""One image's own promises (nativereload/image.py): its error hints, and a close that never raises."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest

from nativereload import LoadError, image as image_module

from conftest import SAMPLE_CDEF, install


def test_error_hints_say_what_to_do(reg, moddir, samples):
    install(samples["undef"], moddir / "sample.so")
    with pytest.raises(LoadError) as info:
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert str(info.value).endswith("— the library calls a function no loaded library defines: define it, or "
                                    "link the library against the one that does, and rebuild")
    (moddir / "sample.so").write_bytes(samples["v1"].read_bytes()[:5000])
    with pytest.raises(LoadError) as info:
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert str(info.value).endswith("(load refused) — rebuild it; if a build is still writing it, reload when it "
                                    "has finished")
    assert info.value.reason.startswith("truncated")


def test_a_refused_dlopen_without_a_hint(reg, moddir, samples, monkeypatch):
    install(samples["v1"], moddir / "sample.so")
    monkeypatch.setattr(image_module, "_dlopen", lambda path, flags: image_module._dl_ffi.NULL)
    monkeypatch.setattr(image_module, "_dl_error_text", lambda: "some other loader error")
    with pytest.raises(LoadError) as info:
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert str(info.value).endswith(": some other loader error (load refused)")


def test_the_noexec_hint_from_the_loaders_words(reg, moddir, samples, monkeypatch):
    install(samples["v1"], moddir / "sample.so")
    monkeypatch.setattr(image_module, "_dlopen", lambda path, flags: image_module._dl_ffi.NULL)
    monkeypatch.setattr(image_module, "_dl_error_text", lambda: "x.so: failed to map segment from shared object")
    with pytest.raises(LoadError, match="the temporary directory is mounted noexec: set TMPDIR"):
        reg.load("sample", cdef=SAMPLE_CDEF)


def test_close_clears_the_function_table(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    first = mod._active
    assert set(first.gate.functions) == set(first.declarations.functions)
    reg.reload("sample")
    assert first.state == "closed"
    assert first.gate.functions == {}          # the function objects pointed into unmapped code


def test_close_never_raises(reg, moddir, samples, monkeypatch, caplog):
    # It may run at the end of a user's call: an error is logged and the image reported "leaked".
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    first = mod._active

    def broken_unmap():
        raise OSError("dlclose exploded")
    monkeypatch.setattr(first, "_unmap", broken_unmap)
    with caplog.at_level(logging.ERROR, logger="nativereload"):
        reg.reload("sample")
    assert first.state == "leaked"
    assert "module 'sample' generation 1: error while closing" in caplog.text and "dlclose exploded" in caplog.text
    assert [(i.generation, i.state) for i in reg.status()[0].images] == [(1, "leaked"), (2, "active")]
    first.close()                              # a second close does nothing
    assert mod.version() == 1


def test_image_load_is_the_only_constructor():
    with pytest.raises(TypeError, match="use Image.copy"):
        image_module.Image()


def test_missing_symbols_are_named_in_the_singular_and_the_plural(reg, moddir, samples):
    from nativereload import SymbolError

    install(samples["nosym"], moddir / "sample.so")
    with pytest.raises(SymbolError) as one:
        reg.load("sample", cdef="long scaled(long);")
    assert "symbol 'scaled' not found in" in str(one.value)
    assert str(one.value).endswith("— export it from the library, declare only what it exports, or load with "
                                   "missing='lazy' to allow declared functions the library does not export")
    with pytest.raises(SymbolError) as two:
        reg.load("sample", cdef="long scaled(long); int nope(void);")
    assert "symbols 'scaled', 'nope' not found in" in str(two.value)
    assert "— export them from the library" in str(two.value)


def test_a_failure_after_dlopen_closes_the_handle(reg, moddir, samples, monkeypatch, tmpdir_for_copies):
    from conftest import mapped_paths

    install(samples["v1"], moddir / "sample.so")

    def fail(self, refused, *, lazy):
        raise OSError("no library object")

    monkeypatch.setattr(image_module.Image, "_resolve", fail)      # fails after the dlopen succeeded
    with pytest.raises(OSError, match="no library object"):
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert not [path for path in mapped_paths() if path.startswith(str(tmpdir_for_copies))]   # dlclosed


def test_load_time_is_measured(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    assert 0 <= mod._active.load_seconds < 30


@pytest.mark.timeout(60)
def test_a_reload_under_a_call_logs_the_draining_image(reg, moddir, samples, caplog):
    import os
    import threading
    import time

    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    read_fd, write_fd = os.pipe()
    caller = threading.Thread(target=mod.wait_fd, args=(read_fd,))
    caller.start()
    try:
        while reg.status()[0].images[0].in_flight == 0:
            time.sleep(0.005)
        first = mod._active
        with caplog.at_level(logging.INFO, logger="nativereload"):
            reg.reload("sample")
        assert first.state == "retired"
        assert "(generation 1 draining, 1 call in flight)" in caplog.text
    finally:
        os.write(write_fd, b"x")
        caller.join(10)
        os.close(read_fd)
        os.close(write_fd)
    assert reg.wait_drained(10) and first.state == "closed"


def test_close_is_logged_with_its_time(reg, moddir, samples, caplog):
    import re

    install(samples["v1"], moddir / "sample.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    with caplog.at_level(logging.INFO, logger="nativereload"):
        reg.reload("sample")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("closed 'sample' generation 1 in")]
    assert 0 <= float(re.search(r"in ([\d.]+) ms", line).group(1)) < 500


def test_read_original_gives_back_the_bytes_that_were_built(reg, moddir, samples):
    # The copy carries a private soname; what was built is the copy with the original bytes put back
    # (the rollback keeps it; content_hash, and so status' sha256 and trusted_hashes, hash it).
    install(samples["v1"], moddir / "sample.so")
    image = reg.load("sample", cdef=SAMPLE_CDEF)._active
    built = (moddir / "sample.so").read_bytes()
    with open(image.copy_path, "rb") as copy:
        assert copy.read() != built
    assert image.original_bytes is not None
    assert image.read_original() == built
    digest = hashlib.sha256(built).hexdigest()
    assert image.content_hash() == digest
    assert image.cached_hash() == digest[:12]
    assert reg.status()[0].images[0].sha256 == digest[:12]


def test_the_hash_is_cached_only_once_computed(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    image = reg.load("sample", cdef=SAMPLE_CDEF)._active
    image._hash = None
    assert image.cached_hash() is None
    os.unlink(image.copy_path)                 # a tmp cleaner: nothing left to hash, the mapping still serves
    with pytest.raises(OSError):
        image.content_hash()
    assert reg.status()[0].images[0].sha256 == "" and reg.status()[0].images[0].copy_deleted


def test_a_copy_replaced_by_a_symlink_is_never_followed(reg, moddir, samples, tmp_path):
    install(samples["v1"], moddir / "sample.so")
    image = reg.load("sample", cdef=SAMPLE_CDEF)._active
    image._hash = None
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(b"not the library")
    os.unlink(image.copy_path)
    os.symlink(elsewhere, image.copy_path)
    with pytest.raises(OSError):
        image.read_original()
    with pytest.raises(OSError):
        image.read_interface()
    assert reg.status()[0].images[0].sha256 == ""


def test_same_content_compares_the_bytes_when_the_file_was_rewritten(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    first = mod._active
    install(samples["v1"], moddir / "sample.so")         # rewritten with the same bytes: a new signature
    with reg.prepare("sample") as staged:                # (leaving the block aborts it)
        second = staged._image
        assert second.signature != first.signature
        assert first.same_content(second) and second.same_content(first)
        assert staged.unchanged_since == 1
    longer = moddir / "longer.so"
    longer.write_bytes(samples["v1"].read_bytes() + bytes(64))     # padded at the end: still loads
    for other in (samples["v2"], longer):                 # the same size, then another size
        install(other, moddir / "sample.so")
        with reg.prepare("sample") as staged:
            assert first.same_content(staged._image) is False
            assert staged.unchanged_since is None


def test_same_content_is_false_when_the_serving_copy_cannot_be_read(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    first = reg.load("sample", cdef=SAMPLE_CDEF)._active
    first._hash = None
    os.unlink(first.copy_path)                           # a tmp cleaner: its bytes can no longer be compared
    install(samples["v1"], moddir / "sample.so")
    with reg.prepare("sample") as staged:
        assert first.same_content(staged._image) is False   # cannot tell: a change, not "unchanged"
        assert staged.unchanged_since is None


def test_an_image_loaded_with_a_cdef_embeds_no_interface(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    image = reg.load("sample", cdef=SAMPLE_CDEF)._active
    assert image.embeds_interface is False
    assert reg.status()[0].images[0].interface is False


def test_read_original_stops_where_the_file_ends(reg, moddir, samples, monkeypatch):
    # Our private copy does not shrink; if it ever did between the fstat and the reads, what is there is read,
    # and the loop ends (a read of 0 bytes), instead of reading for ever.
    install(samples["v1"], moddir / "sample.so")
    image = reg.load("sample", cdef=SAMPLE_CDEF)._active
    real_fstat = os.fstat

    def fstat_reporting_more(fd):
        st = real_fstat(fd)
        fields = list(st)
        fields[6] += 4096                       # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(image_module.os, "fstat", fstat_reporting_more)
    data = image.read_original()
    monkeypatch.undo()
    assert data == (moddir / "sample.so").read_bytes()


def test_an_error_in_the_fini_of_an_aborted_image_is_logged(reg, moddir, samples, caplog):
    install(samples["v1"], moddir / "sample.so")
    reg.load("sample", cdef=SAMPLE_CDEF)
    staged = reg.prepare("sample")
    prepared = staged._image
    closing = []

    def failing_fini(image):
        closing.append(image)
        raise RuntimeError("fini failed")

    prepared.on_closing = failing_fini
    with caplog.at_level(logging.ERROR, logger="nativereload"):
        staged.abort()                           # never raises: the copy is still removed
    assert closing == [prepared]
    assert "module 'sample' generation 2: error before closing" in caplog.text and "fini failed" in caplog.text
    assert prepared.state == "closed" and not os.path.exists(prepared.copy_path)


def test_a_failure_between_dlopen_and_the_library_object_closes_the_handle(reg, moddir, samples, monkeypatch,
                                                                           tmpdir_for_copies):
    from conftest import mapped_paths

    install(samples["v1"], moddir / "sample.so")
    other = reg.load("other", cdef="int version(void);", file=moddir / "sample.so")
    backend = other.ffi._backend

    def fail(handle, flags):
        raise OSError("cffi could not wrap the handle")

    monkeypatch.setattr(backend, "load_library", fail)
    with pytest.raises(OSError, match="could not wrap"):
        reg.load("sample", cdef=SAMPLE_CDEF)
    monkeypatch.undo()
    copies = [path for path in mapped_paths() if path.startswith(str(tmpdir_for_copies))]
    assert copies == [other._active.copy_path]         # only the other module's image is mapped


def test_calls_are_attached_only_to_an_image_that_is_not_closed(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    first = mod._active
    table = dict(first.functions)
    first.attach_calls(table, frozenset({"version"}))
    assert first.gate.functions == table and first.compiled == frozenset({"version"})
    reg.reload("sample")
    assert first.state == "closed"
    first.attach_calls(table, frozenset({"version"}))     # too late: its code is unmapped
    assert first.gate.functions == {} and first.compiled == frozenset()


def test_an_error_in_the_fini_of_a_drained_image_is_logged_and_it_still_closes(reg, moddir, samples, caplog):
    install(samples["v1"], moddir / "sample.so")
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    first = mod._active

    def failing_fini(image):
        raise RuntimeError("fini failed")

    first.on_closing = failing_fini
    with caplog.at_level(logging.ERROR, logger="nativereload"):
        reg.reload("sample")                     # never raises: the fini's error is the module's, not the reload's
    assert "module 'sample' generation 1: error before closing" in caplog.text and "fini failed" in caplog.text
    assert first.state == "closed" and not os.path.exists(first.copy_path)
    assert mod.version() == 1
