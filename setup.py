"""Builds sparseops._C: C++ CPU kernels always, CUDA kernels when the toolchain can.

CUDA is built when torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME), never
because a GPU happens to be visible: a build machine may have nvcc and no GPU. Sources
named *_sm90a.cu (Hopper-only instructions) go into a separate module, sparseops._C_sm90a,
so the rest still loads on other GPUs. If no compiler works at all, the package installs
without _C and every op falls back to its pure-PyTorch reference, with a one-time warning.

Environment: SPARSEOPS_NO_CUDA=1 skips CUDA; TORCH_CUDA_ARCH_LIST (default "8.0;9.0") sets
the portable arches; MAX_JOBS bounds ninja's parallelism; SPARSEOPS_BUILD_TEMP moves the
object-file folder (default build/temp-<platform>-py<X.Y>-torch<version>-<cpu|cuda>).

Object files persist between builds: ``pip install -e .`` (PEP 660) hands build_ext a fresh
temporary build folder each time, so every reinstall recompiled every source (minutes on a
2-core machine). build_ext here always uses the stable folder above instead; ninja then
recompiles only the sources (or headers) that changed, and an unchanged tree only relinks.
The folder name carries the Python, torch and CUDA/CPU flavour, so objects built against
another torch are never reused.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [
    "sparseops",
    "sparseops.ops",
    "sparseops.reference",
    "sparseops.nn",
    "sparseops.integrations",
    "sparseops.kernels",
]
PACKAGE_DIR = {
    "sparseops": "python/sparseops",
    "sparseops.ops": "python/sparseops/ops",
    "sparseops.reference": "python/sparseops/reference",
    "sparseops.nn": "python/sparseops/nn",
    "sparseops.integrations": "python/sparseops/integrations",
    "sparseops.kernels": "kernels",
}


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("sparseops: torch is not importable at build time; installing without _C", stacklevel=1)
        return [], {}

    cpp = _rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    cu_all = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cu_sm90a = [s for s in cu_all if s.endswith("_sm90a.cu")]
    cu = [s for s in cu_all if s not in cu_sm90a]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-std=c++20", "-fopenmp"] if sys.platform != "darwin" else ["-O3", "-std=c++20"]
    with_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("SPARSEOPS_NO_CUDA") != "1"
    )
    if not with_cuda:
        ext = CppExtension("sparseops._C", cpp, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})
        return [ext], {"build_ext": _optional(BuildExtension, _build_temp(torch.__version__, "cpu"))}

    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(" ", ";")
    gencode = []
    for arch in filter(None, arches.split(";")):
        num = arch.replace(".", "").replace("+PTX", "")
        gencode.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", *gencode]
    macros = [("SPARSEOPS_WITH_CUDA", None)]
    exts = [
        CUDAExtension(
            "sparseops._C",
            cpp + cu,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    ]
    if cu_sm90a:
        exts.append(
            CUDAExtension(
                "sparseops._C_sm90a",
                cu_sm90a,
                include_dirs=include_dirs,
                define_macros=macros,
                extra_compile_args={
                    "cxx": cxx,
                    "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                             "-gencode=arch=compute_90a,code=sm_90a"],
                },
            )
        )
    return exts, {"build_ext": _optional(BuildExtension, _build_temp(torch.__version__, "cuda"))}


def _build_temp(torch_version: str, flavour: str) -> str:
    """The persistent object-file folder (see the module docstring)."""
    if os.environ.get("SPARSEOPS_BUILD_TEMP"):
        return os.path.abspath(os.environ["SPARSEOPS_BUILD_TEMP"])
    tag = f"{sysconfig.get_platform()}-py{sys.version_info[0]}.{sys.version_info[1]}-torch{torch_version}-{flavour}"
    return os.path.join(ROOT, "build", "temp-" + tag.replace("+", "_"))


def _optional(build_ext_cls, build_temp: str):
    """A build_ext whose failure leaves a working pure-PyTorch package instead of no package."""

    class OptionalBuildExt(build_ext_cls.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = build_temp  # stable across pip's temporary editable builds

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no _C"
                if os.environ.get("SPARSEOPS_REQUIRE_EXT") == "1":
                    raise
                warnings.warn(f"sparseops: building the C++/CUDA kernels failed ({exc}); "
                              "the ops will use the pure-PyTorch references", stacklevel=1)

    return OptionalBuildExt


ext_modules, cmdclass = _extensions()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
