"""Build of the Cython extensions ``fastkl.backends.cython._mc`` (Monte Carlo terms) and
``_logits`` (full-vocabulary ops); metadata: pyproject.toml.

What the build probes, by test-compiling (and linking) a tiny program with the compiler that
will build the extension:

* OpenMP (``-fopenmp``; ``-Xpreprocessor -fopenmp -lomp`` for Apple clang; ``/openmp`` for
  MSVC). Without it ``prange`` compiles to a plain loop and the backend runs on one thread.
* Function multiversioning (GCC/Clang ``target_clones`` with ifunc support, i.e. x86-64 ELF):
  the block kernel is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the
  baseline, and the loader picks one per CPU. Never ``-march=native``: a wheel must run on
  every CPU of its platform tag.
* ``-O3 -fno-math-errno -fno-trapping-math -ffp-contract=fast`` where accepted. No
  ``-ffast-math``: it would break NaN tests and reassociate the (deterministic) sums.

Environment knobs: ``FASTKL_NO_OPENMP=1``, ``FASTKL_NO_CLONES=1``, ``FASTKL_VEC_REPORT=1``
(GCC vectorizer report on stderr), ``FASTKL_REQUIRE_BACKENDS`` (comma-separated backend names; when
it names ``cython``, a failed build of the extension is an error).

The extension is optional: where no working C compiler exists, the build prints one warning line
and installs the pure-Python package (the numba and numpy backends); ``fastkl backends`` then
says why ``cython`` is unavailable.

Development build: ``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join("fastkl", "backends", "cython")

OPENMP_TEST = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d %d\n", n, omp_get_max_threads());
    return 0;
}
"""

CLONES_TEST = r"""
#include <stdio.h>
__attribute__((target_clones(%s)))
static double dot(const double *a, const double *b, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
int main(void) {
    double a[4] = {1, 2, 3, 4};
    __builtin_cpu_init();
    printf("%%g %%d\n", dot(a, a, 4), __builtin_cpu_supports(%s));
    return 0;
}
"""

# FASTKL_CLONES value -> (clone list, the feature checked first by fk_isa)
CLONE_SETS = {
    2: ('"arch=x86-64-v4", "arch=x86-64-v3", "default"', '"x86-64-v4"'),
    1: ('"avx512f", "avx2", "default"', '"avx512f"'),
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _cython_required() -> bool:
    names = os.environ.get("FASTKL_REQUIRE_BACKENDS", "")
    return "cython" in {n.strip().lower() for n in names.split(",")}


class BuildExt(build_ext):
    """build_ext that probes the compiler for OpenMP, multiversioning and flags, and skips the
    (optional) extension with a one-line warning where it cannot be compiled."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, a failing compiler or linker, missing headers
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    _skipped = False

    def _skip(self, exc: BaseException) -> None:
        if _cython_required():
            raise exc
        if self._skipped:  # one line for the whole build (later failures follow the first)
            return
        self._skipped = True
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(
            f"WARNING: fastkl: the Cython extension was not built ({type(exc).__name__}: "
            f"{msg[:200]}); installing the numba and numpy backends only",
            file=sys.stderr,
        )

    def _try(self, code: str, cflags: list[str], lflags: list[str]) -> bool:
        tmp = tempfile.mkdtemp(prefix="fastkl_probe_")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(code)
            devnull = open(os.devnull, "w")
            old_out, old_err = os.dup(1), os.dup(2)
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            try:
                objs = self.compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                self.compiler.link_executable(
                    objs, "probe", output_dir=tmp, extra_postargs=lflags
                )
            finally:
                os.dup2(old_out, 1)
                os.dup2(old_err, 2)
                os.close(old_out)
                os.close(old_err)
                devnull.close()
            return True
        except Exception:
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _openmp_flags(self) -> tuple[list[str], list[str]]:
        if _env_flag("FASTKL_NO_OPENMP"):
            return [], []
        if self.compiler.compiler_type == "msvc":
            candidates = [(["/openmp"], [])]
        else:
            candidates = [
                (["-fopenmp"], ["-fopenmp"]),
                (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),  # Apple clang + libomp
            ]
        for cflags, lflags in candidates:
            if self._try(OPENMP_TEST, cflags, lflags):
                return cflags, lflags
        return [], []

    def _clones(self, base: list[str]) -> int:
        if _env_flag("FASTKL_NO_CLONES") or self.compiler.compiler_type == "msvc":
            return 0
        for level, (targets, probe) in CLONE_SETS.items():
            if self._try(CLONES_TEST % (targets, probe), base, []):
                return level
        return 0

    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        if msvc:
            cflags = ["/O2", "/fp:precise"]
        else:
            cflags = [
                f
                for f in ("-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast")
                if self._try("int main(void) { return 0; }\n", [f], [])
            ]
            if _env_flag("FASTKL_VEC_REPORT"):
                cflags.append("-fopt-info-vec-optimized")
        omp_c, omp_l = self._openmp_flags()
        clones = self._clones(cflags)
        print(
            f"fastkl: compiler={self.compiler.compiler_type} flags={cflags} "
            f"openmp={bool(omp_c)} clones={clones}"
        )
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + cflags + omp_c
            ext.extra_link_args = list(ext.extra_link_args or []) + omp_l
            ext.define_macros = list(ext.define_macros or []) + [
                ("FASTKL_CLONES", str(clones)),
            ]
        super().build_extensions()


def extensions():
    import numpy as np
    from Cython.Build import cythonize

    exts = [
        Extension(
            f"fastkl.backends.cython.{name}",
            sources=[os.path.join(PKG, f"{name}.pyx")],
            include_dirs=[np.get_include(), PKG],
            depends=[os.path.join(PKG, h) for h in headers],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
        for name, headers in (
            ("_mc", ["common.h", "typed.h", "mc.h", "mc32.h", "runtime.pxi"]),
            ("_logits", ["common.h", "typed.h", "logits.h", "runtime.pxi"]),
        )
    ]
    return cythonize(
        exts,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "language_level": 3,
        },
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
