"""The one compiled piece: lz.attention's cached hit (src/layerzero/_accel.c, _accel_meta.cpp).

It is built against the torch installed beside layerzero (install torch first, as the README's commands do),
found on disk rather than imported: pip builds in an isolated environment where torch cannot be imported. The
extension is optional: without torch's headers or a C++ compiler layerzero installs without it and runs the
same call path in Python (``layerzero doctor`` says which path runs, and why).
"""

from __future__ import annotations

import os
import re
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _torch_dir() -> str | None:
    """The installed torch package's directory, if it ships its C++ headers."""
    for key in ("purelib", "platlib"):
        path = os.path.join(sysconfig.get_paths()[key], "torch")
        if os.path.isfile(os.path.join(path, "include", "torch", "csrc", "autograd", "python_variable.h")):
            return path
    return None


def _extensions() -> list[Extension]:
    if sysconfig.get_config_var("Py_GIL_DISABLED"):  # it relies on the GIL (free-threaded builds have none)
        print("layerzero: a free-threaded Python; installing without the compiled hot path")
        return []
    if os.name == "nt":  # built and tested with gcc/clang only
        print("layerzero: Windows; installing without the compiled hot path")
        return []
    torch_dir = _torch_dir()
    if torch_dir is None:
        print("layerzero: torch's headers were not found; installing without the compiled hot path")
        return []
    with open(os.path.join(torch_dir, "version.py"), encoding="utf-8") as f:
        version = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read(), re.M)
    include = os.path.join(torch_dir, "include")
    lib = os.path.join(torch_dir, "lib")
    return [Extension(
        "layerzero._accel", ["src/layerzero/_accel.c", "src/layerzero/_accel_serve.c", "src/layerzero/_accel_dispatch.c",
         "src/layerzero/_accel_lookup.c", "src/layerzero/_accel_stamps.c",
         "src/layerzero/_accel_meta.cpp"],
        include_dirs=[include, os.path.join(include, "torch", "csrc", "api", "include")],
        library_dirs=[lib], libraries=["c10"], runtime_library_dirs=[lib],
        define_macros=[("LZ_TORCH_VERSION", f'"{version.group(1) if version else "unknown"}"')],
        depends=[f"src/layerzero/{h}" for h in ("_accel.h", "_accel_dispatch.h", "_accel_meta.h")],
        extra_compile_args=["-O2"], language="c++", optional=True)]


class BuildExt(build_ext):
    """C++17 for the C++ file only (torch's headers need it; the C file is C), without torch's header warnings."""

    def build_extensions(self) -> None:
        compile_one = self.compiler._compile

        def compile_(obj, src, ext, cc_args, extra_postargs, pp_opts):  # type: ignore[no-untyped-def]
            if src.endswith(".cpp"):
                extra_postargs = [*extra_postargs, "-std=c++17", "-w"]
            compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = compile_
        super().build_extensions()


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
