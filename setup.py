"""Builds fastml: the Python package, fastml.kernels (the Triton kernels of the top-level kernels/ folder; in a
source tree without an install fastml mounts that folder itself) and the extension fastml._C.

fastml._C always holds the C++ CPU ops. The CUDA ops are added only where torch was built with CUDA and nvcc is
found (torch.utils.cpp_extension.CUDA_HOME); `FASTML_NO_CUDA=1` turns them off. Build with
`pip install --no-build-isolation .` in an environment that already has torch >= 2.4: setup.py never installs torch.
"""
import glob
import os

from setuptools import find_packages, setup

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


# Target ISA of the CPU kernels: FASTML_CPU_ARCH.
#   native (default): -march=native, the build machine's full instruction set (AVX-512 where it has it). Right
#     for a build from source that runs where it was built, wrong for a wheel: an AVX-512 build dies with SIGILL
#     (illegal instruction) on a CPU without AVX-512.
#   portable: a baseline the architecture's machines run: x86-64-v2 (up to SSE4.2 and POPCNT, which x86-64 CPUs
#     have had since about 2009; plain x86-64 where the compiler predates the name), armv8-a on aarch64, the
#     compiler's default elsewhere. Use it for wheels and shared images.
#   any other value is passed on as -march=<value> (e.g. x86-64-v3 for AVX2 machines).
# The kernels' vector width follows the target (csrc/common.h reads the compiler's __AVX512F__, __AVX__,
# __ARM_NEON macros), so no flag here has to agree with a setting elsewhere.
PORTABLE_MARCH = {"x86_64": ["x86-64-v2", "x86-64"], "amd64": ["x86-64-v2", "x86-64"],
                  "aarch64": ["armv8-a"], "arm64": ["armv8-a"]}


def _compiler_accepts(flag):
    """Whether the C++ compiler setuptools will use takes `flag` (preprocessing an empty file)."""
    import shlex
    import subprocess
    import sysconfig

    cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    try:
        return subprocess.run(cxx + [flag, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


def _march_flags():
    arch = os.environ.get("FASTML_CPU_ARCH", "native").strip() or "native"
    if arch != "portable":
        return [f"-march={arch}"]
    import platform

    for candidate in PORTABLE_MARCH.get(platform.machine().lower(), []):
        if _compiler_accepts(f"-march={candidate}"):
            return [f"-march={candidate}"]
    return []  # the compiler's default target, a baseline by definition


def _extension():
    sources = ["csrc/fastml.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"] + _march_flags()
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
    # name, version, dependencies and extras are in pyproject.toml; this call adds what needs code: the packages
    # and the extension.
    # Every package under fastml/ is found; the Triton kernels live in the top-level kernels/ folder and are
    # installed as fastml.kernels. Each package's README.md (an op's maths and measurements) ships with it.
    packages=find_packages(include=["fastml", "fastml.*"]) + ["fastml.kernels"],
    package_dir={"fastml.kernels": "kernels"},
    package_data={"": ["README.md"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
