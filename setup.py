"""Builds convmixer_kernels._C: the C++ CPU kernels always, the CUDA kernels when a toolkit is found.

Environment switches:
  CONVMIXER_BUILD_CUDA=1|0   force the CUDA sources on or off (default: on when nvcc is found)
  CONVMIXER_CPU_ARCH=...     -march value for the CPU kernels (default: native; the package is built
                             from source on the machine that runs it)
"""
import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def write_stamp():
    """Writes build/generated/cmk_build_stamp.h with the digest of csrc/ (see convmixer_kernels/_build_stamp.py).
    bindings.cpp includes it by relative path rather than through an -I flag: a new flag would change
    every compile command, and ninja would rebuild all the kernels for it."""
    spec = importlib.util.spec_from_file_location("_build_stamp", os.path.join(ROOT, "convmixer_kernels", "_build_stamp.py"))
    stamp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stamp)
    out = os.path.join(ROOT, "build", "generated")
    stamp.write_stamp_header(out, stamp.source_digest(os.path.join(ROOT, "csrc")))


def find_cuda_home():
    """The toolkit root nvcc really runs from (the nvcc on PATH may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    return os.path.realpath(m.group(1)) if m else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def want_cuda(cuda_home):
    has_sources = bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    flag = os.environ.get("CONVMIXER_BUILD_CUDA")
    if flag == "1" and not has_sources:
        print("convmixer_kernels: CONVMIXER_BUILD_CUDA=1 but csrc/cuda/ has no .cu sources yet; "
              "building the CPU backend only")
        return False
    if flag is not None:
        return flag == "1"
    return cuda_home is not None and has_sources


def extensions():
    cuda_home = find_cuda_home()
    with_cuda = want_cuda(cuda_home)
    if with_cuda and cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils import cpp_extension

    arch = os.environ.get("CONVMIXER_CPU_ARCH", "native")
    # -fopenmp: ATen's at::parallel_for is a header template that runs serially unless _OPENMP is
    # defined in *this* translation unit (torch's own libgomp is already loaded when _C is imported).
    # -fno-trapping-math: lets GCC if-convert selects on floats (ReLU's NaN-propagating t <= 0 ? 0 : t)
    # inside vectorized loops; without it the ReLU training epilogues ran scalar. It changes no value
    # (no reassociation, no contraction), only the FP-exception flags, which nothing here reads.
    cxx = ["-O3", "-fopenmp", f"-march={arch}", "-fno-trapping-math", "-Wno-unknown-pragmas"]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-mprefer-vector-width=512")  # let auto-vectorized epilogues use AVX-512 where present
    write_stamp()
    # csrc/cuda_emu/*.cpp: the CUDA kernel sources compiled as host C++ against the emulator (always built).
    sources = (sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cuda_emu", "*.cpp")))
               + [os.path.join("csrc", "bindings.cpp")])
    if not with_cuda:
        return [cpp_extension.CppExtension("convmixer_kernels._C", sources, extra_compile_args={"cxx": cxx},
                                           extra_link_args=["-fopenmp"])]
    import torch

    nvidia_inc = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include"))
    # kernels (.cu, light headers only) and their at::Tensor launchers (.cpp, host compiler)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"]
    return [cpp_extension.CUDAExtension(
        "convmixer_kernels._C", sources,
        include_dirs=[os.path.realpath(p) for p in nvidia_inc],
        define_macros=[("CMK_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        # No direct cuBLAS calls: the GEMMs go through at::mm/at::matmul (torch_cuda links cuBLAS), and
        # the pip wheels ship only versioned libcublas*.so.N, which a plain -lcublas cannot find.
        extra_link_args=["-fopenmp"])]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension
    return BuildExtension.with_options(use_ninja=True)


setup(
    name="convmixer-kernels",
    version="0.1.0",
    description="Fused CPU and GPU kernels for ConvMixer networks",
    packages=find_packages(include=["convmixer_kernels", "convmixer_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton>=3.2"], "dev": ["pytest", "timm", "matplotlib", "scikit-learn"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    zip_safe=False,
)
