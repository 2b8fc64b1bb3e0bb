"""The notebook cell magic: edit C in a cell, re-run it, and the running kernel calls the new code.

    %load_ext nativereload

    %%nativereload counter
    long add(long a, long b) { return a + b; }

compiles the cell into the module ``counter`` (with the flags reloading
needs; ``build.compile_sources``), declares to cffi the non-static functions
the cell defines (``cdefgen.cdef_from_source``: no cdef to write), loads the
module on the first run and *reloads* it on every later run, and puts the
Module in the notebook's namespace as ``counter``. A Func taken earlier
(``add = counter.add``), and threads calling it in the background, move to
the new code: nothing needs to restart. ``%nativereload`` alone shows the
status of the notebook's modules.

Each cell is compiled once per content and flags: the build lives in
``<IPython cache dir>/nativereload/<name>-<hash>/``, and re-running an
unchanged cell (or going back to an earlier version) compiles nothing. The
module file the registry loads from is this kernel's own
(``<tmpdir>/nativereload-ipython-*/<name>.so``, replaced by rename), so two
kernels with a module of the same name do not disturb each other.

A compile error shows the compiler's messages as it wrote them, naming the
cell's own lines (``counter.c:2:12: error: ...``); a compile error or a
refused reload leaves the previous version serving.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from IPython.core import magic_arguments
from IPython.core.magic import Magics, line_cell_magic, magics_class

from . import __version__, atomicfile
from .build import compile_sources
from .errors import BuildError, InterfaceError, NativeReloadError
from .registry import Module, Registry

__all__ = ["CellError", "NativeReloadMagics", "load_ipython_extension", "unload_ipython_extension"]


class CellError(NativeReloadError):
    """A ``%%nativereload`` cell that could not be compiled or (re)loaded; the previous version keeps serving.

    Shown in the notebook as its ``error:`` and ``hint:`` lines, without a
    traceback of nativereload's internals (IPython calls ``_render_traceback_``).

    Attributes:
        cause: the underlying exception (a BuildError, SymbolError, ...).
        hint: what to do next.
    """

    def __init__(self, message: str, *, module: str, cause: BaseException | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, module=module)
        self.cause = cause
        self.hint = hint

    def _render_traceback_(self) -> list[str]:
        return [f"error: {self}"] + ([f"hint: {self.hint}"] if self.hint else [])


CellError.__module__ = "nativereload.ipython"


def _cache_root() -> Path:
    from IPython.paths import get_ipython_cache_dir

    return Path(get_ipython_cache_dir()) / "nativereload"


@magics_class
class NativeReloadMagics(Magics):
    """``%%nativereload NAME`` (compile and load or reload a C cell) and ``%nativereload`` (status).

    Attributes:
        registry: the kernel's Registry for the cells' modules (made on first use).
    """

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._registry: Registry | None = None
        self._modules_dir: Path | None = None
        self._cells: dict[str, Path] = {}    # module name -> the build directory of its serving version

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._modules_dir = Path(tempfile.mkdtemp(prefix="nativereload-ipython-"))
            self._registry = Registry(path=[self._modules_dir])
        return self._registry

    def close(self) -> None:
        """Close the registry (unloading every cell's module) and remove this kernel's module files."""
        if self._registry is not None:
            self._registry.close(timeout=5.0)
            self._registry = None
        if self._modules_dir is not None:
            shutil.rmtree(self._modules_dir, ignore_errors=True)
            self._modules_dir = None

    @magic_arguments.magic_arguments()
    @magic_arguments.argument("name", nargs="?", help="the module's name; the cell's Module is bound to it")
    @magic_arguments.argument("-I", dest="include_dirs", action="append", default=[], metavar="DIR",
                              help="add an include directory (repeatable)")
    @magic_arguments.argument("-D", dest="defines", action="append", default=[], metavar="NAME[=VALUE]",
                              help="define a macro (repeatable)")
    @magic_arguments.argument("-L", dest="library_dirs", action="append", default=[], metavar="DIR",
                              help="add a library directory (repeatable)")
    @magic_arguments.argument("-l", dest="libraries", action="append", default=[], metavar="LIB",
                              help="link a library (repeatable), e.g. -l m")
    @magic_arguments.argument("--cflags", default="", help="more compiler flags, e.g. --cflags='-O0 -Wall'")
    @magic_arguments.argument("--ldflags", default="", help="more linker flags")
    @magic_arguments.argument("--cdef", default=None,
                              help="the declarations to use instead of those derived from the cell")
    @magic_arguments.argument("-f", "--force", action="store_true", help="compile even if this cell is cached")
    @line_cell_magic
    def nativereload(self, line: str, cell: str | None = None) -> Any:
        """Compile a C cell into a module and load it, or reload it if it is loaded: ``%%nativereload NAME``.

        The cell's non-static functions are declared to cffi for you; the
        module is bound to NAME in the notebook. Functions taken earlier
        (``add = NAME.add``) call the new code after a re-run, even from
        threads calling them while it runs. A compile error or a refused
        reload leaves the previous version serving.

        ``%nativereload`` on a line of its own shows the notebook's modules.
        """
        if cell is None:
            print(self.status_text())
            return None
        args = magic_arguments.parse_argstring(self.nativereload, line)
        if not args.name:
            raise CellError("%%nativereload needs a module name: %%nativereload NAME", module="",
                            hint="e.g. %%nativereload counter")
        if not args.name.isidentifier():
            raise CellError(f"{args.name!r} cannot name a module in the notebook (it must be a Python "
                            "identifier)", module=args.name, hint="e.g. %%nativereload counter")
        module = self.compile_and_load(args.name, cell, include_dirs=args.include_dirs, defines=args.defines,
                                       libraries=args.libraries, library_dirs=args.library_dirs,
                                       cflags=shlex.split(_unquote(args.cflags)),
                                       ldflags=shlex.split(_unquote(args.ldflags)),
                                       cdef=None if args.cdef is None else _unquote(args.cdef), force=args.force)
        self.shell.user_ns[args.name] = module
        return None

    def compile_and_load(self, name: str, source: str, *, include_dirs: list[str] = (),
                         defines: list[str] = (), libraries: list[str] = (), library_dirs: list[str] = (),
                         cflags: list[str] = (), ldflags: list[str] = (), cdef: str | None = None,
                         force: bool = False) -> Module:
        """What a ``%%nativereload NAME`` cell does, without IPython's parsing: returns the Module.

        Raises:
            CellError: the cell did not compile, declares no function, or the
                (re)load was refused; the previous version keeps serving.
        """
        options = [*include_dirs, "|", *defines, "|", *libraries, "|", *library_dirs, "|", *cflags, "|",
                   *ldflags, "|", cdef or ""]
        digest = hashlib.sha256("\0".join([__version__, name, source, *options]).encode()).hexdigest()[:16]
        build_dir = _cache_root() / f"{name}-{digest}"
        source_file = build_dir / f"{name}.c"
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            if not source_file.is_file() or source_file.read_text(encoding="utf-8") != source:
                atomicfile.write_bytes(source_file, source.encode("utf-8"))
        except OSError as exc:
            raise CellError(f"cannot write the cell's source to {build_dir}: {exc.strerror or exc}",
                            module=name, cause=exc, hint="set IPYTHONDIR to a writable directory") from None
        messages = io.StringIO()
        try:
            # Relative to the build directory: the compiler's messages then say "counter.c:LINE", the cell's line.
            built = compile_sources([source_file.name], ".", name=name, include_dirs=map(os.path.abspath,
                                    include_dirs), defines=defines, libraries=libraries,
                                    library_dirs=map(os.path.abspath, library_dirs), cflags=cflags,
                                    ldflags=ldflags, output=messages, force=force, cwd=build_dir)
        except BuildError as exc:
            sys.stderr.write(messages.getvalue())
            raise CellError(f"module '{name}': the cell did not compile ({exc}){self._still_serving(name)}",
                            module=name, cause=exc, hint="fix the cell and run it again") from None
        if messages.getvalue():        # warnings: shown as the compiler wrote them
            sys.stderr.write(messages.getvalue())
        if cdef is None:
            try:
                from .cdefgen import cdef_from_source

                cdef = cdef_from_source(source_file, include_dirs=[os.path.abspath(d) for d in include_dirs],
                                        defines=defines)
            except InterfaceError as exc:
                raise CellError(f"module '{name}': cannot derive the cell's declarations: {exc}"
                                f"{self._still_serving(name)}", module=name, cause=exc,
                                hint="pass them yourself: %%nativereload NAME --cdef '...'") from None
        if _function_names(cdef) == []:
            raise CellError(f"module '{name}': the cell defines no function to call (static functions are not "
                            f"exported){self._still_serving(name)}", module=name,
                            hint="define at least one non-static function in the cell")
        return self._load(name, built.modules[0].path, cdef, build_dir)

    def _load(self, name: str, built: Path, cdef: str, build_dir: Path) -> Module:
        registry = self.registry
        assert self._modules_dir is not None
        installed = self._modules_dir / f"{name}.so"
        previous = self._cells.get(name)
        loaded = any(m.name == name and any(i.state == "active" for i in m.images) for m in registry.status())
        # A loaded library is never overwritten in place: a new file is renamed over the name.
        atomicfile.write_bytes(installed, built.read_bytes())
        started = time.perf_counter()
        try:
            if loaded:
                generation = next(m.generation for m in registry.status() if m.name == name)
                # The cell is both the code and its declarations, and its author the only caller: a
                # re-run that changes a signature is meant, so it is accepted (and said), not refused.
                module = registry.reload(name, cdef=cdef, allow_interface_change=True)
                print(f"reloaded '{name}' generation {generation} -> {module.generation} in "
                      f"{(time.perf_counter() - started) * 1e3:.1f} ms: {_function_list(module)}")
                change = module.interface_change
                if change is not None and not change.compatible:
                    print(f"interface changed: {change.summary()} (objects made before from changed types "
                          "must be made again)")
            else:
                module = registry.load(name, cdef=cdef, file=installed)
                print(f"loaded '{name}' generation {module.generation}: {_function_list(module)}")
        except NativeReloadError as exc:
            # Put back the file of the version still serving, so a later reload does not pick this one up.
            if previous is not None and (previous / f"{name}.so").is_file():
                atomicfile.write_bytes(installed, (previous / f"{name}.so").read_bytes())
            raise CellError(f"module '{name}': {type(exc).__name__}: {exc}{self._still_serving(name)}",
                            module=name, cause=exc, hint="fix the cell and run it again") from None
        self._cells[name] = build_dir
        return module

    def _still_serving(self, name: str) -> str:
        if self._registry is None:
            return ""
        for m in self._registry.status():
            if m.name == name and any(i.state == "active" for i in m.images):
                return f"; generation {m.generation} keeps serving"
        return ""

    def status_text(self) -> str:
        """The notebook's modules: generation, images and calls in flight, functions, where the build lives."""
        if self._registry is None or not self._registry.status():
            return "no nativereload modules in this notebook yet (run a %%nativereload NAME cell)"
        lines = []
        for m in self._registry.status():
            images = ", ".join(f"g{i.generation} {i.state}" + (f" ({i.in_flight} in flight)" if i.in_flight else "")
                               for i in m.images)
            active = any(i.state == "active" for i in m.images)
            module = self.shell.user_ns.get(m.name)
            functions = _function_list(module) if active and isinstance(module, Module) else "-"
            lines.append(f"{m.name}: generation {m.generation}; images: {images or 'none'}; functions: "
                         f"{functions}; build: {self._cells.get(m.name, '-')}")
        return "\n".join(lines)


def _unquote(text: str) -> str:
    # IPython splits a magic's line without removing quotes: --cdef 'long f(void);' arrives quoted.
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _function_names(cdef: str) -> list[str] | None:
    """The functions a cdef declares, in order (None if it does not parse: the registry will say why)."""
    import cffi

    ffi = cffi.FFI()
    try:
        ffi.cdef(cdef)
    except Exception:      # cffi raises CDefError, pycparser's ParseError, FFIError...
        return None
    # cffi has no public list of declarations; its parser's has been stable since cffi 1.0 (image.py reads it too).
    return [key.split(" ", 1)[1] for key in ffi._parser._declarations if key.startswith("function ")]


def _function_list(module: Module) -> str:
    return ", ".join(_function_names(module.cdef) or []) or "no functions"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nativereload``: register the magics (once per shell)."""
    magics = NativeReloadMagics(ipython)
    ipython.register_magics(magics)
    ipython._nativereload_magics = magics


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nativereload``: close the notebook's registry and remove its module files."""
    magics = getattr(ipython, "_nativereload_magics", None)
    if magics is not None:
        magics.close()
        del ipython._nativereload_magics
