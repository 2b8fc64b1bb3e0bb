"""A module's contract: the declarations an image is resolved with, and what a reload may change of them.

A module that embeds its interface (``nativereload_add_module(... INTERFACE
header.h)``, or ``nativereload embed``) carries its own declarations; a cdef
given by the caller must agree with them. A reload may add to the interface;
it may not change a signature or a layout, nor drop a function the serving
image exports, unless the caller accepts it (``allow_interface_change=True``).
Each check runs before anything of the new image runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import interface as _interface
from .errors import InterfaceError, SymbolError
from .interface import Declarations, Diff

if TYPE_CHECKING:
    from .image import Image
    from .module import Module

__all__ = ["check_agreement", "check_exports_kept", "declarations_for"]

logger = logging.getLogger(__name__.rpartition(".")[0])


def declarations_for(name: str, serving: Declarations | None, embedded: _interface.Interface | None,
                     cdef: str | None, allow_change: bool, path: str, refused: str) -> tuple[Declarations, Diff | None]:
    """The declarations a new image is resolved with, and what they change from ``serving``.

    ``cdef`` (if given) wins over the embedded interface, but must agree
    with it; with neither, the serving declarations stay.

    Raises:
        InterfaceError: no interface at all (first load), a cdef that does not
            parse or disagrees with the embedded one, or an incompatible change.
    """
    given = _interface.parse(cdef, module=name) if cdef is not None else None
    if given is not None and embedded is not None:
        check_agreement(name, embedded, given, path, refused)
    new = given or embedded
    if serving is None:
        if new is None:
            raise InterfaceError(
                f"module '{name}': no interface for {path}: it embeds none and no cdef was given (load "
                f"refused) — build it with nativereload_add_module({name} SOURCES ... INTERFACE {name}.h) "
                f"(or compile in the C file `nativereload embed {name}.h -o {name}_interface.c` writes), "
                f"or pass the declarations: load('{name}', cdef='...')", module=name, path=path)
        return Declarations.of(new, module=name), None
    if new is None:
        return serving, None
    change = _interface.diff(serving.interface, new)
    if not change:
        return serving, None
    if change.compatible:
        try:
            return serving.grow(new, module=name), change
        except InterfaceError as exc:
            # The FFI was grown by a reload that was then aborted, another way.
            logger.warning("module '%s': %s; cdata made before this reload will not fit its new "
                           "functions", name, exc)
            return Declarations.of(new if new.ffi is not None else _interface.parse(new.cdef, module=name),
                                   module=name), change
    if not allow_change:
        raise change.error(module=name, path=path, outcome=refused)
    logger.warning("module '%s': the interface of %s changed incompatibly, accepted with "
                   "allow_interface_change=True (cdata made by the old declarations do not fit the new ones):\n%s",
                   name, path, change.render(indent="  "))
    return Declarations.of(new if new.ffi is not None else _interface.parse(new.cdef, module=name),
                           module=name), change


def check_exports_kept(module: Module, serving: Image, image: Image, allow_change: bool, refused: str) -> None:
    """A function the serving image exports must not vanish (missing="lazy" allows it at load, not here)."""
    lost = sorted(name for name in image.missing if name in serving.gate.functions)
    if lost and not allow_change:
        names = ", ".join(f"'{name}'" for name in lost)
        raise SymbolError(
            f"module '{module.name}': generation {module.generation} exports {names}, which {image.source} "
            f"does not ({refused}) — export {'it' if len(lost) == 1 else 'them'} again, or reload with "
            "allow_interface_change=True", module=module.name, symbols=tuple(lost))


def check_agreement(name: str, embedded: _interface.Interface, given: _interface.Interface, path: str,
                    refused: str) -> None:
    """A cdef given with a module that embeds its interface must declare everything as the module does."""
    disagree = _interface.diff(embedded, given).changed
    if disagree:
        first = disagree[0]
        lines = "\n".join(f"  {c.category} {c.name}{': ' + '; '.join(c.details) if c.details else ''}\n"
                          f"    the module's: {c.old}\n    the cdef's:   {c.new}" for c in disagree)
        raise InterfaceError(
            f"module '{name}': the cdef given disagrees with the interface {path} embeds ({refused}):\n{lines}\n"
            f"— leave out cdef= to use the module's own declarations, or fix the cdef", module=name, path=path,
            function=first.name if first.category == "function" else None, old=first.old, new=first.new)
