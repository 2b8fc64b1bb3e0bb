"""The package's layout holds: data flows one way, and no module imports its caller."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "nativereload"


def imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, as dotted names relative to the package ("control.server")."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)])
            if node.module:
                base += node.module.split(".")
            found.add(".".join(base))
            for alias in node.names:
                found.add(".".join(base + [alias.name]))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nativereload"):
            found.add(node.module.partition(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.partition(".")[2] for a in node.names if a.name.startswith("nativereload."))
    return {name for name in found if name}


@pytest.mark.parametrize("module, forbidden", [
    ("demo.py", {"cli"}),
    ("watch.py", {"cli"}),
    ("output.py", {"cli", "demo", "watch", "registry", "control"}),
    ("errors.py", {"cli", "registry", "control", "image", "gate", "build"}),
    ("control/protocol.py", {"control.server", "control.client", "control.discovery", "registry", "cli"}),
    ("control/client.py", {"control.server", "registry", "cli"}),
    ("control/discovery.py", {"control.server", "registry", "cli"}),
    ("control/server.py", {"control.client", "cli"}),
])
def test_no_module_imports_its_caller(module, forbidden):
    found = imports(PACKAGE / module)
    assert not {name for name in found for bad in forbidden if name == bad or name.startswith(bad + ".")}, found


@pytest.mark.parametrize("module", sorted(path.name for path in (PACKAGE / "cli").glob("*.py")))
def test_cli_talks_to_the_client_not_the_server(module):
    found = imports(PACKAGE / "cli" / module)
    assert "control.server" not in found and "registry" not in found


def test_help_shows_the_public_api_not_its_internals():
    import pydoc
    import typing

    import nativereload

    assert typing.get_type_hints(nativereload.Registry.func)["return"] is nativereload.Func
    assert typing.get_type_hints(nativereload.Module.func)["return"] is nativereload.Func
    assert nativereload.Registry.serve.__annotations__["return"] == "Server"
    for cls, internal in ((nativereload.Module, "Implementation"), (nativereload.Func, "on_missing")):
        text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
        assert internal not in text and "Made by" in text
    assert "ForwardRef" not in pydoc.render_doc(nativereload.ModuleStatus, renderer=pydoc.plaintext)
    assert "Raises:" in (nativereload.Registry.call.__doc__ or "")
    for obj in (nativereload, nativereload.Registry, nativereload.Module, nativereload.Func):
        text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
        assert ".py)" not in text and "README" not in text
