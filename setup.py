"""Build the C extension ``sparsekit.runtime._kernels`` (everything else lives in pyproject.toml).

Plain setuptools, no build dependency beyond a C compiler: the kernels pick AVX-512/AVX2 code paths at
run time, so no ``-march`` flag is used and the build works on any CPU. OpenMP is used when the
compiler accepts ``-fopenmp`` (probed here); without it the kernels run on one thread.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _probe(compiler, flags: list[str], link: list[str]) -> bool:
    """True when ``compiler`` compiles and links a tiny OpenMP program with these flags."""
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as fh:
            fh.write(src)
        try:
            objs = compiler.compile([path], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=link)
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self) -> None:
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            compile_args, omp_c, omp_l = ["/O2"], ["/openmp"], []
        else:
            # hidden: the runtime's sources call each other directly, not through the .so's symbol table
            compile_args = ["-O3", "-std=c99", "-fno-strict-aliasing", "-fvisibility=hidden"]
            omp_c, omp_l = ["-fopenmp"], ["-fopenmp"]
        use_omp = os.environ.get("SPARSEKIT_NO_OPENMP") != "1" and _probe(self.compiler, omp_c, omp_l)
        if not use_omp:
            print("sparsekit: building the kernels without OpenMP (one thread)", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = compile_args + (omp_c if use_omp else [])
            ext.extra_link_args = omp_l if use_omp else []
        super().build_extensions()


setup(
    ext_modules=[
        # the runtime: csrc/runtime/sk_runtime.h lists what each source holds
        Extension("sparsekit.runtime._kernels", sources=sorted(glob.glob("csrc/runtime/*.c"))),
        Extension("sparsekit._select", sources=["csrc/sparsekit_select.c"]),  # mask-update selection
    ],
    cmdclass={"build_ext": BuildExt},
)
