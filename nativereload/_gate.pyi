"""The in-flight gate in C (csrc/_gate.c): the same three types as the pure-Python gate.

nativereload/gate.py states the protocol; this module implements it with C11
atomics and a vectorcall Func, so that a reloadable call costs a few
nanoseconds more than the cffi call it wraps. It is optional: when it is not
built, or with ``NATIVERELOAD_PURE_PYTHON=1``, ``gate.implementation()``
returns the Python gate. Safe on free-threaded CPython (see the comment at the
top of csrc/_gate.c).

Differences from the Python types, all stricter:
    * ``Slot.current`` accepts only an ``ImageGate`` of this module, or None.
    * ``Func`` needs a ``Slot`` of this module and a ``str`` symbol.
    * ``ImageGate.retired`` is read-only: use ``retire()``.
    * ``ImageGate`` and ``Func`` can be initialized only once (a second
      ``__init__`` raises TypeError): a call on another thread reads their
      fields without a lock.
    * None of the three can be subclassed.
"""

from typing import Any, Callable, Mapping, final

@final
class ImageGate:
    """In-flight accounting for one image.

    Counts calls in and out; once ``retire()`` has been called and no call is
    in flight, calls ``on_drained()`` exactly once, on whichever thread saw it
    drain (the retiring thread if the image is idle). ``on_drained`` is
    dropped after it fires. An exception from it propagates to whoever
    triggered the drain: ``retire()``, ``try_drain()``, or the Func call that
    was last out (with that call's own exception as ``__context__``).
    """

    functions: Mapping[str, Any]
    """symbol -> function object. Assigning a new mapping invalidates every
    Func's cached lookup; a Func caches only hits, so symbols added in place
    are found, but an entry removed or replaced in place on an image that is
    still current may be served from the cache. Replace the mapping instead."""

    def __init__(self, functions: Mapping[str, Any], on_drained: Callable[[], object]) -> None: ...
    @property
    def retired(self) -> bool:
        """True once ``retire()`` was called."""
    @property
    def drained(self) -> bool:
        """True once ``on_drained`` has been called."""
    @property
    def in_flight(self) -> int:
        """Calls that have entered and not yet left (a snapshot)."""
    def retire(self) -> None:
        """Stop admitting calls; fire ``on_drained`` now if none is in flight, else when the last returns.

        Call only after ``slot.current`` points elsewhere. Idempotent.
        """
    def try_drain(self) -> None:
        """Fire ``on_drained`` once, if retired and no call is in flight."""

@final
class Slot:
    """The image a module's new calls go to (``current``), or None once unloaded.

    Reading ``current`` and taking a reference is atomic with respect to a
    concurrent assignment, also on free-threaded CPython.
    """

    current: ImageGate | None
    def __init__(self) -> None: ...

@final
class Func:
    """A reload-safe handle on one C function: each call runs on ``slot.current``.

    Calling it: if the slot is empty or its image lacks ``symbol`` (missing
    or None in ``functions``), raises the exception ``on_missing(gate_or_None)``
    returns. Otherwise calls the function object with the same positional
    arguments (vectorcall, no keywords) and returns its result; the call is
    counted in the image's ``in_flight`` for its whole duration, including
    when it raises. A call that finds the image retired backs out and retries
    on the slot's next image, yielding the GIL while the slot has not moved on.
    """

    @property
    def name(self) -> str:
        """"module.symbol"."""
    @property
    def symbol(self) -> str:
        """The C symbol."""
    def __init__(self, slot: Slot, qualname: str, symbol: str,
                 on_missing: Callable[[ImageGate | None], BaseException]) -> None: ...
    def __call__(self, *args: Any) -> Any: ...

@final
class CompiledFunction:
    """One image's function called through a compiled wrapper (nativereload/compiled/).

    Stored in an ImageGate's ``functions`` in place of the cffi ABI function
    object ``abi``: a Func calls it like any function object. A call with
    ``arity`` positional arguments that pass ``checks`` (per argument: None, or
    the ctype a cdata argument must have exactly) goes to ``fast`` (the shape's
    fast entry, an address, when it converts every argument itself) or else to
    ``builtin(address, *args)`` (the shape's cffi API-mode wrapper); a result is
    cast back to ``result_type`` when one is given. Any other call goes to
    ``abi``, so it behaves and fails exactly as on the gate path.
    """

    @property
    def abi(self) -> Any: ...
    @property
    def address(self) -> int: ...
    @property
    def builtin(self) -> Any: ...
    def __init__(self, builtin: Callable[..., Any], abi: Callable[..., Any], arity: int, checks: tuple | None = None,
                 result_type: Any = None, address: int | None = None, fast: int | None = None) -> None: ...
    def __call__(self, *args: Any) -> Any: ...

def compiled_functions(specs: Mapping[str, tuple], functions: Mapping[str, Any]) -> dict[str, Any]:
    """``functions`` with a CompiledFunction for each symbol that has a spec (builtin, arity, checks,
    result_type, fast); the address of each is read from its cffi function object."""

def configure_compiled(cast: Callable[[Any, Any], Any], sample_cdata: Any, sample_ctype: Any) -> bool:
    """Give the compiled path cffi's cast; verify the cdata layout it reads on a sample. True if verified."""

def clear_thread_cache() -> None:
    """Free-threaded builds: drop the calling thread's cached references to gates and function objects
    (each thread keeps those of its last call of each Func, at most 64). A no-op with the GIL."""
