"""One image's own promises (nativereload/image.py): its error hints, and a close that never raises."""

from __future__ import annotations

import logging

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
