"""The reload transaction made explicit: prepare, then commit or abort.

``Registry.prepare(name)`` does everything a reload does up to the switch --
copy, ELF check, interface check, dlopen, resolve -- and returns a
:class:`StagedReload`. While it waits, calls keep going to the serving image
(status() shows the new one as "prepared"). ``commit()`` switches new calls to
it; ``abort()`` closes it and deletes its copy, and the serving image never
noticed. ``Registry.reload()`` is ``prepare().commit()`` under one lock.

Why two steps: a fleet of processes can load a new build everywhere first and
switch only if every one of them could (the cluster reload), and a program can
look at what a reload would change (``interface_change``, ``unchanged_since``)
before it decides.

While a reload of a module is prepared, another reload, prepare or unload of
that module is refused with ReloadPending, never queued: a thread that holds a
prepared reload and then reloads again would otherwise wait for itself. A
prepared reload that is neither committed nor aborted is aborted, with a
warning, when its registry closes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .image import Image
    from .interface import Declarations, Diff
    from .module import Module, Objects
    from .registry import Registry

__all__ = ["StagedReload"]

logger = logging.getLogger(__name__.rpartition(".")[0])


class StagedReload:
    """A reload prepared up to the switch. Made by ``Registry.prepare()``; not created directly.

    Exactly one of :meth:`commit` and :meth:`abort` takes effect. Usable as a
    context manager: leaving the block without a commit aborts it.

    Attributes:
        module: the module's name.
        generation: the generation the module will have after commit().
        serving_generation: the generation serving meanwhile.
        state: "prepared", then "committed" or "aborted".
        interface_change: what the new image changes in the interface (a Diff
            of additions, or a change allowed with allow_interface_change), or None.
        unchanged_since: if the new file is byte-identical to the serving
            image's, the generation since which it has not changed; else None.
    """

    def __init__(self, registry: Registry, module: Module, image: Image, declarations: Declarations,
                 objects: Objects, interface_change: Diff | None, unchanged_since: int | None,
                 path: str) -> None:
        """Internal: ``Registry.prepare()`` makes these."""
        self.module = module.name
        self.generation = image.generation
        self.serving_generation = module.generation
        self.state = "prepared"
        self.interface_change = interface_change
        self.unchanged_since = unchanged_since
        self._registry = registry
        self._module = module
        self._image = image
        self._declarations = declarations
        self._objects = objects
        self._path = path

    def __repr__(self) -> str:
        return f"<nativereload.StagedReload '{self.module}' generation {self.generation} {self.state}>"

    def commit(self) -> Module:
        """Switch new calls to the prepared image; the serving one drains and closes as after a reload.

        Returns:
            the Module, its generation one higher.

        Raises:
            NativeReloadError: it was aborted (by abort(), or by the registry closing).
        """
        return self._registry._commit(self)

    def abort(self) -> None:
        """Close the prepared image and delete its copy; the serving image goes on. Idempotent.

        Raises:
            NativeReloadError: it was already committed.
        """
        self._registry._abort(self)

    def __enter__(self) -> "StagedReload":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.state == "prepared":
            self.abort()
