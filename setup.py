"""Builds fastml: the Python package, fastml.kernels (Triton; fastml/kernels is a link to kernels/, so the tree
also works in place) and the extension fastml._C.

fastml._C always holds the C++ CPU ops. The CUDA ops are added only where torch was built with CUDA and nvcc is
found (torch.utils.cpp_extension.CUDA_HOME); `FASTML_NO_CUDA=1` turns them off. Build with
`pip install --no-build-isolation .` in an environment that already has torch >= 2.4: setup.py never installs torch.
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - a build without torch is a usage error
    raise SystemExit(
        "fastml builds against an installed torch (>= 2.4): install torch first, then "
        "`pip install --no-build-isolation .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _build_cuda():
    if os.environ.get("FASTML_NO_CUDA", "") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    sources = ["csrc/fastml.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-march=native"]
    cxx += os.environ.get("FASTML_CXXFLAGS", "").split()
    kwargs = dict(
        name="fastml._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if _build_cuda():
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_binding.cpp")
        archs = os.environ.get("FASTML_CUDA_ARCHS", "80;90").split(";")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        return cpp_extension.CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx + ["-DFASTML_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="fastml",
    version="0.1.0",
    description="Fused kernels for PyTorch: causal linear attention, integrated gradients",
    python_requires=">=3.10",
    packages=["fastml", "fastml.ops", "fastml.ops.linear_attention", "fastml.ops.integrated_gradients",
              "fastml.nn", "fastml.kernels"],
    package_data={"fastml.ops.linear_attention": ["README.md"], "fastml.ops.integrated_gradients": ["README.md"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"], "captum": ["captum"]},
    zip_safe=False,
)
