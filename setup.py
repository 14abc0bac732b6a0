"""Builds the compiled core fastreplay._C (csrc/); project metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .     # torch must already be installed

Environment: FASTREPLAY_CUDA=0|1 forces the CUDA kernels off/on (default: on when torch is a CUDA
build and nvcc is found); CUDA_HOME defaults to /usr/local/cuda; TORCH_CUDA_ARCH_LIST defaults to
"8.0;9.0+PTX".
"""
import os
import shlex
import subprocess
import sys

from setuptools import find_packages, setup


def _shared_libstdcxx():
    """Link args that keep libstdc++ shared. A relocated GCC that ships only libstdc++.a (seen on
    the GPU image: CXX=/opt/gcc/bin/g++) would put a private static libstdc++ into _C, which mixes
    with torch's shared one and segfaults (e.g. formatting a number in a TORCH_CHECK message).
    Then link the libstdc++ that the running torch uses. Call after importing torch."""
    if not sys.platform.startswith("linux"):
        return []
    cxx = os.environ.get("CXX") or os.environ.get("CC") or "c++"
    try:
        found = subprocess.run([*shlex.split(cxx), "-print-file-name=libstdc++.so"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    if os.path.isabs(found):
        return []  # the compiler links the shared libstdc++ itself
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libstdc++.so" in line}
    return sorted(paths)[:1]


def _extension_and_cmdclass():
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ \
            and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # read by cpp_extension at import time
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

    import torch
    from torch.utils import cpp_extension as ce

    nvcc = ce.CUDA_HOME and os.path.join(ce.CUDA_HOME, "bin", "nvcc")
    can_cuda = torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)
    want = os.environ.get("FASTREPLAY_CUDA", "").strip()
    if want == "1" and not can_cuda:
        raise RuntimeError(
            f"FASTREPLAY_CUDA=1 but CUDA kernels cannot be built: torch.version.cuda="
            f"{torch.version.cuda}, nvcc={nvcc or 'not found'}; set CUDA_HOME to the CUDA toolkit")
    with_cuda = can_cuda if want == "" else want == "1"

    sources = ["csrc/module.cpp", "csrc/ops.cpp"]
    cxx = ["-O3"]
    link = _shared_libstdcxx()
    if with_cuda:
        sources.append("csrc/ops_cuda.cu")
        cxx.append("-DFASTREPLAY_WITH_CUDA")
        # No --use_fast_math: the kernels must match the PyTorch reference to rounding.
        nvcc_flags = ["-O3", "-DFASTREPLAY_WITH_CUDA"]
        ext = ce.CUDAExtension("fastreplay._C", sources, extra_link_args=link,
                               extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags})
    else:
        ext = ce.CppExtension("fastreplay._C", sources, extra_link_args=link,
                              extra_compile_args={"cxx": cxx})
    print(f"fastreplay: building fastreplay._C with{'' if with_cuda else 'out'} CUDA kernels")
    build_ext = ce.BuildExtension.with_options(use_ninja=ce.is_ninja_available())
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extension_and_cmdclass()
setup(packages=find_packages(include=["fastreplay*"]), ext_modules=ext_modules, cmdclass=cmdclass)
