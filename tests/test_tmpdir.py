"""Temporary directories that cannot hold a loadable copy: mounted noexec, or full.

These mount a small tmpfs, which needs root (CI runs as root); elsewhere they skip.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from nativereload import LoadError, Registry

from conftest import SAMPLE_CDEF, install, open_fds, private_copies


@pytest.fixture
def mount_tmpfs(tmp_path):
    mounted = []

    def mount(name, options):
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)


def refused_load(reg) -> LoadError:
    """``reg.load("sample")``, which must fail: return its LoadError, having checked nothing stayed open."""
    fds = open_fds()
    with pytest.raises(LoadError) as info:
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert open_fds() == fds and reg.status() == []
    return info.value


def test_noexec_tmpdir_says_to_set_tmpdir(moddir, samples, mount_tmpfs):
    noexec = mount_tmpfs("noexec", "noexec,size=4m")
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=noexec) as reg:
        error = refused_load(reg)
        message = str(error)
        assert "'sample'" in message and "noexec" in message
        assert "TMPDIR" in message and "tmpdir=" in message
        assert "failed to map segment" in error.reason
        assert private_copies(noexec) == []


def test_reload_into_a_noexec_tmpdir_keeps_old_version(moddir, samples, mount_tmpfs, tmp_path, monkeypatch):
    noexec = mount_tmpfs("noexec", "noexec,size=4m")
    good = tmp_path / "good"
    good.mkdir()
    install(samples["v1"], moddir / "sample.so")
    monkeypatch.setenv("TMPDIR", str(good))
    with Registry(path=[moddir]) as reg:
        mod = reg.load("sample", cdef=SAMPLE_CDEF)
        install(samples["v2"], moddir / "sample.so")
        monkeypatch.setenv("TMPDIR", str(noexec))
        with pytest.raises(LoadError, match="generation 1 still serving.*TMPDIR"):
            reg.reload("sample")
        assert mod.version() == 1 and mod.generation == 1
        assert private_copies(noexec) == []


def test_full_tmpdir_says_to_free_space_or_set_tmpdir(moddir, samples, mount_tmpfs):
    full = mount_tmpfs("full", "size=8k")      # two pages: the copy (~16 KB) cannot fit
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=full) as reg:
        message = str(refused_load(reg))
        assert "No space left on device" in message
        assert "TMPDIR" in message and "tmpdir=" in message
        assert private_copies(full) == []
    assert os.listdir(full) == []


def test_missing_tmpdir_is_a_load_error(moddir, samples, tmp_path):
    install(samples["v1"], moddir / "sample.so")
    with Registry(path=[moddir], tmpdir=tmp_path / "does-not-exist") as reg:
        with pytest.raises(LoadError, match="'sample'.*does-not-exist.*TMPDIR"):
            reg.load("sample", cdef=SAMPLE_CDEF)


def test_is_noexec_tells_a_noexec_mount(mount_tmpfs, tmp_path):
    from nativereload import image

    noexec = mount_tmpfs("noexec", "noexec,size=1m")
    assert image._is_noexec(str(noexec / "copy.so")) is True
    assert image._is_noexec(str(tmp_path / "copy.so")) is False
    assert image._is_noexec(str(tmp_path / "missing" / "copy.so")) is False
