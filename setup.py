"""Build the optional C extensions from ``native/``: ``prefixlb.index._native`` (the request
path's hot loop: XXH64 block-hash chain, prefix index, scoring) and
``prefixlb.routing.classifier._tiernet`` (the tier classifier's forward pass).
If they cannot be built (no compiler, no Python headers), the package still installs and runs
on the pure-Python (and numpy) references; ``prefixlb.index.NATIVE`` then reads False.

Build switches (environment variables, read at build time):
  PREFIXLB_NO_EXTENSION=1   skip the extensions entirely (tests the fallback install)
  PREFIXLB_DEBUG=1          -O0 -g3, assertions on
  PREFIXLB_SANITIZE=1       AddressSanitizer + UndefinedBehaviorSanitizer (run Python with
                            LD_PRELOAD=$(gcc -print-file-name=libasan.so))
  PREFIXLB_COVERAGE=1       gcov instrumentation
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


class OptionalBuildExt(build_ext):
    """build_ext that reports a failure instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "fall back"
            self._report(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._report(exc)

    @staticmethod
    def _report(exc: BaseException) -> None:
        sys.stderr.write(
            "\n*** prefixlb: the C extension could not be built "
            f"({type(exc).__name__}: {exc}).\n"
            "*** prefixlb will run on its pure-Python reference (slower).\n\n"
        )


extra_compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_link_args: list[str] = []
undef_macros: list[str] = []
if _flag("PREFIXLB_DEBUG"):
    extra_compile_args += ["-O0", "-g3"]
    undef_macros.append("NDEBUG")
else:
    extra_compile_args += ["-O3"]
if _flag("PREFIXLB_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    extra_compile_args += san + ["-O1", "-g"]
    extra_link_args += san
    undef_macros.append("NDEBUG")
if _flag("PREFIXLB_COVERAGE"):
    extra_compile_args += ["--coverage", "-O0"]
    extra_link_args += ["--coverage"]

ext_modules = []
if not _flag("PREFIXLB_NO_EXTENSION"):
    ext_modules.append(
        Extension(
            "prefixlb.index._native",
            sources=["native/index.c"],
            depends=["native/xxh64.h"],
            include_dirs=["native"],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            undef_macros=undef_macros,
            libraries=["m"],
        )
    )
    ext_modules.append(
        Extension(
            "prefixlb.routing.classifier._tiernet",
            sources=["native/tiernet.c"],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            undef_macros=undef_macros,
            libraries=["m"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
