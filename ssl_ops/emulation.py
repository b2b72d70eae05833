"""Access to the test-only host emulation of the CUDA kernels (README, "How CUDA
code is tested"). The csrc/cuda kernels, compiled for the CPU, are reached as
``torch.ops.ssl_ops_emu.<op>`` on CPU tensors once ``load()`` has run."""

import importlib
import os


def module_name():
    """``_cuda_emu``, or the module named by SSL_OPS_EMU_MODULE (``_cuda_emu_asan``)."""
    return os.environ.get("SSL_OPS_EMU_MODULE", "_cuda_emu")


def load():
    """Imports the emulation module; raises ImportError when it was not built
    (``SSL_OPS_BUILD_EMU=0``)."""
    from . import _extension  # noqa: F401  (the emulated ops share validation with _C)

    return importlib.import_module(f"ssl_ops.{module_name()}")


def available():
    try:
        load()
    except ImportError:
        return False
    return True


def asan_environment(base=None):
    """Environment for a Python process that loads ``_cuda_emu_asan``: the
    AddressSanitizer runtime it links is preloaded (it must come first), leak
    checks are off (the interpreter itself leaks by design)."""
    import re
    import subprocess

    import ssl_ops

    env = dict(os.environ if base is None else base)
    package_dir = os.path.dirname(ssl_ops.__file__)
    candidates = [f for f in os.listdir(package_dir) if f.startswith("_cuda_emu_asan") and f.endswith(".so")]
    if not candidates:
        raise ImportError("ssl_ops._cuda_emu_asan is not built (SSL_OPS_BUILD_EMU_ASAN=1)")
    ldd = subprocess.run(["ldd", os.path.join(package_dir, candidates[0])], capture_output=True, text=True)
    match = re.search(r"(\S*libasan\.so\S*) => (\S+)", ldd.stdout)
    if not match:
        raise RuntimeError(f"cannot find the libasan that _cuda_emu_asan links:\n{ldd.stdout}")
    env["LD_PRELOAD"] = match.group(2)
    env["ASAN_OPTIONS"] = "detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0"
    env["SSL_OPS_EMU_MODULE"] = "_cuda_emu_asan"
    return env
