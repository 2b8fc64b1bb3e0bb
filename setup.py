"""Packaging for nativereload.

The C call gate (csrc/_gate.c -> nativereload._gate) is optional: if it does
not compile, the package installs without it and the pure-Python gate serves.
"""

import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class OptionalBuildExt(build_ext):
    """Build the C gate if we can; install without it if we cannot."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers
            sys.stderr.write(f"warning: nativereload C gate not built ({exc}); the pure-Python gate will serve\n")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            sys.stderr.write(f"warning: nativereload C gate not built ({exc}); the pure-Python gate will serve\n")


ext_modules = []
if os.path.exists(os.path.join(HERE, "csrc", "_gate.c")) and os.environ.get("NATIVERELOAD_PURE_PYTHON", "") in ("", "0"):
    from setuptools import Extension

    ext_modules.append(Extension(
        "nativereload._gate",
        sources=["csrc/_gate.c"],
        extra_compile_args=["-std=c11", "-O2"],
        optional=True,
    ))

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="nativereload",
    version="0.1.0",
    description="Load C shared libraries through cffi and hot-reload them in a running process with zero downtime",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nativereload", "nativereload.*"]),
    package_data={"nativereload": ["cmake/*.cmake", "include/*.h", "py.typed", "*.pyi", "data/*"]},
    install_requires=["cffi>=1.17"],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2", "watchfiles>=0.21", "ipython>=8", "distributed>=2024.8"],
        "watch": ["watchfiles>=0.21"],
        "ipython": ["ipython>=8"],
        # nativereload.dask: reload modules in every worker of a Dask cluster.
        "dask": ["distributed>=2024.8"],
    },
    entry_points={
        "console_scripts": ["nativereload = nativereload.cli:main"],
        # The pytest plugin: nativereload_registry, nativereload_build (nativereload/testing.py).
        "pytest11": ["nativereload = nativereload.testing"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
