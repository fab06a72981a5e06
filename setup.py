"""Build nf4kit._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc is found.

Environment:
  NF4KIT_CPU_ONLY=1        build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST     target archs (default "8.0;8.6;8.9;9.0"); 9.0 also gets sm_90a code
  CUDA_HOME                the CUDA toolkit (default /usr/local/cuda when it exists)
  MAX_JOBS                 parallel compile jobs (ninja)
  NF4KIT_CUDA_SOURCES      development aid: comma-separated csrc/cuda file names to build (default all;
                           X.cu also brings its instantiation units X_*.cu)
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch guesses CUDA_HOME from `which nvcc` or /usr/local; point it at the toolkit before it looks.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    if os.environ.get("NF4KIT_CPU_ONLY", "0") not in ("", "0"):
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None


def gencode_flags(arch_list: str) -> list:
    """-gencode flags for TORCH_CUDA_ARCH_LIST ("8.0;8.6;9.0", "+PTX" suffixes allowed).

    9.0 is built as sm_90a, the Hopper target with wgmma (its code runs on every 9.0 GPU). Giving
    torch explicit arch flags stops it from adding its own (one device pass per arch, not two).
    """
    flags = []
    for arch in arch_list.replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        sm = "90a" if num in ("90", "90a") else num
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    return flags


def nvidia_wheel_includes() -> list:
    """Headers of the CUDA libraries that torch's pip wheels bring (cuBLAS, cuSPARSE, ...): ATen's
    CUDA headers include them, and a minimal CUDA toolkit (nvcc alone) lacks them."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        found += glob.glob(os.path.join(base, "*", "include"))
    return sorted(d for d in found if os.path.isdir(d))


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


with_cuda = want_cuda()
sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
cxx_flags = ["-O3", "-ffp-contract=off", "-fno-fast-math"]  # torch picks the C++ standard it needs
define_macros = []
extra = {"cxx": cxx_flags}

if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    cu = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    only = [f for f in os.environ.get("NF4KIT_CUDA_SOURCES", "").split(",") if f]
    if only:
        # a file also brings its instantiation units (gemm_4bit.cu: gemm_4bit_wg64.cu, ...)
        cu = [p for p in cu if any(os.path.basename(p) == f or os.path.basename(p).startswith(f[:-3] + "_")
                                   for f in only)]
    sources += rel(cu)
    define_macros.append(("NF4KIT_WITH_CUDA", "1"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    nvcc += gencode_flags(archs)
    extra["nvcc"] = nvcc
    ext = CUDAExtension("nf4kit._C", sources, extra_compile_args=extra, define_macros=define_macros,
                        include_dirs=nvidia_wheel_includes())
else:
    ext = CppExtension("nf4kit._C", sources, extra_compile_args=extra, define_macros=define_macros)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
