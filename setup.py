"""Build of rlhf_engine's native code.

* ``rlhf_engine._C``: the C++ CPU kernels (csrc/cpu/), their torch operator
  registrations (csrc/torch_ops.cpp) and the pybind11 module (csrc/pybind.cpp).
  Always built, against whatever torch is installed (a CPU build is enough).
  The vector instruction set is the build host's (AVX512, AVX2 or none), as
  torch reports it; ``RLHF_ENGINE_CPU_CAPABILITY=DEFAULT|AVX2|AVX512``
  overrides it.
* ``rlhf_engine._cpu_kernels``: the plain C++ CPU kernels (csrc/cpu/*.cpp
  except the ATen-based ones listed in ``ATEN_CPU_SOURCES``), compiled without
  torch headers into a shared library that rlhf_engine loads with ctypes and
  that C/C++ programs can link (csrc/include/rlhf_engine/*.h). Same vector
  ISA flags as ``_C``.
* ``rlhf_engine._cuda_kernels``: the CUDA kernels (csrc/cuda/*.cu), compiled
  by nvcc as plain CUDA C++ without torch headers and linked with a static
  CUDA runtime into a shared library that rlhf_engine loads with ctypes.
  Built whenever nvcc is found (``$CUDA_HOME/bin/nvcc``, /usr/local/cuda, or
  PATH); ``RLHF_ENGINE_CUDA=1`` makes a missing or failing nvcc an error,
  ``RLHF_ENGINE_CUDA=0`` skips it. ``RLHF_ENGINE_CUDA_ARCHS`` (default
  ``80;90``) lists the SM architectures (PTX of the last one is embedded too).

``kernels/`` (Triton) is installed as ``rlhf_engine.kernels``.
"""
import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")

CPU_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def cpu_capability():
    """The vector ISA to compile the CPU kernels for."""
    forced = os.environ.get("RLHF_ENGINE_CPU_CAPABILITY")
    if forced:
        return forced.upper()
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in CPU_FLAGS else "DEFAULT"


# CPU kernels written with ATen's vector types and at::parallel_for: they go
# into the torch extension, compiled with -fopenmp (at::parallel_for is inline
# OpenMP code in torch's headers: without the flag it runs on one thread). The
# extension then needs libgomp.so.1, which torch has already loaded.
# Every other csrc/cpu/*.cpp is plain C++.
ATEN_CPU_SOURCES = ["csrc/cpu/decode_linear.cpp", "csrc/cpu/logprobs.cpp"]


def plain_cpu_sources():
    return sorted(set(glob.glob("csrc/cpu/*.cpp")) - set(ATEN_CPU_SOURCES))


def cpu_extension():
    cap = cpu_capability()
    defines = [f"-DRLHF_ENGINE_CPU_CAPABILITY=\"{cap}\""]
    if cap != "DEFAULT":
        defines += [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    sources = ATEN_CPU_SOURCES + ["csrc/torch_ops.cpp", "csrc/pybind.cpp"]
    return CppExtension(
        "rlhf_engine._C",
        sources,
        include_dirs=[INCLUDE],
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", *CPU_FLAGS[cap], *defines],
        extra_link_args=["-fopenmp"],
    )


def find_nvcc():
    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates + [shutil.which("nvcc") or ""]:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class NvccLibrary(Extension):
    """A shared library built from .cu files by nvcc alone (torch's build
    machinery must not see the .cu sources: a CPU torch refuses them)."""

    def __init__(self, name, cu_sources):
        super().__init__(name, sources=[])
        self.cu_sources = cu_sources


class PlainCppLibrary(Extension):
    """A shared library of plain C++ (no torch, no Python), built by $CXX."""

    def __init__(self, name, cpp_sources):
        super().__init__(name, sources=[])
        self.cpp_sources = cpp_sources


def cuda_mode():
    """'0' (skip), '1' (required) or 'auto' (when nvcc is found)."""
    return os.environ.get("RLHF_ENGINE_CUDA", "auto")


class BuildNative(BuildExtension):
    """torch's BuildExtension for the C++ module, $CXX for the plain CPU
    library and nvcc for the CUDA library; libraries with nothing to build are
    dropped up front (an editable install copies every listed output)."""

    def finalize_options(self):
        super().finalize_options()
        self.extensions = [ext for ext in self.extensions if self._wanted(ext)]

    @staticmethod
    def _wanted(ext):
        if isinstance(ext, PlainCppLibrary):
            return bool(ext.cpp_sources)
        if isinstance(ext, NvccLibrary):
            if cuda_mode() == "1" and find_nvcc() is None:
                raise RuntimeError("RLHF_ENGINE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
            wanted = bool(ext.cu_sources) and cuda_mode() != "0" and find_nvcc() is not None
            if not wanted:
                print("rlhf_engine: skipping the CUDA kernels (no sources, no nvcc, or RLHF_ENGINE_CUDA=0)")
            return wanted
        return True

    def build_extension(self, ext):
        if isinstance(ext, NvccLibrary):
            self._build_cuda_library(ext)
        elif isinstance(ext, PlainCppLibrary):
            self._build_plain_library(ext)
        else:
            super().build_extension(ext)

    def _build_plain_library(self, ext):
        cxx = os.environ.get("CXX", "c++")
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", f"-I{INCLUDE}", *CPU_FLAGS[cpu_capability()]]
        subprocess.check_call([cxx, *flags, *ext.cpp_sources, "-o", out])

    def _build_cuda_library(self, ext):
        nvcc = find_nvcc()
        archs = os.environ.get("RLHF_ENGINE_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        flags = ["-std=c++17", "-O3", f"-I{INCLUDE}", "-Xcompiler", "-fPIC", "--use_fast_math", *gencode]
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)

        def compile_one(src):
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            subprocess.check_call([nvcc, *flags, "-c", src, "-o", obj])
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_one, ext.cu_sources))
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.check_call([nvcc, "-shared", "-cudart", "static", *gencode, *objects, "-o", out])


setup(
    name="rlhf_engine",
    version="0.1.0",
    description="A custom-kernel, high-performance RLHF engine",
    packages=find_packages(include=["rlhf_engine", "rlhf_engine.*"]) + ["rlhf_engine.kernels"],
    package_dir={"rlhf_engine.kernels": "kernels"},
    ext_modules=[
        cpu_extension(),
        PlainCppLibrary("rlhf_engine._cpu_kernels", plain_cpu_sources()),
        NvccLibrary("rlhf_engine._cuda_kernels", sorted(glob.glob("csrc/cuda/*.cu"))),
    ],
    cmdclass={"build_ext": BuildNative.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "transformers>=4.50", "safetensors", "tqdm"],
    extras_require={"triton": ["triton>=3.2"], "vllm": ["vllm>=0.32"]},
    entry_points={"console_scripts": ["rlhf-engine=rlhf_engine.cli:main"]},
)
