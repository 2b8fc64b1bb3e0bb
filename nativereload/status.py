"""What ``Registry.status()`` reports: each module, each of its images, and what holds an image open.

The functions here read a module's bookkeeping and its images' gates; the
registry takes its state lock around the lists they are given and calls
them outside it for anything that touches the file system.
"""

from __future__ import annotations

import os
import typing
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, NamedTuple

if TYPE_CHECKING:
    from .image import Image
    from .module import Module

__all__ = ["ImageStatus", "ModuleStatus", "describe_holders", "held_by", "image_state", "image_status"]


class ImageStatus(NamedTuple):
    """One image of a module, as ``Registry.status()`` saw it.

    Attributes:
        generation: which load made it (1 for the first).
        state: "active" (new calls go here), "prepared" (loaded by prepare(),
            waiting for commit() or abort()), "retired" (replaced; open while
            anything below holds it), or "leaked" (closed, but the dynamic
            loader kept it mapped).
        in_flight: calls inside it at that moment.
        copy_path: its private copy, the file that is mapped.
        pins: pins held on it (``Module.pin()``).
        handles: handles bound to it, by C type (``{"sqlite3 *": 2}``).
        pointer_results: pointer results it returned that are still alive.
        held_by: all of that in words, e.g. "0 calls, 2 handles (sqlite3 *), 1 pin".
        copy_deleted: its private copy is gone from disk (a tmp cleaner removed
            it); the image still runs from its mapping.
        sha256: the first 12 hex digits of the SHA-256 of the file it was
            copied from ("" if it cannot be read any more).
        interface: whether the file embeds its interface.
    """

    generation: int
    state: str
    in_flight: int
    copy_path: str
    pins: int = 0
    handles: Mapping[str, int] = MappingProxyType({})
    pointer_results: int = 0
    held_by: str = ""
    copy_deleted: bool = False
    sha256: str = ""
    interface: bool = False


class ModuleStatus(NamedTuple):
    """A module, as ``Registry.status()`` saw it.

    Attributes:
        name: the module name.
        path: the file its images are copied from.
        generation: the current (or, once unloaded, the last) generation.
        images: its images not yet closed, oldest first.
        kept: the files kept for rollback, oldest first, as (generation, sha256 prefix).
        calls: how the current image's calls are made: "compiled", "compiling"
            (on the C gate until the compiled path is ready), "gate" (the C
            gate's cffi call) or "python" (the pure-Python gate).
        compiled: the functions the current image serves on the compiled path
            (the others stay on the gate: variadic, or a struct passed by value).
    """

    name: str
    path: str
    generation: int
    images: list[ImageStatus]
    kept: list[tuple[int, str]] = []
    calls: str = "gate"
    compiled: tuple[str, ...] = ()


def image_status(module: Module, image: Image) -> ImageStatus:
    """``image`` of ``module`` as status() reports it (asks the file system whether its copy is still there)."""
    gate = image.gate
    deleted = not os.path.lexists(image.copy_path)
    try:
        sha256 = image.content_hash()[:12]
    except OSError:
        sha256 = ""
    embedded = image.declarations is not None and image.embeds_interface
    if image.state == "leaked":
        return ImageStatus(image.generation, "leaked", 0, image.copy_path, held_by="closed",
                           copy_deleted=deleted, sha256=sha256, interface=embedded)
    handles = module._bindings.counts(gate)
    return ImageStatus(image.generation, image_state(module, image), gate.in_flight, image.copy_path,
                       gate.pins, MappingProxyType(handles), gate.pointer_results,
                       describe_holders(gate.in_flight, gate.pins, handles, gate.pointer_results), deleted,
                       sha256, embedded)


def held_by(module: Module, image: Image, flight: str = "") -> str:
    """What holds ``image`` open, in words: "1 call, 2 handles (sqlite3 *)".

    For log lines, ``flight`` says the calls part "1 call in flight" ("calls") or "1 in flight" ("count").
    """
    gate = image.gate
    text = describe_holders(gate.in_flight, gate.pins, module._bindings.counts(gate), gate.pointer_results)
    if flight:
        calls, _, rest = text.partition(", ")
        calls = f"{gate.in_flight} in flight" if flight == "count" else f"{calls} in flight"
        text = calls + (f", {rest}" if rest else "")
    return text


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def describe_holders(calls: int, pins: int, handles: Mapping[str, int], pointer_results: int) -> str:
    """e.g. "0 calls, 2 handles (sqlite3 *), 1 pin": calls always, the other holders when there are any."""
    parts = [_plural(calls, "call")]
    if handles:
        total = sum(handles.values())
        parts.append(f"{_plural(total, 'handle')} ({', '.join(sorted(handles))})")
    if pins:
        parts.append(_plural(pins, "pin"))
    if pointer_results:
        parts.append(_plural(pointer_results, "pointer result"))
    return ", ".join(parts)


def image_state(module: Module, image: Image) -> str:
    """What status() reports: the module's current image is "active" (even in the instant before the old
    one is marked retired), one waiting for commit() "prepared", a closed one still mapped "leaked", any
    other "retired"."""
    if image is module._active:
        return "active"
    pending = module._pending
    if pending is not None and image is pending._image:
        return "prepared"
    return "leaked" if image.state == "leaked" else "retired"


# With ``from __future__ import annotations`` NamedTuple keeps its field types as
# strings, which help() shows as ForwardRef('str'): give it the real types.
for _status in (ImageStatus, ModuleStatus):
    _status.__annotations__ = _status.__new__.__annotations__ = typing.get_type_hints(_status)
del _status
