"""Builds ssl_ops._C (C++ CPU kernels, plus CUDA kernels when possible) and the
test-only host-emulation modules. Options are environment variables; the
README's build-options table lists them."""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name, default="0"):
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def locate_cuda_home():
    """Finds a real CUDA toolkit (bin/nvcc next to include/cuda_runtime.h).

    torch guesses CUDA_HOME from the nvcc on PATH, which is wrong when that
    nvcc is a wrapper script (as in /usr/local/bin here), so resolve it first."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc_on_path))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return os.path.realpath(home)
    return None


CPU_ONLY = env_flag("SSL_OPS_CPU_ONLY")
FORCE_CUDA = env_flag("SSL_OPS_FORCE_CUDA")
DEBUG = env_flag("SSL_OPS_DEBUG")
BUILD_EMU = env_flag("SSL_OPS_BUILD_EMU", "1")
BUILD_EMU_ASAN = env_flag("SSL_OPS_BUILD_EMU_ASAN")
if CPU_ONLY and FORCE_CUDA:
    sys.exit("ssl_ops: SSL_OPS_CPU_ONLY=1 and SSL_OPS_FORCE_CUDA=1 contradict each other")

CUDA_HOME = None if CPU_ONLY else locate_cuda_home()
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402



def toolkit_version(home):
    """The CUDA version of the toolkit in `home`, as 'major.minor', from nvcc."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


TORCH_CUDA = torch.version.cuda
NVCC_VERSION = toolkit_version(CUDA_HOME) if CUDA_HOME else None
why_no_cuda = None
if CPU_ONLY:
    why_no_cuda = "SSL_OPS_CPU_ONLY=1"
elif TORCH_CUDA is None:
    why_no_cuda = "torch is a CPU-only build"
elif CUDA_HOME is None:
    why_no_cuda = "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc and include/cuda_runtime.h)"
elif NVCC_VERSION and NVCC_VERSION.split(".")[0] != TORCH_CUDA.split(".")[0]:
    # torch refuses to build extensions across CUDA major versions.
    why_no_cuda = f"nvcc {NVCC_VERSION} in {CUDA_HOME} does not match torch's CUDA {TORCH_CUDA}"
WITH_CUDA = why_no_cuda is None
if FORCE_CUDA and not WITH_CUDA:
    sys.exit(f"ssl_ops: SSL_OPS_FORCE_CUDA=1 but the CUDA kernels cannot be built: {why_no_cuda}")

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch_list = ";".join(f"{major}.{minor}" for major, minor in caps)
    else:
        # torch crashes on an empty list when no GPU is visible: pick Ampere and
        # Hopper, with PTX so newer GPUs can JIT-compile.
        arch_list = DEFAULT_ARCH_LIST
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
ARCH_LIST = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""

opt = ["-O0", "-g"] if DEBUG else ["-O3"]
define_macros = [
    ("SSL_OPS_TORCH_VERSION", f'"{torch.__version__}"'),
    ("SSL_OPS_ARCH_LIST", f'"{ARCH_LIST}"'),
]
if WITH_CUDA:
    define_macros.append(("SSL_OPS_WITH_CUDA", "1"))


def aten_has_mm_out_dtype():
    """aten::mm.dtype_out (fp16/bf16 operands, fp32 result from cuBLAS) is in
    recent torch only; csrc/cuda/contrastive_gemm.cu widens the operands without it."""
    header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ops", "mm.h")
    try:
        with open(header) as f:
            return "out_dtype" in f.read()
    except OSError:
        return False


if WITH_CUDA and aten_has_mm_out_dtype():
    define_macros.append(("SSL_OPS_HAVE_MM_OUT_DTYPE", "1"))
if DEBUG:
    define_macros.append(("SSL_OPS_DEBUG_BUILD", "1"))
# -fno-trapping-math lets the compiler turn selects in the CPU tile loops into
# vector blends (we never read floating-point exception flags); -fopenmp makes
# at::parallel_for parallel and enables the loops' `omp simd` reductions.
cxx_flags = opt + (["-fopenmp", "-fno-trapping-math"] if sys.platform.startswith("linux") else [])
nvcc_flags = (["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3", "-lineinfo"]) + [
    "--expt-relaxed-constexpr",
    "-Xptxas=-v" if env_flag("SSL_OPS_PTXAS_VERBOSE") else "-Xptxas=-O3",
]


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


core_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
ext_modules = []
if WITH_CUDA:
    ext_modules.append(
        CUDAExtension(
            "ssl_ops._C",
            core_sources + sources("csrc/cuda/*.cu"),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    )
else:
    ext_modules.append(
        CppExtension(
            "ssl_ops._C",
            core_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    )


def emu_extension(module_name, extra_flags, extra_link):
    # The csrc/cuda sources compiled as host C++ against csrc/emu (see README,
    # "How CUDA code is tested"). Validation helpers come along from csrc/.
    return CppExtension(
        f"ssl_ops.{module_name}",
        sources("csrc/emu/*.cpp") + sources("csrc/*_check.cpp"),
        define_macros=[("SSL_OPS_CUDA_EMU", "1"), ("SSL_EMU_MODULE_NAME", module_name)],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": opt + ["-fvisibility=hidden", "-Wno-unknown-pragmas"] + extra_flags},
        extra_link_args=extra_link,
    )


if BUILD_EMU:
    ext_modules.append(emu_extension("_cuda_emu", [], []))
if BUILD_EMU_ASAN:
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    ext_modules.append(emu_extension("_cuda_emu_asan", asan + ["-g"], asan))

print(
    "ssl_ops build configuration:\n"
    f"  torch {torch.__version__} (CUDA {torch.version.cuda})\n"
    f"  CUDA kernels: {'yes' if WITH_CUDA else 'no (' + why_no_cuda + ')'}"
    f"  (CUDA_HOME={CUDA_HOME}, nvcc {NVCC_VERSION}, SSL_OPS_FORCE_CUDA={int(FORCE_CUDA)})\n"
    f"  TORCH_CUDA_ARCH_LIST: {ARCH_LIST or '-'}\n"
    f"  debug: {int(DEBUG)}, MAX_JOBS: {os.environ.get('MAX_JOBS', 'auto')}, "
    f"NVCC_APPEND_FLAGS: {os.environ.get('NVCC_APPEND_FLAGS', '-')}\n"
    f"  emulation modules: {'_cuda_emu' if BUILD_EMU else '-'}"
    f"{' _cuda_emu_asan' if BUILD_EMU_ASAN else ''}",
    flush=True,
)

class BuildEachInItsOwnFolder(BuildExtension):
    """One build folder (and ninja file) per extension: _C and the two emulation
    modules compile some of the same sources with different flags, and in one
    shared folder each build overwrote the others' objects, so every build
    recompiled them."""

    def build_extension(self, ext):
        shared = self.build_temp
        self.build_temp = os.path.join(shared, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared


setup(
    packages=find_packages(include=["ssl_ops", "ssl_ops.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildEachInItsOwnFolder.with_options(use_ninja=True)},
)
