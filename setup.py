"""Builds pykernels and its extension pykernels._C with torch.utils.cpp_extension.

The extension always has the fused C++ CPU kernels (csrc/, csrc/cpu/). It also gets the
CUDA kernels (kernels/*.cu) when the installed torch is a CUDA build and nvcc is found,
or when FORCE_CUDA=1 (e.g. a build machine with a CUDA torch but no visible GPU); then
TORCH_CUDA_ARCH_LIST picks the architectures, default "8.0;9.0". Install with
``pip install --no-build-isolation -e .`` so the torch already installed is the one
built against.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def build_with_cuda():
    forced = os.environ.get("FORCE_CUDA", "0") == "1"
    if forced and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch; this torch is CPU-only")
    return forced or (torch.version.cuda is not None and CUDA_HOME is not None)


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that only runs in parallel when the
    # including file is compiled with OpenMP (_OPENMP); without it every csrc/cpu/ loop is
    # serial. Not linked explicitly: the GOMP symbols resolve to torch's own libgomp, already
    # loaded as libtorch_cpu's dependency, so there is one OpenMP runtime and thread pool.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(HERE, "kernels"), os.path.join(HERE, "csrc")]
    if not build_with_cuda():
        return CppExtension("pykernels._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "pykernels._C",
        sources + sorted(glob.glob("kernels/*.cu")),
        include_dirs=include_dirs,
        define_macros=[("PYKERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


setup(
    packages=find_packages(include=["pykernels", "pykernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
