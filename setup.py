"""Builds xmorpher_kernels and its native extension `xmorpher_kernels._C` from csrc/.

C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are added
when torch is a CUDA build and nvcc is found; no GPU is needed to compile them. Set
XMORPHER_KERNELS_NO_CUDA=1 to skip them, and TORCH_CUDA_ARCH_LIST to choose the architectures
(default: 8.0 and 9.0).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

# torch derives CUDA_HOME from the nvcc on PATH; when that is a wrapper script (e.g.
# /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) it guesses /usr/local, which has no
# libcudart, and the link fails. Point it at the toolkit itself when the user has not.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _one_compiler() -> str:
    """The C++ compiler of every object, the CUDA host code's included, and of the link: $CXX if
    set, else the one Python is configured with (setuptools links with it; torch alone would
    compile .cpp files with `c++` and .cu host code with the `gcc` first on PATH, which on some
    images are another gcc than the linker's, whose runtime the process then loads)."""
    name = os.environ.get("CXX") or (sysconfig.get_config_var("CXX") or "c++").split()[0]
    return shutil.which(name) or name


COMPILER = _one_compiler()
os.environ["CXX"] = COMPILER  # torch's BuildExtension compiles .cpp files with $CXX


class BuildWithOneCompiler(BuildExtension):
    """Links with COMPILER as well (setuptools takes its C++ linker from compiler_cxx/linker_so)."""

    def build_extensions(self):
        for attribute in ("compiler_cxx", "linker_so", "linker_so_cxx"):
            command = getattr(self.compiler, attribute, None)
            if command:
                self.compiler.set_executable(attribute, [COMPILER, *command[1:]])
        super().build_extensions()


def _relative(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_available_for_build() -> tuple[bool, str]:
    if os.environ.get("XMORPHER_KERNELS_NO_CUDA", "0") == "1":
        return False, "XMORPHER_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


def extensions():
    cxx_sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = _relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cpu")]
    # -Wno-psabi: the kernels pass vectors only between always-inlined functions.
    cxx_flags = ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-Wno-psabi"]
    # at::parallel_for is inlined into our code: without -fopenmp its `omp parallel` is ignored and
    # the kernels run on one thread. The libgomp it links is the one torch has already loaded.
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda, reason = _cuda_available_for_build()
    if cuda_sources and with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return [
            CUDAExtension(
                "xmorpher_kernels._C",
                cxx_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("XK_WITH_CUDA", "1")],
                extra_link_args=link_flags,
                extra_compile_args={
                    "cxx": cxx_flags,
                    # nvcc's host compiler; torch adds -ccbin $CC itself when CC is set (one -ccbin only)
                    "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                             *([] if os.environ.get("CC") else ["-ccbin", COMPILER])],
                },
            )
        ]
    if cuda_sources:
        print(f"xmorpher_kernels: building without CUDA kernels: {reason}")
    return [
        CppExtension(
            "xmorpher_kernels._C",
            cxx_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


setup(
    packages=find_packages(include=["xmorpher_kernels", "xmorpher_kernels.*", "xmorpher", "xmorpher.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithOneCompiler.with_options(use_ninja=True)},
)
