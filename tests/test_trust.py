"""Module files that another user could rewrite, and the allow-list of contents (nativereload/trust.py).

A library another user can write to, or that sits in a directory another
user can write to without the sticky bit, lets that user run code in this
process at the next reload (issue 13). Refused by default, like ssh's
StrictModes; ``Registry(trust_writable=True)`` allows it.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from nativereload import LoadError, Registry
from nativereload.trust import Trust, _directories

from conftest import SAMPLE_CDEF, install, open_fds, private_copies

OTHER = 65534        # nobody / nogroup


def needs_root():
    if os.getuid() != 0:
        pytest.skip("needs root (to give files to another user)")


@pytest.fixture
def library(moddir, samples):
    return install(samples["v1"], moddir / "sample.so")


def refused(reg, pattern, **kwargs):
    fds = open_fds()
    with pytest.raises(LoadError, match=pattern) as info:
        reg.load("sample", cdef=SAMPLE_CDEF, **kwargs)
    assert open_fds() == fds and reg.status() == []
    return info.value


def test_a_file_writable_by_everyone(reg, library, tmpdir_for_copies):
    os.chmod(library, 0o666)
    error = refused(reg, r"refusing to load .*sample.so: it is writable by every user \(mode 666\), so another user "
                         r"could replace the code this process runs \(load refused\) — make it yours")
    assert "trust_writable=True" in str(error) and error.reason == "it is writable by every user (mode 666)"
    assert private_copies(tmpdir_for_copies) == []           # checked before copying
    with Registry(path=[library.parent], tmpdir=tmpdir_for_copies, trust_writable=True) as trusting:
        assert trusting.load("sample", cdef=SAMPLE_CDEF).version() == 1


def test_a_file_writable_by_another_group(reg, library):
    needs_root()
    os.chown(library, 0, OTHER)
    os.chmod(library, 0o664)
    refused(reg, r"it is writable by group \w+ \(gid 65534\) \(mode 664\)")


def test_a_file_writable_by_our_private_group_is_fine(reg, library):
    os.chmod(library, 0o664)
    import grp
    import pwd
    me = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(os.getgid())
    if group.gr_name != me.pw_name or set(group.gr_mem) - {me.pw_name}:
        pytest.skip("our group is not a user private group")
    assert reg.load("sample", cdef=SAMPLE_CDEF).version() == 1


def test_a_file_of_another_user(reg, library):
    needs_root()
    os.chown(library, OTHER, OTHER)
    refused(reg, r"it belongs to user \w+ \(uid 65534\)")


@pytest.mark.parametrize("mode, allowed", [(0o777, False), (0o775, False), (0o1777, True), (0o755, True)])
def test_the_directory(reg, library, mode, allowed):
    if mode == 0o775:
        needs_root()
        os.chown(library.parent, 0, OTHER)
    os.chmod(library.parent, mode)
    if allowed:
        assert reg.load("sample", cdef=SAMPLE_CDEF).version() == 1
    else:
        refused(reg, f"its directory {library.parent} is writable by")


def test_a_directory_further_up(reg, moddir, samples, tmp_path):
    deep = moddir / "a" / "b"
    library = install(samples["v1"], deep / "sample.so")
    os.chmod(moddir / "a", 0o777)
    refused(reg, f"its directory {moddir / 'a'} is writable by every user", file=library)


def test_a_directory_of_another_user(reg, library):
    needs_root()
    os.chown(library.parent, OTHER, OTHER)
    refused(reg, f"its directory {library.parent} belongs to user")
    os.chmod(library.parent, 0o1777)
    refused(reg, "belongs to user")          # sticky, but its owner can still replace anything


def test_symlinks_both_ends(reg, moddir, samples, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    install(samples["v1"], real / "sample.so")
    (moddir / "sample.so").symlink_to(real / "sample.so")
    assert reg.load("sample", cdef=SAMPLE_CDEF).version() == 1
    reg.unload("sample")
    os.chmod(real, 0o777)                      # where the link points: anyone can replace the target
    refused(reg, f"its directory {real} is writable")
    os.chmod(real, 0o755)
    os.chmod(moddir, 0o777)                    # where the link is: anyone can replace the link
    refused(reg, f"its directory {moddir} is writable")


def test_directories_on_the_path():
    assert _directories("/a/b/c.so") == ["/a/b", "/a", "/"]


def test_a_reload_of_a_file_made_writable_keeps_the_old_version(reg, library):
    mod = reg.load("sample", cdef=SAMPLE_CDEF)
    os.chmod(library, 0o666)
    with pytest.raises(LoadError, match="writable by every user .*reload refused; generation 1 still serving"):
        reg.reload("sample")
    assert mod.version() == 1 and mod.generation == 1


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_trusted_hashes(moddir, samples, library, tmpdir_for_copies):
    digest = sha256(library)
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, trusted_hashes={digest.upper(), "0" * 64}) as reg:
        mod = reg.load("sample", cdef=SAMPLE_CDEF)
        install(samples["v2"], library)
        other = sha256(library)
        with pytest.raises(LoadError) as info:
            reg.reload("sample")
        message = str(info.value)
        assert f"has SHA-256 {other}, which trusted_hashes does not allow (reload refused; generation 1 still " \
               f"serving) — if this build is yours, add its digest (sha256sum {library})" in message
        assert info.value.reason == f"sha256 {other} not trusted"
        assert mod.version() == 1 and private_copies(tmpdir_for_copies) == [reg.status()[0].images[0].copy_path]


def test_trusted_hashes_callable(moddir, library, tmpdir_for_copies):
    seen = []

    def allow(path, digest):
        seen.append((path, digest))
        return digest == sha256(library)
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, trusted_hashes=allow) as reg:
        reg.load("sample", cdef=SAMPLE_CDEF)
    assert seen == [(str(library), sha256(library))]
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, trusted_hashes=lambda path, digest: False) as reg:
        refused(reg, "which trusted_hashes does not allow")

    def broken(path, digest):
        raise RuntimeError("no database")
    with Registry(path=[moddir], tmpdir=tmpdir_for_copies, trusted_hashes=broken) as reg:
        error = refused(reg, r"the trusted_hashes callable failed for .*RuntimeError\('no database'\) \(load refused\)")
        assert isinstance(error.__cause__, RuntimeError)
    assert private_copies(tmpdir_for_copies) == []


def test_trusted_hashes_must_be_a_collection_or_callable():
    with pytest.raises(TypeError, match="not one string"):
        Trust(trusted_hashes="ab" * 32)
    with pytest.raises(TypeError):
        Trust(trusted_hashes=b"ab")
    assert Trust(trusted_hashes=[]).check_content is not None


def test_large_files_are_hashed_whole(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * (1 << 20) + 5))
    fd = os.open(big, os.O_RDONLY)
    try:
        Trust(trusted_hashes={sha256(big)}).check_content(str(big), fd, module="m", refused="load refused")
        with pytest.raises(LoadError):
            Trust(trusted_hashes={"0" * 64}).check_content(str(big), fd, module="m", refused="load refused")
    finally:
        os.close(fd)
