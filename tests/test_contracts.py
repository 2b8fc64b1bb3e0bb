"""Module contracts: the interface embedded in the .so, checked on every reload; prepare / commit / abort.

The contract samples embed csrc/samples/contract.h; each variant changes one
declaration (see tests/conftest.py).
"""

from __future__ import annotations

import logging

import pytest

from nativereload import InterfaceError, NativeReloadError, ReloadPending, StagedReload, SymbolError

from conftest import SAMPLE_CDEF, install, mapped_paths, open_fds, private_copies, run_python

REFUSED = {
    "contract_return": r"changed function contract_version: returns double, was int\n +old: int "
                       r"contract_version\(void\)\n +new: double contract_version\(void\)",
    "contract_param": r"changed function contract_add: parameter 2 is int, was long",
    "contract_struct": r"changed struct contract_point: size 16, was 8",
    "contract_enum": r"CONTRACT_SAFE = 3, was 2",
    "contract_drop": r"removed function contract_scaled",
}


@pytest.fixture
def contract(reg, moddir, samples):
    install(samples["contract"], moddir / "contract.so")
    return reg.load("contract")


def test_a_module_with_an_embedded_interface_loads_with_no_cdef(reg, contract):
    assert contract.contract_version() == 1 and contract.contract_add(2, 3) == 5
    assert "int contract_version(void);" in contract.cdef
    point = contract.ffi.new("struct contract_point *", {"x": -3, "y": 4})
    assert contract.contract_norm1(point) == 7
    assert dict(contract.interface.types["enum contract_mode"].values)["CONTRACT_SAFE"] == 2
    assert contract.contract_weight(2) == 10
    assert contract.interface.functions["contract_add"].params == ("long", "long")
    [image] = reg.status()[0].images
    assert image.interface is True and len(image.sha256) == 12


def test_a_cdef_given_as_well_must_agree(reg, moddir, samples):
    install(samples["contract"], moddir / "contract.so")
    with pytest.raises(InterfaceError, match=r"function contract_version: returns double, was int\n"
                                             r" +the module's: int contract_version\(void\)\n"
                                             r" +the cdef's: +double contract_version\(void\)") as raised:
        reg.load("contract", cdef="double contract_version(void);")
    assert raised.value.function == "contract_version"
    assert reg.status() == []
    mod = reg.load("contract", cdef="int contract_version(void); long contract_add(long, long);")
    assert mod.contract_add(1, 1) == 2
    with pytest.raises(SymbolError, match="'contract_scaled' is not a function it declares"):
        mod.contract_scaled(1)                  # the given cdef is what the module is called with


@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_an_incompatible_reload_is_refused_and_changes_nothing(reg, contract, moddir, samples, tmpdir_for_copies,
                                                               variant):
    copies, fds, maps = private_copies(tmpdir_for_copies), open_fds(), mapped_paths()
    install(samples[variant], moddir / "contract.so")
    with pytest.raises(InterfaceError, match=REFUSED[variant]) as raised:
        reg.reload("contract")
    assert "reload refused; generation 1 still serving" in str(raised.value)
    assert "allow_interface_change=True" in str(raised.value)
    assert contract.generation == 1 and contract.contract_version() == 1
    assert private_copies(tmpdir_for_copies) == copies and open_fds() == fds and mapped_paths() == maps


def test_an_incompatible_reload_allowed_on_purpose(reg, contract, moddir, samples, caplog):
    install(samples["contract_return"], moddir / "contract.so")
    with caplog.at_level(logging.WARNING, logger="nativereload"):
        reg.reload("contract", allow_interface_change=True)
    assert contract.contract_version() == 2.5
    assert "changed function contract_version" in caplog.text and "allow_interface_change" in caplog.text
    assert not contract.interface_change.compatible


def test_an_added_function_is_callable_at_once_and_old_cdata_still_fit(reg, contract, moddir, samples, caplog):
    ffi = contract.ffi
    point = ffi.new("struct contract_point *", {"x": 1, "y": -2})
    norm1 = contract.contract_norm1
    install(samples["contract_add"], moddir / "contract.so")
    with caplog.at_level(logging.INFO, logger="nativereload"):
        reg.reload("contract")
    assert contract.generation == 2 and contract.interface_change.summary() == "1 added (compatible)"
    assert [m for m in caplog.messages if m.startswith("reloaded 'contract' generation 2 in ")
            and m.endswith("(generation 1 closed); interface: 1 added (compatible)")]
    assert contract.contract_added(1) == 101 and reg.func("contract.contract_added")(2) == 102
    assert contract.ffi is ffi                          # one FFI, grown: cdata made before still fit
    assert norm1(point) == 3 and contract.contract_norm1(point) == 3
    install(samples["contract"], moddir / "contract.so")
    with pytest.raises(InterfaceError, match="removed function contract_added"):
        reg.reload("contract")                          # and now dropping it is a removal


def test_a_reload_of_the_same_file_says_it_is_unchanged(reg, contract, moddir, samples):
    reg.reload("contract")
    assert contract.unchanged_since == 1
    reg.reload("contract")
    assert contract.unchanged_since == 1
    install(samples["contract_v2"], moddir / "contract.so")
    reg.reload("contract")
    assert contract.unchanged_since is None and contract.contract_version() == 2
    install(samples["contract_v2"], moddir / "contract.so")   # rewritten, same bytes: still unchanged
    reg.reload("contract")
    assert contract.unchanged_since == 4
    [image] = reg.status()[0].images
    assert image.sha256 and image.interface


def test_the_interface_is_read_without_running_the_module(moddir, samples, tmp_path):
    # contract_abort aborts the process in a constructor: a refusal must come before any dlopen.
    install(samples["contract_abort"], moddir / "contract.so")
    result = run_python(f"""
import nativereload
reg = nativereload.Registry(path=[{str(moddir)!r}], tmpdir={str(tmp_path)!r})
try:
    reg.load("contract", cdef="double contract_version(void);")
except nativereload.InterfaceError as exc:
    print("refused:", type(exc).__name__)
reg.close()
""")
    assert result.returncode == 0, result.stderr
    assert "refused: InterfaceError" in result.stdout


def test_missing_lazy_allows_declared_functions_the_library_lacks(reg, moddir, samples):
    install(samples["v1"], moddir / "sample.so")
    cdef = SAMPLE_CDEF + "int not_exported(int);"
    with pytest.raises(SymbolError, match="'not_exported' not found.*missing='lazy'"):
        reg.load("sample", cdef=cdef)
    mod = reg.load("sample", cdef=cdef, missing="lazy")
    assert mod.add(1, 2) == 3
    with pytest.raises(SymbolError, match="'not_exported' is declared, but generation 1 .* does not export it"):
        mod.not_exported(1)
    # A reload still refuses to lose a function the serving image exports.
    install(samples["nosym"], moddir / "sample.so")
    with pytest.raises(SymbolError, match="generation 1 exports 'scaled'"):
        reg.reload("sample")
    reg.reload("sample", allow_interface_change=True)
    with pytest.raises(SymbolError, match="'scaled' is declared, but generation 2"):
        mod.scaled(1)


# -- prepare / commit / abort ---------------------------------------------------------------------------------

def test_prepare_then_commit(reg, contract, moddir, samples):
    install(samples["contract_v2"], moddir / "contract.so")
    staged = reg.prepare("contract")
    assert isinstance(staged, StagedReload) and staged.state == "prepared"
    assert (staged.generation, staged.serving_generation) == (2, 1)
    assert [(i.generation, i.state) for i in reg.status()[0].images] == [(1, "active"), (2, "prepared")]
    assert contract.contract_version() == 1                     # calls still go to the serving image
    with pytest.raises(ReloadPending, match="commit\\(\\) or abort\\(\\) it first"):
        reg.reload("contract")
    with pytest.raises(ReloadPending):
        reg.prepare("contract")
    with pytest.raises(ReloadPending):
        reg.unload("contract")
    assert staged.commit() is contract
    assert contract.generation == 2 and contract.contract_version() == 2 and staged.state == "committed"
    assert [(i.generation, i.state) for i in reg.status()[0].images] == [(2, "active")]
    with pytest.raises(NativeReloadError, match="already committed"):
        staged.abort()
    with pytest.raises(NativeReloadError, match="was committed"):
        staged.commit()


def test_prepare_then_abort_leaves_nothing(reg, contract, moddir, samples, tmpdir_for_copies):
    copies, fds, maps = private_copies(tmpdir_for_copies), open_fds(), mapped_paths()
    install(samples["contract_v2"], moddir / "contract.so")
    staged = reg.prepare("contract")
    staged.abort()
    staged.abort()                                              # idempotent
    assert staged.state == "aborted" and contract.generation == 1 and contract.contract_version() == 1
    assert private_copies(tmpdir_for_copies) == copies and open_fds() == fds and mapped_paths() == maps
    with pytest.raises(NativeReloadError, match="was aborted"):
        staged.commit()
    with reg.prepare("contract") as again:                      # leaving the block without commit aborts
        assert again.generation == 2
    assert again.state == "aborted"
    assert reg.reload("contract").generation == 2


def test_prepare_refusals_are_a_reloads(reg, contract, moddir, samples):
    install(samples["contract_return"], moddir / "contract.so")
    with pytest.raises(InterfaceError):
        reg.prepare("contract")
    assert contract.generation == 1 and [i.state for i in reg.status()[0].images] == ["active"]


def test_close_aborts_a_pending_prepared_reload(moddir, samples, tmpdir_for_copies, caplog):
    from nativereload import Registry

    install(samples["contract"], moddir / "contract.so")
    reg = Registry(path=[moddir], tmpdir=tmpdir_for_copies)
    reg.load("contract")
    staged = reg.prepare("contract")
    with caplog.at_level(logging.WARNING, logger="nativereload"):
        assert reg.close(timeout=5)
    assert staged.state == "aborted" and "registry closed before commit()" in caplog.text
    assert private_copies(tmpdir_for_copies) == []


@pytest.mark.timeout(120)
def test_prepare_and_commit_under_concurrent_calls(reg, contract, moddir, samples):
    import threading

    stop, errors, seen = threading.Event(), [], set()

    def caller():
        try:
            while not stop.is_set():
                seen.add(contract.contract_version())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for n in range(40):
            install(samples["contract_v2" if n % 2 == 0 else "contract"], moddir / "contract.so")
            staged = reg.prepare("contract")
            if n % 3 == 2:
                staged.abort()
            else:
                staged.commit()
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == [] and seen == {1, 2}
    assert reg.wait_drained(timeout=10)


def test_the_cli_reload_picks_up_a_new_function(reg, contract, moddir, samples):
    from nativereload.control import server

    install(samples["contract_add"], moddir / "contract.so")
    reply = server.handle(reg, {"op": "reload", "module": "contract"})
    assert reply["ok"] and reply["interface_change"]["summary"] == "1 added (compatible)"
    assert reg.func("contract.contract_added")(5) == 105
    install(samples["contract_return"], moddir / "contract.so")
    with pytest.raises(InterfaceError):
        server.handle(reg, {"op": "reload", "module": "contract"})
    reply = server.handle(reg, {"op": "reload", "module": "contract", "allow_interface_change": True})
    assert reply["ok"] and reply["interface_change"]["compatible"] is False
    reply = server.handle(reg, {"op": "reload", "module": "contract"})
    assert reply["unchanged_since"] == 3 and reply["path"].endswith("contract.so")
